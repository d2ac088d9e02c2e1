"""Mask rewrites between compiled phases: per-layer (uniform) or global ranking of group scores.

Masks and scores share one structure, either a list of per-layer dicts of group kinds
(LLaMA: ``{"layers": [{"attn": (units,), "mlp": (ffn,)}, ...]}``; any declared kinds work, see
``core.groups``, and layers may hold different kinds) or the stacked form
``{"layers": {"attn": (L, units), "mlp": (L, ffn)}}``. The vectors are tiny, so the ranking runs
in numpy on the host; the result keeps the input mask tree's structure, dtype, shape, array type
and (for jax arrays) sharding and committed-ness, so a jitted step taking masks never recompiles.

Counting: a layer with ``n`` groups prunes ``floor(n * ratio + 1e-9)`` of them; the tiny epsilon
absorbs float error (``0.29 * 100 = 28.999999999999996`` must prune 29) and keeps the count
monotone in ``ratio``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .trees import active_layers, like

ALLOCATIONS = ("uniform", "global")
_EPS = 1e-9


def num_to_prune(n_groups: int, ratio: float) -> int:
    """``floor(n_groups * ratio)``, robust to float error."""
    return int(math.floor(n_groups * ratio + _EPS))


# Tree plumbing -----------------------------------------------------------------------------
def kinds_of(tree: Any) -> tuple[str, ...]:
    """The group kinds of a mask or score tree, in order of first appearance over its layers."""
    layers = tree["layers"]
    if isinstance(layers, dict):
        return tuple(layers)
    return tuple(dict.fromkeys(kind for layer in layers for kind in layer))


def _layer_vectors(tree: Any, name: str) -> tuple[int, dict[str, dict[int, np.ndarray]]]:
    """The number of layers and, per kind, ``{layer: numpy vector}`` of the layers holding it,
    from a list or stacked tree."""
    if not isinstance(tree, dict) or "layers" not in tree:
        raise ValueError(f"{name} must be a dict with a 'layers' entry")
    layers = tree["layers"]
    if not isinstance(layers, (dict, list, tuple)):
        raise ValueError(f"{name}['layers'] must be a list of dicts or a dict of stacked arrays")
    out: dict[str, dict[int, np.ndarray]] = {}
    if isinstance(layers, dict):  # stacked
        num_layers = None
        for kind in layers:
            arr = np.asarray(layers[kind])
            if arr.ndim != 2:
                raise ValueError(f"stacked {name}['layers'][{kind!r}] must be 2-D, got {arr.shape}")
            out[kind] = {i: arr[i] for i in range(arr.shape[0])}
            num_layers = arr.shape[0]
        return num_layers or 0, out
    for i, layer in enumerate(layers):
        for kind, v in layer.items():
            v = np.asarray(v)
            if v.ndim != 1:
                raise ValueError(f"{name} layer {i} {kind!r} must be 1-D, got {v.shape}")
            out.setdefault(kind, {})[i] = v
    return len(layers), out


def _rebuild(masks: Any, new: dict[str, dict[int, np.ndarray]]) -> dict[str, Any]:
    """A tree with the structure of ``masks`` holding the ``new`` vectors."""
    layers = masks["layers"]
    out = {k: v for k, v in masks.items() if k != "layers"}
    if isinstance(layers, dict):
        stacked = dict(layers)
        for kind, vectors in new.items():
            stacked[kind] = like(layers[kind], np.stack([vectors[i] for i in sorted(vectors)]))
        out["layers"] = stacked
    else:
        rebuilt = []
        for i, layer in enumerate(layers):
            d = dict(layer)
            for kind, vectors in new.items():
                if i in vectors:
                    d[kind] = like(layer[kind], vectors[i])
            rebuilt.append(d)
        out["layers"] = type(layers)(rebuilt) if isinstance(layers, tuple) else rebuilt
    return out


# Ranking -----------------------------------------------------------------------------------
def _order(kept: np.ndarray, score: np.ndarray, *tiebreak: np.ndarray) -> np.ndarray:
    """Indices sorted by (already pruned first, score ascending, tiebreak ascending)."""
    # np.lexsort sorts by the last key first.
    keys = tuple(reversed(tiebreak)) + (score, kept.astype(np.int8))
    return np.lexsort(keys)


def _prune_uniform(
    kept: np.ndarray, score: np.ndarray, ratio: float, min_keep: int
) -> np.ndarray:
    n = kept.shape[0]
    k = min(num_to_prune(n, ratio), max(n - min_keep, 0))
    already = int(n - kept.sum())
    if k <= already:
        return kept
    order = _order(kept, score, np.arange(n))
    new = kept.copy()
    new[order[:k]] = False
    return new


def _prune_global(
    kept: list[np.ndarray], score: list[np.ndarray], ratio: float, min_keep: int
) -> list[np.ndarray]:
    if not kept:
        return kept
    sizes = np.array([v.shape[0] for v in kept])
    total = int(sizes.sum())
    k = num_to_prune(total, ratio)
    all_kept = np.concatenate(kept)
    already = total - int(all_kept.sum())
    if k <= already:
        return kept
    layer_of = np.repeat(np.arange(len(kept)), sizes)
    index_in = np.concatenate([np.arange(n) for n in sizes])
    order = _order(all_kept, np.concatenate(score), layer_of, index_in)
    # Rank of each group within its own layer, in the global order. Greedy acceptance with a
    # per-layer cap (n_l - min_keep, but never below what is already pruned) accepts exactly the
    # groups whose in-layer rank is below the cap; the first k of those are pruned.
    pruned_per_layer = sizes - np.array([int(v.sum()) for v in kept])
    cap = np.maximum(sizes - min_keep, pruned_per_layer)
    layer_sorted = layer_of[order]
    rank = np.empty(total, dtype=np.int64)
    for layer in range(len(kept)):
        where = np.nonzero(layer_sorted == layer)[0]
        rank[where] = np.arange(where.shape[0])
    eligible = order[rank < cap[layer_sorted]]
    new_all = all_kept.copy()
    new_all[eligible[:k]] = False
    return np.split(new_all, np.cumsum(sizes)[:-1])


def update_masks(
    masks: Any,
    scores: Any,
    ratio: float,
    *,
    excluded: Iterable[int] = (),
    allocation: str = "uniform",
    min_keep: int = 1,
) -> Any:
    """Prune the lowest-scoring groups until each kind reaches ``ratio`` (method.md section 4).

    ``uniform`` (the paper): in every non-excluded layer, ``floor(n * ratio)`` groups of each kind
    are pruned, chosen by the lowest ``score * current_mask``: already-pruned groups count first
    (masks only shrink, a pruned group is never revived even if its score is now the best), then
    the lowest scores, ties broken by lower index. ``global``: per kind, the groups of all
    non-excluded layers are ranked together and ``floor(total * ratio)`` are pruned (ties by
    layer, then index). In both modes at least ``min_keep`` groups per layer and kind are kept
    (unless more were already pruned). Excluded layers are returned unchanged.

    Returns a tree of the same structure, dtypes, shapes and array types as ``masks``.
    """
    if not (0.0 <= ratio < 1.0):
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if min_keep < 0:
        raise ValueError(f"min_keep must be >= 0, got {min_keep}")
    num_layers, m = _layer_vectors(masks, "masks")
    score_layers, s = _layer_vectors(scores, "scores")
    if set(m) != set(s):
        raise ValueError(f"masks have group kinds {sorted(m)}, scores {sorted(s)}")
    if m and score_layers != num_layers:
        raise ValueError(f"masks have {num_layers} layers, scores {score_layers}")
    active = active_layers(num_layers, excluded)

    new: dict[str, dict[int, np.ndarray]] = {}
    for kind in m:
        if set(m[kind]) != set(s[kind]):
            raise ValueError(f"{kind!r}: masks hold it in layers {sorted(m[kind])}, "
                             f"scores in {sorted(s[kind])}")
        kept_l, score_l = {}, {}
        for i, mv in m[kind].items():
            sv = s[kind][i]
            if mv.shape != sv.shape:
                raise ValueError(f"layer {i} {kind!r}: mask {mv.shape} vs scores {sv.shape}")
            sv = sv.astype(np.float64)
            if not np.all(np.isfinite(sv)):
                raise ValueError(f"layer {i} {kind!r}: scores are not all finite")
            kept_l[i] = mv.astype(np.float64) != 0
            score_l[i] = sv
        here = [i for i in active if i in kept_l]
        if allocation == "uniform":
            new_kept = {i: _prune_uniform(kept_l[i], score_l[i], ratio, min_keep) for i in here}
        else:
            res = _prune_global([kept_l[i] for i in here], [score_l[i] for i in here], ratio, min_keep)
            new_kept = dict(zip(here, res))
        vectors = {}
        for i, mv in m[kind].items():
            if i in new_kept:
                newly = kept_l[i] & ~new_kept[i]
                mv = np.where(newly, np.zeros((), mv.dtype), mv)
            vectors[i] = mv
        new[kind] = vectors
    return _rebuild(masks, new)


# Reporting ---------------------------------------------------------------------------------
def mask_stats(masks: Any) -> dict[str, Any]:
    """Kept groups per layer and kept fractions per kind (plain Python, JSON-ready).

    Keys per group kind (LLaMA: ``attn``, ``mlp``): ``{kind}_kept`` (kept counts of the layers
    holding the kind, in layer order), ``{kind}_total`` (their group counts),
    ``{kind}_kept_fraction`` (over all those layers).
    """
    _, m = _layer_vectors(masks, "masks")
    out: dict[str, Any] = {}
    for kind, vectors in m.items():
        kept = [int(np.count_nonzero(vectors[i])) for i in sorted(vectors)]
        total = [int(vectors[i].shape[0]) for i in sorted(vectors)]
        out[f"{kind}_kept"] = kept
        out[f"{kind}_total"] = total
        out[f"{kind}_kept_fraction"] = float(sum(kept) / sum(total)) if sum(total) else 1.0
    return out


__all__: Sequence[str] = ("ALLOCATIONS", "kinds_of", "mask_stats", "num_to_prune", "update_masks")
