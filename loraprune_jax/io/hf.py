"""HF LLaMA checkpoint directories: ``config.json`` + safetensors (single file or sharded).

Loading reads one tensor at a time through a memory map, converts it to the requested dtype
and layout (HF linear weights are ``(out, in)``, ours are Flax ``(in, out)``) and hands it to
JAX immediately, so peak host memory stays near the size of the model itself. We parse the
safetensors header ourselves because ``safetensors.safe_open(framework="numpy")`` cannot read
bfloat16, and because it lets us report truncated files precisely.

Saving is atomic: everything is written into a temporary sibling directory that is renamed
into place at the very end, so an interrupted export never leaves a directory that looks
complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from loraprune_jax.config import LlamaConfig
from loraprune_jax.io.errors import CheckpointError
from loraprune_jax.io.lazy import LazyTensor
from loraprune_jax.io.tokenizer import load_hf_tokenizer
from loraprune_jax.models.llama_params import check_base, param_shapes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype tag -> numpy dtype. Only floating types a LLaMA checkpoint uses.
_ST_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
}
_NP_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
_MAX_HEADER = 100 * 2**20  # the safetensors spec caps the JSON header at 100 MB

# Our per-layer key -> (HF module path inside model.layers.{i}, is a linear (transposed) weight)
LAYER_KEYS: dict[str, tuple[str, bool]] = {
    "attn_norm": ("input_layernorm", False),
    "q": ("self_attn.q_proj", True),
    "k": ("self_attn.k_proj", True),
    "v": ("self_attn.v_proj", True),
    "o": ("self_attn.o_proj", True),
    "mlp_norm": ("post_attention_layernorm", False),
    "gate": ("mlp.gate_proj", True),
    "up": ("mlp.up_proj", True),
    "down": ("mlp.down_proj", True),
}


# Names and shapes ----------------------------------------------------------------------
def hf_tensor_specs(config: LlamaConfig) -> Iterator[tuple[tuple, str, tuple[int, ...], bool]]:
    """Yield ``(where, hf_name, hf_shape, transposed)`` for every tensor of ``config``.

    ``where`` addresses the base pytree: ``("embed",)`` or ``("layers", i, "q")``;
    ``hf_shape`` is the on-disk (PyTorch, ``(out, in)``) shape.
    """
    shapes = param_shapes(config)
    yield ("embed",), "model.embed_tokens.weight", shapes["embed"], False
    for i, layer in enumerate(shapes["layers"]):
        for key, (module, linear) in LAYER_KEYS.items():
            shape = layer[key]
            yield ("layers", i, key), f"model.layers.{i}.{module}.weight", shape[::-1] if linear else shape, linear
    yield ("final_norm",), "model.norm.weight", shapes["final_norm"], False
    if "lm_head" in shapes:
        yield ("lm_head",), "lm_head.weight", shapes["lm_head"][::-1], True


def _empty_tree(config: LlamaConfig) -> dict[str, Any]:
    tree: dict[str, Any] = {"layers": [{} for _ in range(config.num_layers)]}
    return tree


def _put(tree: dict[str, Any], where: tuple, value: Any) -> None:
    if where[0] == "layers":
        tree["layers"][where[1]][where[2]] = value
    else:
        tree[where[0]] = value


def _get(tree: Mapping[str, Any], where: tuple) -> Any:
    if where[0] == "layers":
        return tree["layers"][where[1]][where[2]]
    return tree[where[0]]


def np_dtype(dtype: str) -> np.dtype:
    """numpy dtype (ml_dtypes for bfloat16) of a config dtype name."""
    try:
        return _NP_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_NP_DTYPES)}, got {dtype!r}") from None


# safetensors reading --------------------------------------------------------------------
class SafetensorsFile:
    """Header of one ``.safetensors`` file, validated against its size; tensors are memory-mapped
    one at a time on request (nothing is read until :meth:`get`)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(self.path, "safetensors file not found") from None
        if size < 8:
            raise CheckpointError(self.path, f"truncated safetensors file: {size} bytes, no header")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                raise CheckpointError(self.path, f"not a safetensors file (header length {n})")
            if 8 + n > size:
                raise CheckpointError(
                    self.path, f"truncated safetensors file: header declares {n} bytes, file has {size - 8}"
                )
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(self.path, f"corrupt safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise CheckpointError(self.path, "corrupt safetensors header: not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, dict[str, Any]] = header
        end = 0
        for name, e in header.items():
            try:
                begin, stop = (int(x) for x in e["data_offsets"])
                shape = tuple(int(s) for s in e["shape"])
                tag = e["dtype"]
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(self.path, f"corrupt header entry for tensor {name!r}: {e}") from err
            if tag in _ST_DTYPES and stop - begin != math.prod(shape) * _ST_DTYPES[tag].itemsize:
                raise CheckpointError(
                    self.path, f"tensor {name!r}: {stop - begin} bytes do not hold {tag} {list(shape)}"
                )
            end = max(end, stop)
        if self.data_start + end > size:
            raise CheckpointError(
                self.path,
                f"truncated safetensors file: tensor data needs {self.data_start + end} bytes, "
                f"file has {size}",
            )

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def _dtype(self, name: str) -> np.dtype:
        tag = self.entries[name]["dtype"]
        if tag not in _ST_DTYPES:
            raise CheckpointError(
                self.path, f"tensor {name!r} has unsupported dtype {tag} (supported: {sorted(_ST_DTYPES)})"
            )
        return _ST_DTYPES[tag]

    def get(self, name: str) -> np.ndarray:
        """A read-only memory map of tensor ``name`` in its on-disk dtype."""
        e = self.entries[name]
        shape = tuple(e["shape"])
        dtype = self._dtype(name)
        begin, stop = e["data_offsets"]
        if stop == begin:
            return np.zeros(shape, dtype)
        mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_start + begin, shape=(stop - begin,))
        return mm.view(dtype).reshape(shape)

    def lazy(self, name: str, transposed: bool = False, dtype: Any = None) -> LazyTensor:
        """Tensor ``name`` as a :class:`LazyTensor` (transposed to our layout, read as ``dtype``);
        nothing is read now."""
        e = self.entries[name]
        begin = int(e["data_offsets"][0])
        return LazyTensor(self.path, self.data_start + begin, tuple(e["shape"]), self._dtype(name),
                          transposed, dtype)


