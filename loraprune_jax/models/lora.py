"""LoRA adapters for the LLaMA base tree: one pair per targeted projection of every layer, in
a tree that mirrors the base's layer layout (list or stacked)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ..config import LoraConfig
from ..core.lora import init_pair, merge_pair, merge_pairs

Array = jax.Array


def init_lora(
    key: Array,
    base: dict[str, Any],
    lora_cfg: LoraConfig,
    dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """LoRA pairs for every targeted projection of ``base``: ``A`` He-uniform, ``B`` zero.

    The result mirrors ``base``'s layer structure (a list of per-layer dicts, or one dict of
    stacked arrays when ``base["layers"]`` is stacked), with ``{"a": (in, r), "b": (r, out)}``
    per targeted projection. ``A`` uses Kaiming-uniform with ``a = sqrt(5)`` as PEFT does
    (bound ``1 / sqrt(in)``), so a freshly initialised model equals its base model.
    """
    layers = base["layers"]
    stacked = isinstance(layers, dict)
    n_layers = layers["q"].shape[0] if stacked else len(layers)
    keys = jax.random.split(key, n_layers * len(lora_cfg.targets)).reshape(
        n_layers, len(lora_cfg.targets), -1
    )
    out_layers = []
    for i in range(n_layers):
        layer = jax.tree.map(lambda x: x[i], layers) if stacked else layers[i]
        out_layers.append(
            {name: init_pair(keys[i, j], layer[name].shape, lora_cfg.rank, dtype)
             for j, name in enumerate(lora_cfg.targets)}
        )
    if stacked:
        return {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *out_layers)}
    return {"layers": out_layers}


def merge_lora(base: dict[str, Any], lora: dict[str, Any] | None, lora_cfg: LoraConfig) -> dict[str, Any]:
    """A new base tree with ``W + scale * A @ B`` folded in (for export and fast inference)."""
    if lora is None:
        return base
    if isinstance(base["layers"], dict):  # stacked: each pair merges along the layer axis at once
        layers = base["layers"]
        return {**base, "layers": {**layers, **{name: merge_pair(layers[name], pair, lora_cfg.scale)
                                                for name, pair in lora["layers"].items()}}}
    return merge_pairs(base, lora, lora_cfg.scale)


def count_lora_params(lora: dict[str, Any]) -> int:
    """Number of trainable LoRA parameters."""
    return int(sum(x.size for x in jax.tree.leaves(lora)))


__all__ = ["count_lora_params", "init_lora", "merge_lora"]
