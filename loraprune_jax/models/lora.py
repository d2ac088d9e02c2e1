"""LoRA adapters held in their own pytree, and the LoRA linear map that never merges them."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import LoraConfig
from .dropout import dropout as apply_dropout

Array = jax.Array


def init_pair(key: Array, kernel_shape: tuple[int, ...], rank: int, dtype: Any = jnp.float32
              ) -> dict[str, Array]:
    """One LoRA pair for a kernel ``(..., in, out)`` (dense or conv HWIO): ``A`` of shape
    ``kernel_shape[:-1] + (rank,)``, Kaiming-uniform with bound ``1 / sqrt(fan_in)`` (``fan_in``
    the product of all but the output axis, as PEFT and PyTorch's ``Conv2d`` do), ``B`` zero."""
    fan_in = math.prod(kernel_shape[:-1])
    bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
    a = jax.random.uniform(key, (*kernel_shape[:-1], rank), jnp.float32, -bound, bound).astype(dtype)
    return {"a": a, "b": jnp.zeros((rank, kernel_shape[-1]), dtype)}


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


def lora_linear(
    x: Array,
    w: Array,
    pair: dict[str, Array] | None,
    scale: float,
    dropout: float = 0.0,
    key: Array | None = None,
) -> Array:
    """``x @ w + scale * (dropout(x) @ a) @ b``, never forming ``w + scale * a @ b``."""
    y = x @ w
    if pair is None:
        return y
    # The adapter path runs on (tokens, features): the gradients of A and B then contract one
    # token axis, which XLA's CPU dot takes as laid out; over (batch, seq) it transposes a copy.
    xd = apply_dropout(x, dropout, key).reshape(-1, x.shape[-1])
    delta = (xd @ pair["a"].astype(x.dtype)) @ pair["b"].astype(x.dtype)
    return y + (scale * delta.reshape(y.shape)).astype(y.dtype)


def merge_pair(w: Array, pair: dict[str, Array] | None, scale: float) -> Array:
    """``W + scale * A @ B`` computed in float32 and cast back to ``W``'s dtype (numpy in, numpy
    out: merged on the host)."""
    if pair is None:
        return w
    if isinstance(w, np.ndarray):
        a, b = (np.asarray(pair[k], np.float32) for k in ("a", "b"))
        return (w.astype(np.float32) + np.float32(scale) * (a @ b)).astype(w.dtype)
    delta = jnp.matmul(jnp.asarray(pair["a"], jnp.float32), jnp.asarray(pair["b"], jnp.float32))
    return (jnp.asarray(w, jnp.float32) + scale * delta).astype(w.dtype)


def merge_lora(base: dict[str, Any], lora: dict[str, Any] | None, lora_cfg: LoraConfig) -> dict[str, Any]:
    """A new base tree with ``W + scale * A @ B`` folded in (for export and fast inference)."""
    if lora is None:
        return base
    scale = lora_cfg.scale

    def merge_layer(layer: dict[str, Array], adapters: dict[str, Any]) -> dict[str, Array]:
        return {**layer, **{name: merge_pair(layer[name], p, scale) for name, p in adapters.items()}}

    merged = dict(base)
    if isinstance(base["layers"], dict):
        merged["layers"] = merge_layer(base["layers"], lora["layers"])
    else:
        merged["layers"] = [merge_layer(l, a) for l, a in zip(base["layers"], lora["layers"])]
    return merged


def count_lora_params(lora: dict[str, Any]) -> int:
    """Number of trainable LoRA parameters."""
    return int(sum(x.size for x in jax.tree.leaves(lora)))


__all__ = ["init_lora", "lora_linear", "merge_lora", "merge_pair", "count_lora_params"]