def _weight_files(path: Path) -> tuple[dict[str, Path], dict[str, SafetensorsFile], Path]:
    """Map tensor name -> file holding it; opened headers; the file to blame for missing names."""
    index = path / INDEX_FILE
    single = path / WEIGHTS_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(index, f"corrupt safetensors index: {e}") from e
        files: dict[str, SafetensorsFile] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = path / shard
            if not shard_path.is_file():
                raise CheckpointError(shard_path, f"shard listed in {INDEX_FILE} is missing")
            files[shard] = SafetensorsFile(shard_path)
        return {k: path / v for k, v in weight_map.items()}, files, index
    if single.is_file():
        st = SafetensorsFile(single)
        return {k: single for k in st.entries}, {WEIGHTS_FILE: st}, single
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pth"))
    hint = f" (found {others}; only safetensors checkpoints are supported)" if others else ""
    raise CheckpointError(single, f"weights file not found (nor {INDEX_FILE}){hint}")


def read_hf_config(path: str | os.PathLike[str], dtype: str | None = None) -> LlamaConfig:
    """The :class:`LlamaConfig` of a HF directory's ``config.json``."""
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(cfg_path, "config.json not found; not a HF checkpoint directory")
    try:
        cfg = json.loads(cfg_path.read_text())
        return LlamaConfig.from_hf_dict(cfg, dtype=dtype)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, NotImplementedError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(cfg_path, f"unusable config: {what}") from e


