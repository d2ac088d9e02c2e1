"""Masks on a declared model's weights, and physical pruning (method.md, section 5): cut the
masked groups out of every coupled weight and fold LoRA in.

During training the masks only zero the pruned groups (:func:`apply_masks` does it on the
weights themselves for a model whose forward pass takes no masks). At the end the pruned groups
are removed for real from every weight the declaration couples to them, and LoRA is merged as
``W + scale * A @ B``: a smaller dense tree whose outputs equal the masked model's up to float
rounding. Works for any parameter tree and LoRA naming (``core.lora.LoraLayout``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .groups import Coupling, Declaration, expand_mask
from .lora import OURS, LoraLayout, merge_pairs
from .trees import at_path, fresh, set_at_path, unstack

Array = jax.Array


def _mask_vector(value: Any, layer: int, kind: str, size: int) -> np.ndarray:
    """A layer's mask as a float numpy vector, checked to be exactly 0/1 and of the right size."""
    arr = np.asarray(value).astype(np.float32)
    if arr.shape != (size,):
        raise ValueError(f"masks layer {layer} {kind!r}: expected shape ({size},), got {arr.shape}")
    bad = ~((arr == 0.0) | (arr == 1.0))
    if bad.any():
        idx = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"masks layer {layer} {kind!r} must be exactly 0 or 1 to slice; "
            f"entry {idx} is {arr[idx]!r} ({int(bad.sum())} bad entries)"
        )
    return arr


def kept_groups(masks: dict[str, Any], declaration: Declaration) -> list[dict[str, np.ndarray]]:
    """Per mask layer and group kind, the ids of the kept groups (``int64``), checking that every
    mask is exactly 0/1 and sized as the declaration says. ``masks`` may be stacked."""
    layers = unstack(masks)["layers"]
    if len(layers) != len(declaration):
        raise ValueError(f"masks have {len(layers)} layers, the declaration {len(declaration)}")
    out = []
    for i, (mask_layer, kinds) in enumerate(zip(layers, declaration)):
        missing = set(kinds) - set(mask_layer)
        if missing:
            raise ValueError(f"masks layer {i} lacks the group kinds {sorted(missing)}")
        out.append({kind: np.flatnonzero(_mask_vector(mask_layer[kind], i, kind, g.size)).astype(np.int64)
                    for kind, g in kinds.items()})
    return out


def _take(x: Any, idx: np.ndarray, axis: int) -> Any:
    """``take`` that keeps numpy arrays on the host and jax arrays on their devices."""
    return np.take(x, idx, axis=axis) if isinstance(x, np.ndarray) else jnp.take(x, idx, axis=axis)


def _rewrite(params: Any, lora: Any, declaration: Declaration, layout: LoraLayout,
             along: Callable[[int, str, Any, Coupling, Any, int], Any]) -> tuple[Any, Any]:
    """Fresh ``(params, lora)`` with every coupled weight, and the side of its LoRA pair that
    follows the coupling axis (``B``'s columns for the output axis, ``A`` along the same axis
    otherwise), replaced by ``along(layer, kind, group_kind, coupling, array, axis)``. ``lora``
    may be ``params`` itself (flax.nnx keeps the pairs beside the kernels)."""
    same = lora is params
    params = fresh(params)
    lora = params if same else fresh(lora)
    for i, kinds in enumerate(declaration):
        for kind, g in kinds.items():
            for c in g.couplings:
                w = at_path(params, c.path)
                axis = c.axis % w.ndim
                if w.shape[axis] != g.size * c.width:
                    raise ValueError(f"layer {i} {kind!r}: {c.path} has {w.shape[axis]} entries "
                                     f"on axis {c.axis}, the declaration {g.size} x {c.width}")
                set_at_path(params, c.path, along(i, kind, g, c, w, axis))
                pair_path = layout.pair_path(c.path) if lora is not None else None
                pair = at_path(lora, pair_path, None) if pair_path is not None else None
                if isinstance(pair, dict) and layout.a in pair:
                    side, pair_axis = (layout.b, -1) if axis == w.ndim - 1 else (layout.a, axis)
                    pair[side] = along(i, kind, g, c, pair[side], pair_axis)
    return params, lora


