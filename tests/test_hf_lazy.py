"""Lazy checkpoint tensors (io.lazy): slices read from safetensors files equal the eagerly loaded
arrays bit for bit, placing a lazy base on a mesh equals placing the eager one, and reads stay
bounded by the slices asked for."""

from __future__ import annotations

import tracemalloc

import jax
import numpy as np
import pytest

from loraprune_jax.config import LlamaConfig
from loraprune_jax.core.trees import count_params
from loraprune_jax.io import CheckpointError, lazy, load_hf_dir, load_model, save_hf_dir
from loraprune_jax.io.lazy import LazyTensor, materialize
from loraprune_jax.models import llama_params as lp
from loraprune_jax.parallel.mesh import make_mesh
from test_hf import random_base, tiny_config

SLICES = [
    (slice(None), slice(None)),
    (slice(1, 5), slice(None)),
    (slice(None), slice(2, 7)),
    (slice(3, 8), slice(1, 4)),
    (slice(0, 9, 2), slice(1, None, 3)),
    (slice(5, 2), slice(None)),  # empty
    (Ellipsis, slice(0, 3)),
    (2,),
    (-1, slice(1, 3)),
    (slice(1, 3),),
    Ellipsis,
]


def leaves_with_paths(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def assert_bit_identical(x, y):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape and x.dtype == y.dtype
    bits = lambda a: np.ascontiguousarray(a).reshape(-1).view(np.uint8)  # noqa: E731
    np.testing.assert_array_equal(bits(x), bits(y))


@pytest.mark.parametrize("file_dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("target", [None, "float32"])
def test_slices_equal_eager(tmp_path, file_dtype, target):
    config = tiny_config(file_dtype)
    save_hf_dir(tmp_path / "m", config, random_base(config))
    cfg_e, eager, _ = load_hf_dir(tmp_path / "m", dtype=target, as_numpy=True)
    cfg_l, lazy_base, _ = load_hf_dir(tmp_path / "m", dtype=target, lazy=True)
    assert cfg_l == cfg_e
    assert jax.tree.structure(lazy_base) == jax.tree.structure(eager)
    transposed = 0
    for (path, x), y in zip(leaves_with_paths(lazy_base), jax.tree.leaves(eager)):
        assert isinstance(x, LazyTensor), path
        assert x.bytes_read == 0  # loading read the headers only
        assert (x.shape, x.dtype, x.ndim, x.size) == (y.shape, y.dtype, y.ndim, y.size)
        transposed += x.transposed
        assert_bit_identical(np.asarray(x), y)
        for idx in SLICES if x.ndim == 2 else [(slice(None),), (slice(3, 11),), (slice(1, 15, 4),), 5, Ellipsis]:
            assert_bit_identical(x[idx], y[idx])
    assert transposed == 7 * config.num_layers + 1  # the projections and the LM head
    assert_bit_identical(np.asarray(lazy_base["embed"], dtype=np.float64),
                         eager["embed"].astype(np.float64))


def test_sharded_checkpoint_and_load_model(tmp_path):
    config = tiny_config("bfloat16")
    save_hf_dir(tmp_path / "auto", config, random_base(config), max_shard_bytes=2000)
    assert (tmp_path / "auto" / "model.safetensors.index.json").is_file()
    _, eager, _ = load_hf_dir(tmp_path / "auto", as_numpy=True)
    _, got, _ = load_model(str(tmp_path / "auto"), lazy=True)
    files = {x.path.name for x in jax.tree.leaves(got)}
    assert len(files) > 2
    # counting parameters reads nothing; materialize reads every leaf whole
    assert count_params(got) == count_params(eager) == config.num_params()
    assert all(x.bytes_read == 0 for x in jax.tree.leaves(got))
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(eager)):
        assert_bit_identical(x[1:3], y[1:3])
        assert_bit_identical(x[...], y)
    for x, y in zip(jax.tree.leaves(materialize(got)), jax.tree.leaves(eager)):
        assert isinstance(x, np.ndarray)
        assert_bit_identical(x, y)


def test_errors_up_front(tmp_path):
    config = tiny_config()
    save_hf_dir(tmp_path / "m", config, random_base(config))
    path = tmp_path / "m" / "model.safetensors"
    # a truncated file is refused from its header, before anything is read
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf_dir(tmp_path / "m", lazy=True)
    # a file cut after loading: the read that needs the missing bytes names the file
    path.write_bytes(data)
    _, got, _ = load_hf_dir(tmp_path / "m", lazy=True)
    last = max(jax.tree.leaves(got), key=lambda x: x.offset)
    path.write_bytes(data[:last.offset + 4])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        np.asarray(last)
    with pytest.raises(IndexError):
        got["embed"][0, 0, 0]
    with pytest.raises(ValueError, match="without a copy"):
        np.asarray(got["embed"], copy=False)


def big_tensor(tmp_path, rows=512, cols=384, transposed=False, dtype=np.float32):
    """A (rows, cols) tensor written raw at an offset: a LazyTensor over it and its values."""
    values = np.random.default_rng(0).standard_normal((rows, cols)).astype(dtype)
    path = tmp_path / "raw.bin"
    path.write_bytes(b"\x00" * 24 + values.tobytes())
    return LazyTensor(path, 24, (rows, cols), dtype, transposed), values


def test_reads_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(lazy, "CHUNK_BYTES", 16 * 384 * 4)  # 16 rows of the file per read
    x, values = big_tensor(tmp_path)
    row_bytes = 384 * 4
    # contiguous rows: exactly those rows are read
    assert_bit_identical(x[100:200], values[100:200])
    assert x.bytes_read == 100 * row_bytes
    # a column slice reads the rows it spans (its file layout), not more
    x.bytes_read = 0
    assert_bit_identical(x[40:60, 300:310], values[40:60, 300:310])
    assert x.bytes_read == 20 * row_bytes
    # a strided row slice reads within each chunk only the span of its rows
    x.bytes_read = 0
    assert_bit_identical(x[3:500:50], values[3:500:50])
    assert x.bytes_read == 10 * row_bytes
    # transposed: an (in, out) slice of columns is a slice of rows on disk
    t, _ = big_tensor(tmp_path, transposed=True)
    assert t.shape == (384, 512)
    assert_bit_identical(t[:, 64:128], values[64:128].T)
    assert t.bytes_read == 64 * row_bytes
    # temporary memory: the output plus about one chunk, not the tensor (768 KiB)
    x.bytes_read = 0
    tracemalloc.start()
    got = x[:, :8]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert_bit_identical(got, values[:, :8])
    assert x.bytes_read == 512 * row_bytes
    assert peak < got.nbytes + 3 * lazy.CHUNK_BYTES < values.nbytes / 2


UNIFORM = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, dtype="bfloat16",
                      tie_word_embeddings=False)


