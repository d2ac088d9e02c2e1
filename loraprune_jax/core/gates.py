"""Gate criteria (method.md section 4b): ``fisher`` and ``taylor`` scores of whole groups from
the gradients of multiplicative gates on the groups' outputs.

A gate multiplies one group's whole contribution to the residual stream (an attention unit's
output before ``o``, an MLP channel's activation before ``down``) and is held at the group's mask
value, so the forward pass and the LoRA gradients do not change. ``d loss / d gate`` is the
first-order Taylor estimate of removing the group, exact per group rather than estimated per
weight, and costs one reduction per group in the backward pass the LoRA step already runs.

Gates carry one value per example (a batch axis before the group axis), so the same backward
pass gives per-example gradients and the Fisher information is the empirical one of Kwon et al.
2022, ``sum over examples of (d loss / d gate)^2``, not the square of a batch mean.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def init_gates(masks: Any, batch_size: int) -> Any:
    """Per-example gates equal to the structured ``masks``: each group vector ``(..., n)`` becomes
    ``(..., batch_size, n)`` (list or stacked layers alike)."""
    def one(m: Array) -> Array:
        m = jnp.asarray(m, jnp.float32)
        return jnp.broadcast_to(m[..., None, :], (*m.shape[:-1], batch_size, m.shape[-1]))

    return jax.tree.map(one, masks)


def fisher_statistic(gate_grads: Any) -> Any:
    """One micro-batch's ``fisher`` scores: the sum over examples of squared gate gradients."""
    return jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)), axis=-2), gate_grads)


def taylor_statistic(gate_grads: Any) -> Any:
    """One micro-batch's ``taylor`` scores: the sum over examples of the signed gate gradients,
    i.e. the gradient of the micro-batch loss (ranked by magnitude)."""
    return jax.tree.map(lambda g: jnp.sum(g.astype(jnp.float32), axis=-2), gate_grads)
