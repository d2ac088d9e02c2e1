"""Checkpoint I/O: HF safetensors directories (``hf``), GGUF files and the bundled SmolLM2
(``gguf``), tokenizers (``tokenizer``), the HF export of a pruned model with its remote code and
LoRA adapters (``export``), the bundled ViT-S/14 from ONNX (``onnx_vit``) and CIFAR-10 CNN from
Keras h5 (``keras_h5``), and atomic JSON files (``jsonfile``).

Every LLaMA loader returns ``(config, base, tokenizer)`` where ``base`` is the plain nested-dict
base-parameter pytree (Flax ``(in, out)`` kernels, one dict per layer in ``base["layers"]``).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from loraprune_jax.config import LlamaConfig
from loraprune_jax.io.errors import CheckpointError

# name -> the module defining it, imported on first use: GGUF needs the gguf extra, tokenizers
# the hf extra, so ``import loraprune_jax.io`` needs neither
_LAZY = {
    **dict.fromkeys(("bundled_gguf_path", "default_cache_dir", "gguf_config", "load_gguf",
                     "load_smollm2", "permute_qk", "smollm2_cache_path", "unpermute_qk"), "gguf"),
    **dict.fromkeys(("hf_tensor_specs", "load_hf_dir", "param_shapes", "read_hf_config",
                     "save_hf_dir", "SafetensorsFile"), "hf"),
    **dict.fromkeys(("LazyTensor", "materialize"), "lazy"),
    **dict.fromkeys(("load_hf_tokenizer", "tokenizer_from_gguf"), "tokenizer"),
    **dict.fromkeys(("export_hf", "load_adapters", "load_adapters_config", "needs_remote_code",
                     "save_adapters"), "export"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"loraprune_jax.io.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SMOLLM2_SPECS = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")


def load_model(
    spec: str | os.PathLike[str],
    dtype: str | None = None,
    as_numpy: bool = False,
    lazy: bool = False,
) -> tuple[LlamaConfig, dict[str, Any], Any | None]:
    """Load ``(config, base, tokenizer)`` from a model spec (numpy leaves when ``as_numpy``,
    for placing on a mesh without a copy on one device first; with ``lazy``, leaves of a
    safetensors checkpoint are ``io.lazy.LazyTensor`` s read slice by slice as they are placed,
    while a GGUF file, dequantized in memory, gives numpy leaves).

    ``"smollm2"``: the bundled SmolLM2-135M-Instruct (cached HF conversion); a directory: a HF
    checkpoint; a ``.gguf`` file: a LLaMA GGUF. ``dtype`` defaults to the checkpoint's dtype
    (float32 for GGUF). Anything else raises :class:`CheckpointError`.
    """
    from loraprune_jax.io.gguf import load_gguf, load_smollm2
    from loraprune_jax.io.hf import load_hf_dir

    text = os.fspath(spec)
    if isinstance(spec, str) and text.lower() in SMOLLM2_SPECS and not Path(text).exists():
        return load_smollm2(dtype=dtype or "float32", as_numpy=as_numpy, lazy=lazy)
    path = Path(text).expanduser()
    if path.is_dir():
        return load_hf_dir(path, dtype=dtype, as_numpy=as_numpy, lazy=lazy)
    if path.suffix.lower() == ".gguf":
        return load_gguf(path, dtype=dtype or "float32", as_numpy=as_numpy or lazy)
    raise _not_a_model(path)


def _not_a_model(path: Path) -> CheckpointError:
    """The error for a model spec that names neither the bundled model, a directory nor a GGUF."""
    if not path.exists():
        return CheckpointError(
            path,
            "no such model: give 'smollm2' (bundled SmolLM2-135M-Instruct), a HF checkpoint "
            "directory, or a .gguf file",
        )
    return CheckpointError(
        path, "unsupported model file: give a HF checkpoint directory (config.json + safetensors) or a .gguf file"
    )


def peek_model(spec: str | os.PathLike[str]) -> tuple[LlamaConfig, bool]:
    """``(config, has_tokenizer)`` of a model spec without reading its weights: what a command
    checks its arguments against before loading (context length, widths, a tokenizer). Bad specs
    raise :class:`CheckpointError` as :func:`load_model` does."""
    from loraprune_jax.io.gguf import bundled_gguf_path, gguf_config, open_gguf, smollm2_cache_path
    from loraprune_jax.io.hf import CONFIG_FILE, read_hf_config
    from loraprune_jax.io.tokenizer import has_hf_tokenizer

    text = os.fspath(spec)
    path = Path(text).expanduser()
    if isinstance(spec, str) and text.lower() in SMOLLM2_SPECS and not path.exists():
        cache = smollm2_cache_path()  # its converted copy, when made: faster than the GGUF
        path = cache if (cache / CONFIG_FILE).is_file() else bundled_gguf_path()
    if path.is_dir():
        return read_hf_config(path), has_hf_tokenizer(path)
    if path.suffix.lower() == ".gguf":
        reader = open_gguf(path)
        return gguf_config(reader, path), "tokenizer.ggml.model" in reader.fields
    raise _not_a_model(path)


__all__ = ["CheckpointError", "SMOLLM2_SPECS", "load_model", "peek_model", *sorted(_LAZY)]
