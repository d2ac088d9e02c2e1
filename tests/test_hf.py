"""HF safetensors directories: save/load round trips, shards, errors, atomic saves."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import tokenizers
import transformers
from safetensors.numpy import save_file

from loraprune_jax.config import LlamaConfig
from loraprune_jax.io import CheckpointError, hf, load_hf_dir, load_model, param_shapes, save_hf_dir
from loraprune_jax.io.hf import SafetensorsFile


def tiny_config(dtype: str = "float32", tied: bool = False, per_layer: bool = True) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=4,
        tie_word_embeddings=tied,
        dtype=dtype,
        bos_token_id=1,
        eos_token_id=2,
        layer_num_heads=(4, 2, 2) if per_layer else None,
        layer_num_kv_heads=(2, 1, 2) if per_layer else None,
        layer_intermediate_size=(24, 8, 16) if per_layer else None,
    )


def random_base(config: LlamaConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    dt = hf.np_dtype(config.dtype)
    return jax.tree.map(
        lambda s: rng.standard_normal(s).astype(dt),
        param_shapes(config),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def assert_same(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x).astype(np.float32), np.asarray(y).astype(np.float32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip(tmp_path, dtype, tied):
    config = tiny_config(dtype, tied)
    base = random_base(config)
    out = tmp_path / "model"
    save_hf_dir(out, config, base, tiny_tokenizer())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    loaded_config, loaded, tok = load_hf_dir(out)
    assert loaded_config == config
    assert ("lm_head" in loaded) == (not tied)
    assert isinstance(loaded["layers"][1]["q"], jax.Array)
    assert loaded["layers"][1]["q"].shape == (16, 2 * 4)
    assert loaded["layers"][1]["down"].shape == (8, 16)
    assert_same(loaded, jax.tree.map(jax.numpy.asarray, base))
    assert tok.encode("hello world") == [3, 4]
    # HF layout on disk: (out, in), HF names, the config's dtype.
    st = SafetensorsFile(out / "model.safetensors")
    assert st.shape("model.layers.1.mlp.down_proj.weight") == (16, 8)
    assert ("lm_head.weight" in st) == (not tied)
    assert st.entries["model.norm.weight"]["dtype"] == ("F32" if dtype == "float32" else "BF16")
    np.testing.assert_array_equal(st.get("model.layers.0.self_attn.q_proj.weight"), base["layers"][0]["q"].T)


def test_dtype_conversion_and_numpy(tmp_path):
    config = tiny_config("bfloat16")
    base = random_base(config)
    save_hf_dir(tmp_path / "m", config, base)
    cfg32, loaded, tok = load_hf_dir(tmp_path / "m", dtype="float32", as_numpy=True)
    assert tok is None
    assert cfg32.dtype == "float32"
    assert isinstance(loaded["embed"], np.ndarray) and loaded["embed"].dtype == np.float32
    np.testing.assert_array_equal(loaded["embed"], base["embed"].astype(np.float32))
    cfg16, loaded16, _ = load_hf_dir(tmp_path / "m", dtype="float16")
    assert loaded16["layers"][2]["up"].dtype == np.float16


def test_sharded(tmp_path):
    config = tiny_config()
    base = random_base(config)
    save_hf_dir(tmp_path / "single", config, base)
    st = SafetensorsFile(tmp_path / "single" / "model.safetensors")
    names = sorted(st.entries)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    weight_map = {}
    for fname, part in shards.items():
        save_file({n: np.array(st.get(n)) for n in part}, str(d / fname))
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, loaded, _ = load_hf_dir(d)
    assert_same(loaded, jax.tree.map(jax.numpy.asarray, base))

    # save_hf_dir shards by size itself.
    save_hf_dir(tmp_path / "auto", config, base, max_shard_bytes=2000)
    files = os.listdir(tmp_path / "auto")
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    _, loaded, _ = load_hf_dir(tmp_path / "auto")
    assert_same(loaded, jax.tree.map(jax.numpy.asarray, base))

    # A shard named in the index is missing.
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_hf_dir(d)


@pytest.fixture
def saved(tmp_path):
    config = tiny_config()
    path = tmp_path / "m"
    save_hf_dir(path, config, random_base(config))
    return path


def test_missing_config(saved):
    os.remove(saved / "config.json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_dir(saved)


def test_missing_weights(saved):
    os.remove(saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_dir(saved)


@pytest.mark.parametrize("keep", [5, 100, -10])
def test_truncated(saved, keep):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_hf_dir(saved)


def test_missing_tensor(saved):
    f = saved / "model.safetensors"
    st = SafetensorsFile(f)
    tensors = {n: np.array(st.get(n)) for n in st.entries if n != "model.layers.2.mlp.up_proj.weight"}
    del st
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*model\.layers\.2\.mlp\.up_proj\.weight"):
        load_hf_dir(saved)


def test_wrong_shape(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["layer_intermediate_size"] = [24, 8, 12]
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*\[16, 16\], expected \[12, 16\]"):
        load_hf_dir(saved)


def test_unsupported_dtype(saved):
    f = saved / "model.safetensors"
    st = SafetensorsFile(f)
    tensors = {n: np.array(st.get(n)) for n in st.entries}
    del st
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*unsupported dtype I32"):
        load_hf_dir(saved)


def test_atomic_save(tmp_path, monkeypatch):
    config = tiny_config("bfloat16")
    base = random_base(config)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_hf_dir(tmp_path / "m", config, base)
    assert os.listdir(tmp_path) == []  # neither the target nor a temporary directory is left

    # An existing complete directory survives a failed overwrite untouched.
    monkeypatch.undo()
    save_hf_dir(tmp_path / "m", config, base)
    before = sorted(os.listdir(tmp_path / "m"))
    monkeypatch.setattr(hf, "save_file", boom)
    with pytest.raises(OSError):
        save_hf_dir(tmp_path / "m", config, random_base(config, 1), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["m"] and sorted(os.listdir(tmp_path / "m")) == before
    _, loaded, _ = load_hf_dir(tmp_path / "m")
    assert_same(loaded, jax.tree.map(jax.numpy.asarray, base))


def test_overwrite(tmp_path):
    config = tiny_config()
    save_hf_dir(tmp_path / "m", config, random_base(config, 0))
    with pytest.raises(FileExistsError, match="overwrite"):
        save_hf_dir(tmp_path / "m", config, random_base(config, 1))
    new = random_base(config, 1)
    save_hf_dir(tmp_path / "m", config, new, overwrite=True)
    _, loaded, _ = load_hf_dir(tmp_path / "m")
    assert_same(loaded, jax.tree.map(jax.numpy.asarray, new))
    assert os.listdir(tmp_path) == ["m"]
    (tmp_path / "empty").mkdir()
    save_hf_dir(tmp_path / "empty", config, new)  # an empty directory may be filled


def test_save_checks_shapes(tmp_path):
    config = tiny_config()
    base = random_base(config)
    base["layers"][1]["up"] = np.zeros((16, 9), np.float32)
    with pytest.raises(ValueError, match="layer 1 up: expected shape"):
        save_hf_dir(tmp_path / "m", config, base)
    assert not (tmp_path / "m").exists()


def test_load_model_dispatch(saved, tmp_path):
    config, base, _ = load_model(str(saved))
    assert config.num_layers == 3
    with pytest.raises(CheckpointError, match="nope"):
        load_model(str(tmp_path / "nope"))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="weights.bin"):
        load_model(str(other))
