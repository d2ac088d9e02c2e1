"""Export a pruned model for PyTorch/transformers, and save or load a run's LoRA adapters + masks.

``export_hf`` writes a HF checkpoint directory. Uniform widths that plain ``transformers``
accepts give a plain ``LlamaForCausalLM`` checkpoint. Otherwise (per-layer widths, a layer with
no heads or MLP channels, or a head count that does not divide ``hidden_size``, which
transformers 5's ``LlamaConfig`` rejects) the directory also carries a few lines of modeling code
(``configuration_pruned_llama.py``, ``modeling_pruned_llama.py``, ``auto_map`` in
``config.json``) so that ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
builds each layer at its own widths. :func:`loraprune_jax.io.hf.load_hf_dir` reads both kinds.
Its ``model_type`` stays ``llama`` and its uniform ``num_attention_heads`` one that transformers'
``LlamaConfig`` accepts (the widest layer's, or 1 where that does not divide ``hidden_size``; the
per-layer lists are what counts), so ``AutoTokenizer.from_pretrained(dir)`` loads the tokenizer
with no question about remote code, and the model loads with ``trust_remote_code=True`` and no
warning about a model type that does not match.

``save_adapters`` / ``load_adapters`` keep the LoRA adapters and masks of a run *before* merge
(so it can be inspected or resumed) in a small directory: ``lora.safetensors`` and
``masks.safetensors`` with path-like tensor names (``layers.3.q.a``, ``layers.3.attn``) and
``adapters.json`` with the LoRA and model configs.

Both write into a hidden temporary sibling (``.NAME.tmp-*``) renamed into place (an earlier
directory is moved to ``.NAME.old-*`` and back on failure), so a directory that exists is
complete; :func:`remove_partial_exports` deletes what a killed export left beside it.

A model pruned with weight masks (unstructured or N:M) keeps its shape: ``export_hf(...,
masks=...)`` writes the merged weights with zeros in place and the masks beside them in
``masks.safetensors`` (``uint8``, ``layers.3.q`` names, Flax ``(in, out)`` layout), which
:func:`load_export_masks` reads back.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save, save_file

from loraprune_jax.config import LlamaConfig, LoraConfig
from loraprune_jax.io.errors import CheckpointError
from loraprune_jax.io.hf import CONFIG_FILE, SafetensorsFile, _replace_dir, save_hf_dir
from loraprune_jax.io.remote_code import read_sources
from loraprune_jax.models.llama_params import stack_layers, unstack_layers

# transformers resolves a known model_type locally, without asking to run the directory's code
REMOTE_MODEL_TYPE = "llama"
REMOTE_ARCHITECTURE = "PrunedLlamaForCausalLM"  # contains "Llama": LlamaConfig.from_hf_dict accepts it
AUTO_MAP = {
    "AutoConfig": "configuration_pruned_llama.PrunedLlamaConfig",
    "AutoModelForCausalLM": "modeling_pruned_llama.PrunedLlamaForCausalLM",
}

ADAPTERS_JSON = "adapters.json"
LORA_FILE = "lora.safetensors"
MASKS_FILE = "masks.safetensors"
ADAPTERS_FORMAT = "loraprune-jax-adapters"
ADAPTERS_VERSION = 1
EXPORT_MASKS_FILE = MASKS_FILE  # beside an exported model pruned with weight masks


# HF export -----------------------------------------------------------------------------
def needs_remote_code(config: LlamaConfig) -> bool:
    """Whether plain transformers ``LlamaForCausalLM`` cannot hold ``config``.

    True for per-layer widths, for a model with no heads or no MLP channels, and for a head
    count that does not divide ``hidden_size`` (transformers 5's ``LlamaConfig`` refuses it even
    with an explicit ``head_dim``).
    """
    if not config.is_uniform:
        return True
    heads, ffn = config.heads(0), config.ffn(0)
    return heads == 0 or ffn == 0 or config.hidden_size % heads != 0


def hf_config_dict(config: LlamaConfig) -> dict[str, Any]:
    """The ``config.json`` contents :func:`export_hf` writes for ``config``."""
    out = config.to_hf_dict()
    if not needs_remote_code(config):
        return out
    n = config.num_layers
    heads = max(config.heads(i) for i in range(n))
    kv_heads = max(config.kv_heads(i) for i in range(n))
    if heads == 0 or config.hidden_size % heads:  # LlamaConfig's one check; the lists count
        heads = kv_heads = 1
    out.update(
        architectures=[REMOTE_ARCHITECTURE],
        model_type=REMOTE_MODEL_TYPE,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        auto_map=dict(AUTO_MAP),
        layer_num_heads=[config.heads(i) for i in range(n)],
        layer_num_kv_heads=[config.kv_heads(i) for i in range(n)],
        layer_intermediate_size=[config.ffn(i) for i in range(n)],
    )
    return out


def export_hf(
    out_dir: str | os.PathLike[str],
    config: LlamaConfig,
    base: Mapping[str, Any],
    tokenizer: Any | None = None,
    *,
    overwrite: bool = False,
    extra_files: Mapping[str, str | bytes] | None = None,
    masks: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``base`` (list or stacked layout) as a HF checkpoint directory, atomically.

    Plain ``LlamaForCausalLM`` when transformers can hold ``config``; otherwise with the remote
    code described in the module docstring (load it with ``trust_remote_code=True``). Returns
    the directory. ``extra_files`` (name -> contents) may not replace the files written here.
    ``masks`` (weight-shaped element masks, either layout) are written as ``masks.safetensors``;
    ``base`` should already be zero where they are (``core.elements.apply_element_masks``).
    """
    out_dir = Path(out_dir)
    files: dict[str, str | bytes] = {}
    if masks is not None:
        flat = {k: (v != 0).astype(np.uint8) for k, v in _flatten(unstack_layers(dict(masks))).items()}
        files[EXPORT_MASKS_FILE] = save(flat, metadata={"format": ADAPTERS_FORMAT})
    if needs_remote_code(config):
        files.update(read_sources())
        # save_hf_dir writes extra files after its own config.json, so this one replaces it.
        files[CONFIG_FILE] = json.dumps(hf_config_dict(config), indent=2) + "\n"
    clash = sorted(set(extra_files or {}) & (set(files) | {CONFIG_FILE}))
    if clash:
        raise ValueError(f"extra_files may not replace files export_hf writes: {clash}")
    files.update(extra_files or {})
    save_hf_dir(
        out_dir, config, unstack_layers(dict(base)), tokenizer, overwrite=overwrite, extra_files=files
    )
    return out_dir