def slice_params(params: Any, declaration: Declaration, kept: list[dict[str, np.ndarray]],
                 lora: Any = None, layout: LoraLayout = OURS) -> tuple[Any, Any]:
    """Cut every coupled weight down to its kept groups: ``(params, lora)`` sliced (not merged).

    A pair ``A (..., r)``, ``B (r, out)`` of a sliced weight follows it: ``B``'s columns when the
    coupling axis is the weight's last (output) axis, ``A`` along the same axis otherwise. Inputs
    are not modified; numpy arrays stay numpy (sliced on the host). ``lora`` may be ``params``
    itself when the pairs live inside it (flax.nnx): the pairs are then sliced in the result.
    """
    def take(i: int, kind: str, g: Any, c: Coupling, x: Any, axis: int) -> Any:
        idx = (kept[i][kind][:, None] * c.width + np.arange(c.width)[None, :]).reshape(-1)
        return _take(x, idx, axis)

    return _rewrite(params, lora, declaration, layout, take)


def slice_declared(params: Any, lora: Any, masks: Any, declaration: Declaration, scale: float,
                   layout: LoraLayout = OURS) -> Any:
    """The smaller dense parameter tree of any declared model: slice the masked groups, then merge
    LoRA (equal to merging then slicing, without a full-width merged weight)."""
    sliced, sliced_lora = slice_params(params, declaration, kept_groups(masks, declaration), lora, layout)
    return merge_pairs(sliced, sliced_lora, scale, layout)


def apply_masks(params: Any, masks: Any, declaration: Declaration, lora: Any = None,
                layout: LoraLayout = OURS) -> tuple[Any, Any]:
    """``(params, lora)`` with every pruned group's entries zeroed in every coupled weight (and in
    the pair's ``B`` columns or ``A`` rows that follow it), for a model whose forward pass takes
    no masks: call it inside the loss, so pruned entries get zero gradients.

    This equals gating the groups' outputs, and the masked model equals :func:`slice_declared`'s
    smaller one, when the declaration couples every weight that writes or reads a group (biases
    included). It does not where the group axis meets an operation the declaration cannot see: a
    normalisation over the grouped features (LayerNorm/RMSNorm statistics change when features
    are zeroed rather than removed), a weight shared with an undeclared use (tied embeddings), or
    a nonlinearity ``f`` with ``f(0) != 0`` between a zeroed producer and an undeclared consumer.
    Such models need the masks in their forward pass (as ``models.llama`` takes them).
    """
    mask_layers = unstack(masks)["layers"]
    if len(mask_layers) != len(declaration):
        raise ValueError(f"masks have {len(mask_layers)} layers, the declaration {len(declaration)}")
    for i, kinds in enumerate(declaration):
        for kind, g in kinds.items():
            if kind not in mask_layers[i]:
                raise ValueError(f"masks layer {i} lacks the group kind {kind!r}")
            if tuple(mask_layers[i][kind].shape) != (g.size,):
                raise ValueError(f"masks layer {i} {kind!r}: expected shape ({g.size},), "
                                 f"got {tuple(mask_layers[i][kind].shape)}")

    def zero(i: int, kind: str, g: Any, c: Coupling, x: Any, axis: int) -> Any:
        return _scale_axis(x, expand_mask(mask_layers[i][kind], c.width), axis)

    return _rewrite(params, lora, declaration, layout, zero)


def _scale_axis(x: Any, v: Any, axis: int) -> Any:
    """``x`` times the vector ``v`` along ``axis`` (in ``x``'s dtype)."""
    axis = axis % x.ndim
    shape = [1] * x.ndim
    shape[axis] = v.shape[0]
    return x * jnp.reshape(v, shape).astype(x.dtype)


__all__ = ["apply_masks", "kept_groups", "slice_declared", "slice_params"]
