"""Structured groups: which output columns each attention unit and MLP channel couples.

An attention *unit* is one KV head together with the query heads that share it: for multi-head
attention (``kv_heads == heads``) that is exactly one head, for grouped-query attention one KV
group. Masks are small per-layer vectors over units and MLP channels; these helpers expand them
to the columns of the projections they gate.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ..config import LlamaConfig

Array = jax.Array

ATTN_OUT = ("q", "k", "v")  # projections whose output columns an attention unit owns
ATTN_IN = ("o",)  # projections whose input rows an attention unit owns
MLP_OUT = ("gate", "up")
MLP_IN = ("down",)


def num_units(config: LlamaConfig, layer: int) -> int:
    """Attention units of a layer: KV heads (equal to heads for MHA)."""
    return config.kv_heads(layer)


def init_masks(config: LlamaConfig, stacked: bool = False, dtype: Any = jnp.float32) -> dict[str, Any]:
    """All-ones masks: ``{"layers": [{"attn": (units,), "mlp": (ffn,)}, ...]}``.

    With ``stacked=True`` (uniform widths only) the layer vectors are stacked on a leading axis,
    matching a stacked base tree.
    """
    layers = [
        {"attn": jnp.ones((num_units(config, i),), dtype), "mlp": jnp.ones((config.ffn(i),), dtype)}
        for i in range(config.num_layers)
    ]
    if stacked:
        if not config.is_uniform:
            raise ValueError("stacked masks need uniform layer widths")
        return {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    return {"layers": layers}


def expand_unit_mask(mask: Array, heads: int, kv_heads: int, head_dim: int) -> dict[str, Array]:
    """Column masks for q, k and v (and row mask for o) from a per-unit mask of length kv_heads."""
    q_per_unit = (heads // kv_heads) * head_dim if kv_heads else 0
    q_cols = jnp.repeat(mask, q_per_unit, total_repeat_length=heads * head_dim)
    kv_cols = jnp.repeat(mask, head_dim, total_repeat_length=kv_heads * head_dim)
    return {"q": q_cols, "k": kv_cols, "v": kv_cols, "o": q_cols}