def load_hf_dir(
    path: str | os.PathLike[str],
    dtype: str | None = None,
    as_numpy: bool = False,
    lazy: bool = False,
) -> tuple[LlamaConfig, dict[str, Any], Any | None]:
    """Load a HF LLaMA directory: ``(config, base params, tokenizer or None)``.

    Weights may be one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``,
    in bf16/f16/f32; they are converted to ``dtype`` (default: the config's dtype, which the
    returned config then carries) and to our ``(in, out)`` layout one tensor at a time.
    Leaves are jax arrays (numpy arrays when ``as_numpy``; :class:`LazyTensor` leaves that read
    only the slices asked for when ``lazy``, for placing on a mesh shard by shard, see
    ``io.lazy``: then nothing but the headers is read here). Every shape is checked against
    the config, including per-layer widths of pruned models. Raises :class:`CheckpointError`
    naming the file for missing/truncated files, missing tensors, wrong shapes and dtypes.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(path, "checkpoint directory not found")
    config = read_hf_config(path, dtype)
    target = np_dtype(config.dtype)
    locations, files, blame = _weight_files(path)
    by_path = {st.path: st for st in files.values()}
    base = _empty_tree(config)
    for where, name, shape, transposed in hf_tensor_specs(config):
        file_path = locations.get(name)
        if file_path is None:
            raise CheckpointError(blame, f"tensor {name!r} is missing")
        st = by_path[file_path]
        if name not in st:
            raise CheckpointError(st.path, f"tensor {name!r} is missing (the index says it is here)")
        got = st.shape(name)
        if got != tuple(shape):
            raise CheckpointError(
                st.path, f"tensor {name!r} has shape {list(got)}, expected {list(shape)} for the config"
            )
        if lazy:
            _put(base, where, st.lazy(name, transposed, target))
            continue
        arr = st.get(name).astype(target)  # copies out of the memory map
        if transposed:
            arr = np.ascontiguousarray(arr.T)
        _put(base, where, arr if as_numpy else jnp.asarray(arr))
        del arr
    tokenizer = load_hf_tokenizer(path)
    return config, base, tokenizer


# Saving -------------------------------------------------------------------------------
def save_hf_dir(
    path: str | os.PathLike[str],
    config: LlamaConfig,
    base: Mapping[str, Any],
    tokenizer: Any | None = None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> None:
    """Write a HF ``LlamaForCausalLM``-compatible directory, atomically.

    ``config.json`` (``config.to_hf_dict()``), ``model.safetensors`` (HF names, ``(out, in)``
    layout, the config's dtype; shards of at most ``max_shard_bytes`` plus an index when larger,
    so host memory for the copy stays bounded), the tokenizer's files when given, and
    ``extra_files`` (name -> contents). Everything goes into a temporary sibling directory that
    is renamed into place at the end. An existing non-empty ``path`` is only replaced when
    ``overwrite``.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path}: exists and is not a directory")
        if any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path}: directory exists and is not empty (pass overwrite=True)")
    check_base(base, config)
    target = np_dtype(config.dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        _write_weights(tmp, config, base, target, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(os.fspath(tmp))
        for name, contents in (extra_files or {}).items():
            mode = "wb" if isinstance(contents, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(contents)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_weights(
    directory: Path, config: LlamaConfig, base: Mapping[str, Any], target: np.dtype, max_shard_bytes: int
) -> None:
    size = 0
    pending: list[tuple[str, Any, bool]] = [
        (name, _get(base, where), transposed) for where, name, _, transposed in hf_tensor_specs(config)
    ]
    # Group into shards by size first (cheap), so at most one shard is materialized at a time.
    groups: list[list[tuple[str, Any, bool]]] = [[]]
    for item in pending:
        nbytes = math.prod(item[1].shape) * target.itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += nbytes
    n = len(groups)
    names = [WEIGHTS_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map: dict[str, str] = {}
    total = 0
    for fname, group in zip(names, groups):
        tensors = {}
        for name, leaf, transposed in group:
            arr = np.asarray(leaf).astype(target, copy=False)
            tensors[name] = np.ascontiguousarray(arr.T if transposed else arr)
            weight_map[name] = fname
            total += tensors[name].nbytes
        save_file(tensors, os.fspath(directory / fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` directory to ``path``, replacing what was there."""
    if not path.exists():
        os.replace(tmp, path)
        return
    if not any(path.iterdir()):
        path.rmdir()
        os.replace(tmp, path)
        return
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
