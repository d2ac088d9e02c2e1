"""LoRA-guided importance (method.md sections 1-3): estimated weight gradients, element scores,
their reduction to structured groups, and the moving average.

All functions are pure and work on one layer's arrays; the train step maps them over layers so
only one layer's element scores exist at a time.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from .groups import (ATTN_IN, ATTN_OUT, MLP_IN, MLP_OUT, Coupling, GroupKind, group_scores,
                     normalize)

Array = jax.Array


def estimate_weight_grad(a: Array, b: Array, grad_a: Array, grad_b: Array) -> Array:
    """Estimated ``dL/dW`` ``(in, out)`` from the LoRA pair and its gradients.

    One SGD step (learning rate 1) on ``A`` and ``B`` moves ``A @ B`` by
    ``-(A @ gB + gA @ B - gA @ gB)``; that change stands in for the gradient of the frozen ``W``.
    Flax layout: ``a: (in, r)``, ``b: (r, out)``.
    """
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    ga, gb = grad_a.astype(jnp.float32), grad_b.astype(jnp.float32)
    return a @ gb + ga @ b - ga @ gb


def lora_guided_importance(
    w: Array,
    a: Array,
    b: Array,
    grad_a: Array,
    grad_b: Array,
    scale: float,
    power: int = 1,
) -> Array:
    """Element importance ``|G_hat * (W + scale * A @ B)| ** power`` (``(in, out)``, float32).

    ``power=1`` is the authors' code, ``power=2`` the paper's formula. A conv kernel's pair
    (``a: (kh, kw, in, r)``) broadcasts over the leading axes.
    """
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    ga, gb = grad_a.astype(jnp.float32), grad_b.astype(jnp.float32)
    # estimate_weight_grad as one rank-2r product, a @ gb + ga @ (b - gb): fewer (in, out) passes
    g = jnp.concatenate([a, ga], axis=-1) @ jnp.concatenate([gb, b - gb], axis=0)
    merged = w.astype(jnp.float32) + (scale * a) @ b
    s = jnp.abs(g * merged)
    return s if power == 1 else s**power


def reduce_to_groups(scores: Array, n_groups: int, axis: int) -> Array:
    """Sum element scores ``(in, out)`` to one score per group along ``axis``.

    ``axis=1`` groups output columns (q, k, v, gate, up: summed over inputs), ``axis=0`` groups
    input rows (o, down: summed over outputs); consecutive channels form a group.
    """
    per_channel = jnp.sum(scores, axis=1 - axis)
    return per_channel.reshape(n_groups, -1).sum(axis=-1) if n_groups else per_channel[:0]


def block_scores(module_scores: Mapping[str, Array]) -> Array:
    """Sum the L2-normalised group scores of the modules of one block (q+k+v+o or gate+up+down)."""
    vectors = [normalize(v) for v in module_scores.values()]
    if not vectors:
        raise ValueError("no module scores to combine")
    return sum(vectors[1:], vectors[0])


def module_axis(name: str) -> int:
    """Axis of a module's kernel that carries its groups (1: output columns, 0: input rows)."""
    if name in ATTN_OUT or name in MLP_OUT:
        return 1
    if name in ATTN_IN or name in MLP_IN:
        return 0
    raise KeyError(f"{name!r} is not a prunable projection")


def layer_group_scores(
    element_scores: Mapping[str, Array], n_units: int, n_channels: int
) -> dict[str, Array]:
    """Group scores of one LLaMA layer from its modules' element scores (keyed by projection).

    Returns ``{"attn": (n_units,), "mlp": (n_channels,)}``; a block with no scored module gets
    zeros. For GQA an attention unit is a KV group: the q columns of its query heads and the
    k/v columns of its KV head, so every module reduces to ``n_units`` groups. This is
    :func:`groups.group_scores` on LLaMA's couplings, with widths read off the scores.
    """
    kinds = {}
    for kind, names, n in (("attn", ATTN_OUT + ATTN_IN, n_units), ("mlp", MLP_OUT + MLP_IN, n_channels)):
        kinds[kind] = GroupKind(n, tuple(
            Coupling((name,), module_axis(name),
                     element_scores[name].shape[module_axis(name)] // n if n else 1)
            for name in names if name in element_scores))
    return group_scores({(name,): s for name, s in element_scores.items()}, kinds)


def lora_layer_scores(
    layer: Mapping[str, Array],
    adapters: Mapping[str, Any],
    grads: Mapping[str, Any],
    scale: float,
    n_units: int,
    power: int = 1,
) -> dict[str, Array]:
    """Group scores of one layer from its LoRA pairs and their gradients (criterion ``lora``)."""
    elements = {
        name: lora_guided_importance(
            layer[name], p["a"], p["b"], grads[name]["a"], grads[name]["b"], scale, power
        )
        for name, p in adapters.items()
    }
    return layer_group_scores(elements, n_units, layer["gate"].shape[-1])


def ema_update(previous: Any, new: Any, beta: float = 0.9) -> tuple[Any, Array]:
    """``beta * previous + (1 - beta) * new``, skipped (previous kept) if any new score is not finite.

    Returns the updated scores and a boolean "skipped" flag, so the caller can log it.
    """
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new)]))
    updated = jax.tree.map(
        lambda p, n: jnp.where(finite, beta * p + (1.0 - beta) * n, p), previous, new
    )
    return updated, jnp.logical_not(finite)