def remove_partial_exports(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary and replaced directories (``.NAME.tmp-*``, ``.NAME.old-*``) that an
    :func:`export_hf` or :func:`save_adapters` of ``out_dir`` killed midway left beside it, and
    return them. ``out_dir`` itself is left alone: when it exists it is complete."""
    out_dir = Path(out_dir)
    name = glob.escape(out_dir.name)
    found = sorted(p for kind in ("tmp", "old") for p in out_dir.parent.glob(f".{name}.{kind}-*"))
    for path in found:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return found


# Adapters and masks ----------------------------------------------------------------------
def _flatten(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{"layers": [{"q": {"a": x}}]}`` -> ``{"layers.0.q.a": x}`` (list layout expected)."""
    out: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree.flatten_with_path(tree)[0]:
        parts = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        out[".".join(parts)] = np.ascontiguousarray(np.asarray(leaf))
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`_flatten`: integer name parts index lists."""
    root: dict[str, Any] = {}
    for name, value in flat.items():
        parts = name.split(".")
        node: Any = root
        for part, nxt in zip(parts[:-1], parts[1:]):
            child_is_list = nxt.isdigit()
            key: Any = int(part) if part.isdigit() else part
            if isinstance(node, list):
                while len(node) <= key:
                    node.append(None)
                if node[key] is None:
                    node[key] = [] if child_is_list else {}
                node = node[key]
            else:
                node = node.setdefault(key, [] if child_is_list else {})
        last = parts[-1]
        if isinstance(node, list):
            idx = int(last)
            while len(node) <= idx:
                node.append(None)
            node[idx] = value
        else:
            node[last] = value
    return root


def _is_stacked(tree: Mapping[str, Any] | None) -> bool:
    return tree is not None and isinstance(tree.get("layers"), dict)


def save_adapters(
    out_dir: str | os.PathLike[str],
    lora: Mapping[str, Any] | None,
    masks: Mapping[str, Any] | None,
    lora_cfg: LoraConfig | None,
    config: LlamaConfig,
    *,
    overwrite: bool = False,
) -> Path:
    """Save a run's unmerged LoRA adapters and masks (either layout) with their configs.

    Written into a temporary sibling directory that is renamed into place, so ``out_dir`` is
    either the old contents or the complete new ones. A non-empty ``out_dir`` is only replaced
    with ``overwrite``. Returns the directory.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not overwrite:
            raise FileExistsError(f"{out_dir}: directory exists and is not empty (pass overwrite=True)")
    if lora is not None and lora_cfg is None:
        raise ValueError("save_adapters() got a LoRA tree but no lora_cfg")
    meta = {
        "format": ADAPTERS_FORMAT,
        "version": ADAPTERS_VERSION,
        "lora_config": dataclasses.asdict(lora_cfg) if lora_cfg is not None else None,
        "model_config": json.loads(config.to_json()),
        "has_lora": lora is not None,
        "has_masks": masks is not None,
        "stacked": {"lora": _is_stacked(lora), "masks": _is_stacked(masks)},
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for fname, tree in ((LORA_FILE, lora), (MASKS_FILE, masks)):
            if tree is not None:
                flat = _flatten(unstack_layers(dict(tree)))
                save_file(flat, os.fspath(tmp / fname), metadata={"format": ADAPTERS_FORMAT})
        (tmp / ADAPTERS_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / ADAPTERS_JSON
    if not meta_path.is_file():
        raise CheckpointError(meta_path, "adapters.json not found; not a saved adapters directory")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(meta_path, f"corrupt adapters.json: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != ADAPTERS_FORMAT:
        raise CheckpointError(meta_path, f"not a {ADAPTERS_FORMAT} file")
    if meta.get("version") != ADAPTERS_VERSION:
        raise CheckpointError(meta_path, f"unsupported adapters version {meta.get('version')!r}")
    return meta


def _read_tree(path: Path, stacked: bool) -> dict[str, Any]:
    st = SafetensorsFile(path)
    tree = _unflatten({name: jnp.asarray(np.array(st.get(name))) for name in st.entries})
    layers = tree.get("layers")
    if not isinstance(layers, list) or any(l is None for l in layers):
        raise CheckpointError(path, "tensor names do not form a 'layers.<i>....' tree")
    return stack_layers(tree) if stacked else tree


def load_adapters(
    out_dir: str | os.PathLike[str],
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, LoraConfig | None]:
    """``(lora, masks, lora_cfg)`` saved by :func:`save_adapters`, in the layout they were saved in.

    Raises :class:`CheckpointError` naming the file when something is missing or corrupt.
    """
    path = Path(out_dir)
    meta = _read_meta(path)
    stacked = meta.get("stacked") or {}
    lora = _read_tree(path / LORA_FILE, bool(stacked.get("lora"))) if meta.get("has_lora") else None
    masks = _read_tree(path / MASKS_FILE, bool(stacked.get("masks"))) if meta.get("has_masks") else None
    cfg = meta.get("lora_config")
    try:
        lora_cfg = LoraConfig(**cfg) if cfg is not None else None
    except (TypeError, ValueError) as e:
        raise CheckpointError(path / ADAPTERS_JSON, f"bad lora_config: {e}") from e
    return lora, masks, lora_cfg


def load_export_masks(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The weight masks exported beside a model (``{"layers": [{"q": (in, out) uint8}, ...]}``),
    or ``None`` when the export has none (a structured, sliced model)."""
    path = Path(model_dir) / EXPORT_MASKS_FILE
    if not path.is_file():
        return None
    try:
        tree = _unflatten(load_file(os.fspath(path)))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(path, f"cannot read the exported masks: {e}") from e
    layers = tree.get("layers")
    if not isinstance(layers, list) or any(l is None for l in layers):
        raise CheckpointError(path, "tensor names do not form a 'layers.<i>....' tree")
    return tree


def load_adapters_config(out_dir: str | os.PathLike[str]) -> LlamaConfig:
    """The model :class:`LlamaConfig` recorded next to saved adapters."""
    path = Path(out_dir)
    meta = _read_meta(path)
    try:
        return LlamaConfig(**meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(path / ADAPTERS_JSON, f"bad model_config: {e}") from e


__all__ = [
    "AUTO_MAP",
    "export_hf",
    "hf_config_dict",
    "load_adapters",
    "load_adapters_config",
    "load_export_masks",
    "needs_remote_code",
    "remove_partial_exports",
    "save_adapters",
]