@pytest.mark.parametrize("mesh_spec", ["fsdp:8", "data:2,fsdp:2,tensor:2"])
@pytest.mark.parametrize("stacked", [True, False])
def test_placing_lazy_equals_eager(tmp_path, mesh_spec, stacked):
    save_hf_dir(tmp_path / "m", UNIFORM, random_base(UNIFORM, seed=3))
    _, eager, _ = load_hf_dir(tmp_path / "m", as_numpy=True)
    config, host, _ = load_hf_dir(tmp_path / "m", lazy=True)
    mesh = make_mesh(mesh_spec)
    want = lp.shard_base(eager, config, mesh, stacked=stacked)
    got = lp.shard_base(host, config, mesh, stacked=stacked)
    assert isinstance(got["layers"], dict) == stacked
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert x.sharding == y.sharding and x.dtype == y.dtype
        assert_bit_identical(x, y)
    if mesh_spec == "fsdp:8":
        # o and down are split over rows of the file: each device read only its eighth
        for layer in host["layers"]:
            for name in ("o", "down"):
                assert layer[name].bytes_read == layer[name].size * 2
    # a cast on placing (bf16 file -> f32 arrays) equals casting the eager base
    cast = lp.shard_base(host, config, mesh, stacked=stacked, dtype=np.float32)
    for x, y in zip(jax.tree.leaves(cast), jax.tree.leaves(want)):
        assert x.dtype == np.float32
        assert_bit_identical(x, np.asarray(y).astype(np.float32))


def test_gguf_and_bundled_cache(tmp_path, monkeypatch):
    """A GGUF file is dequantized in memory (numpy leaves); the bundled model's cache is converted
    once, then read lazily."""
    from loraprune_jax.io import gguf as lgguf
    from test_gguf import write_tiny_gguf

    src = tmp_path / "model.gguf"
    write_tiny_gguf(src, tied=False)
    _, from_gguf, _ = load_model(str(src), lazy=True)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(from_gguf))
    monkeypatch.setattr(lgguf, "bundled_gguf_path", lambda: src)
    _, eager, _ = lgguf.load_smollm2(cache_dir=tmp_path / "cache", as_numpy=True)
    _, got, _ = lgguf.load_smollm2(cache_dir=tmp_path / "cache", lazy=True)
    for x, y, z in zip(jax.tree.leaves(got), jax.tree.leaves(eager), jax.tree.leaves(from_gguf)):
        assert isinstance(x, LazyTensor) and x.path.parent == lgguf.smollm2_cache_path(tmp_path / "cache")
        assert_bit_identical(x[:, 1:] if x.ndim == 2 else x[1:], y[:, 1:] if y.ndim == 2 else y[1:])
        assert_bit_identical(np.asarray(x), z)
