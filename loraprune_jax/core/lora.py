"""LoRA pairs in their own pytree: where a weight's pair lives, initialising, applying and merging
pairs, for any model's parameter tree.

A :class:`LoraLayout` says how a LoRA tree names a weight's pair. Ours (:data:`OURS`) mirrors the
parameter tree, ``{"a": (..., in, r), "b": (r, out)}`` at the weight's own path; flax.nnx's
``nnx.LoRALinear`` (:data:`NNX`) keeps ``{"lora_a", "lora_b"}`` in a ``lora`` child beside the
module's ``kernel``. Either way ``W + scale * A @ B`` is the merged weight (flax's LoRA has no
alpha: scale 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from .dropout import dropout as apply_dropout
from .trees import Path, at_path, fresh, set_at_path

Array = jax.Array


@dataclass(frozen=True)
class LoraLayout:
    """How a LoRA tree names the pair of the weight at a path: the pair sits at the weight's own
    path (``sibling`` None) or at ``sibling`` beside a weight called ``weight``; its factors are
    called ``a`` (``(..., in, r)``) and ``b`` (``(r, out)``)."""

    a: str = "a"
    b: str = "b"
    sibling: str | None = None
    weight: str = "kernel"

    def pair_path(self, weight_path: Path) -> Path | None:
        """Where the pair of the weight at ``weight_path`` lives (None: it can have none)."""
        if self.sibling is None:
            return weight_path
        if weight_path[-1] != self.weight:
            return None
        return (*weight_path[:-1], self.sibling)

    def weight_path(self, pair_path: Path) -> Path:
        """The weight a pair found at ``pair_path`` belongs to."""
        return pair_path if self.sibling is None else (*pair_path[:-1], self.weight)


OURS = LoraLayout()
NNX = LoraLayout(a="lora_a", b="lora_b", sibling="lora", weight="kernel")


def pair_at(lora: Any, weight_path: Path, layout: LoraLayout = OURS) -> tuple[Array, Array] | None:
    """``(A, B)`` of the weight at ``weight_path``, or None when it has no pair."""
    if lora is None:
        return None
    path = layout.pair_path(weight_path)
    node = at_path(lora, path, None) if path is not None else None
    if not isinstance(node, dict) or layout.a not in node or layout.b not in node:
        return None
    return node[layout.a], node[layout.b]


def iter_pairs(lora: Any, layout: LoraLayout = OURS, path: Path = ()) -> Iterator[tuple[Path, dict]]:
    """``(pair path, pair dict)`` of every pair in a LoRA tree, in tree order."""
    if isinstance(lora, dict) and layout.a in lora and layout.b in lora:
        yield path, lora
        return
    items = lora.items() if isinstance(lora, dict) else enumerate(lora) if isinstance(lora, list) else ()
    for key, sub in items:
        yield from iter_pairs(sub, layout, (*path, key))


def init_pair(key: Array, kernel_shape: tuple[int, ...], rank: int, dtype: Any = jnp.float32
              ) -> dict[str, Array]:
    """One pair (our names) for a kernel ``(..., in, out)`` (dense or conv HWIO): ``A`` of shape
    ``kernel_shape[:-1] + (rank,)``, Kaiming-uniform with bound ``1 / sqrt(fan_in)`` (``fan_in``
    the product of all but the output axis, as PEFT and PyTorch's ``Conv2d`` do), ``B`` zero, so
    a fresh pair leaves the model unchanged."""
    fan_in = math.prod(kernel_shape[:-1])
    bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
    a = jax.random.uniform(key, (*kernel_shape[:-1], rank), jnp.float32, -bound, bound).astype(dtype)
    return {"a": a, "b": jnp.zeros((rank, kernel_shape[-1]), dtype)}


def lora_linear(
    x: Array,
    w: Array,
    pair: dict[str, Array] | None,
    scale: float,
    dropout: float = 0.0,
    key: Array | None = None,
    matmul: Callable[[Array, Any], Array] | None = None,
) -> Array:
    """``x @ w + scale * (dropout(x) @ a) @ b``, never forming ``w + scale * a @ b``.
    ``matmul`` multiplies ``x`` by a frozen weight that is not a plain array (e.g. int8)."""
    y = x @ w if matmul is None else matmul(x, w)
    if pair is None:
        return y
    # The adapter path runs on (tokens, features): the gradients of A and B then contract one
    # token axis, which XLA's CPU dot takes as laid out; over (batch, seq) it transposes a copy.
    xd = apply_dropout(x, dropout, key).reshape(-1, x.shape[-1])
    delta = (xd @ pair["a"].astype(x.dtype)) @ pair["b"].astype(x.dtype)
    return y + (scale * delta.reshape(y.shape)).astype(y.dtype)


def merge_pair(w: Array, pair: dict[str, Array] | tuple[Array, Array] | None, scale: float) -> Array:
    """``W + scale * A @ B`` computed in float32 and cast back to ``W``'s dtype (numpy in, numpy
    out: merged on the host). ``pair`` is our ``{"a", "b"}`` dict or an ``(A, B)`` tuple."""
    if pair is None:
        return w
    a, b = (pair["a"], pair["b"]) if isinstance(pair, dict) else pair
    if isinstance(w, np.ndarray):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return (w.astype(np.float32) + np.float32(scale) * (a @ b)).astype(w.dtype)
    delta = jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    return (jnp.asarray(w, jnp.float32) + scale * delta).astype(w.dtype)


def merge_pairs(params: Any, lora: Any, scale: float, layout: LoraLayout = OURS) -> Any:
    """``W + scale * A @ B`` at the weight of every pair (a fresh tree; inputs unchanged). The
    pairs themselves are not removed from ``params`` when they live inside it (flax.nnx)."""
    params = fresh(params)
    for path, pair in iter_pairs(lora, layout) if lora is not None else ():
        target = layout.weight_path(path)
        set_at_path(params, target, merge_pair(at_path(params, target),
                                               (pair[layout.a], pair[layout.b]), scale))
    return params


__all__ = ["NNX", "OURS", "LoraLayout", "init_pair", "iter_pairs", "lora_linear", "merge_pair",
           "merge_pairs", "pair_at"]
