"""LoRA-guided importance (method.md sections 1-3): the weight gradient estimated from a LoRA
pair and its gradients, the element scores built on it, and the scores' moving average.

Pure functions on one weight's arrays; ``core.criteria`` reduces the element scores to groups.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

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


def ema_update(previous: Any, new: Any, beta: float = 0.9) -> tuple[Any, Array]:
    """``beta * previous + (1 - beta) * new``, skipped (previous kept) if any new score is not finite.

    Returns the updated scores and a boolean "skipped" flag, so the caller can log it.
    """
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new)]))
    updated = jax.tree.map(
        lambda p, n: jnp.where(finite, beta * p + (1.0 - beta) * n, p), previous, new
    )
    return updated, jnp.logical_not(finite)
