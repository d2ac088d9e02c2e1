"""Mask rewrites between compiled phases: per-layer (uniform) or global ranking of group scores.

Masks and scores share one structure, either a list of per-layer dicts of group kinds
(LLaMA: ``{"layers": [{"attn": (units,), "mlp": (ffn,)}, ...]}``; any declared kinds work, see
``pruning.groups``) or the stacked form ``{"layers": {"attn": (L, units), "mlp": (L, ffn)}}``. The vectors are tiny, so the ranking runs
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

import jax
import jax.numpy as jnp
import numpy as np

from ..config import LlamaConfig

ALLOCATIONS = ("uniform", "global")
_EPS = 1e-9


def num_to_prune(n_groups: int, ratio: float) -> int:
    """``floor(n_groups * ratio)``, robust to float error."""
    return int(math.floor(n_groups * ratio + _EPS))


def excluded_layers(
    num_layers: int, first_fraction: float = 0.1, last: bool = True
) -> tuple[int, ...]:
    """Layers never pruned by default (method.md).

    Those with index ``< int(first_fraction * L)``, and the last one when ``last``.
    """
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    if not 0.0 <= first_fraction <= 1.0:
        raise ValueError(f"first_fraction must be in [0, 1], got {first_fraction}")
    out = set(range(int(first_fraction * num_layers)))
    if last and num_layers > 0:
        out.add(num_layers - 1)
    return tuple(sorted(out))


# Tree plumbing -----------------------------------------------------------------------------
def kinds_of(tree: Any) -> tuple[str, ...]:
    """The group kinds of a mask or score tree (the keys of its layer dicts, in order)."""
    layers = tree["layers"]
    if isinstance(layers, dict):
        return tuple(layers)
    return tuple(layers[0]) if len(layers) else ()


def _layer_vectors(tree: Any, name: str) -> dict[str, list[np.ndarray]]:
    """Per kind, a list of per-layer numpy vectors from a list or stacked tree."""
    if not isinstance(tree, dict) or "layers" not in tree:
        raise ValueError(f"{name} must be a dict with a 'layers' entry")
    layers = tree["layers"]
    if not isinstance(layers, (dict, list, tuple)):
        raise ValueError(f"{name}['layers'] must be a list of dicts or a dict of stacked arrays")
    kinds = kinds_of(tree)
    out: dict[str, list[np.ndarray]] = {}
    if isinstance(layers, dict):  # stacked
        for kind in kinds:
            arr = np.asarray(layers[kind])
            if arr.ndim != 2:
                raise ValueError(f"stacked {name}['layers'][{kind!r}] must be 2-D, got {arr.shape}")
            out[kind] = [arr[i] for i in range(arr.shape[0])]
    else:
        for i, layer in enumerate(layers):
            if tuple(layer) != kinds:
                raise ValueError(f"{name} layer {i} has kinds {tuple(layer)}, layer 0 {kinds}")
        for kind in kinds:
            out[kind] = [np.asarray(layer[kind]) for layer in layers]
            for i, v in enumerate(out[kind]):
                if v.ndim != 1:
                    raise ValueError(f"{name} layer {i} {kind!r} must be 1-D, got {v.shape}")
    return out


def _like(template: Any, value: np.ndarray) -> Any:
    """``value`` as the same kind of array as ``template`` (dtype, and sharding for jax arrays)."""
    value = np.asarray(value, dtype=template.dtype).reshape(template.shape)
    if isinstance(template, jax.Array):
        if getattr(template, "committed", True):
            # Same sharding and committed-ness, so jit's cache key is unchanged; works per
            # process on multi-host meshes (each process fills its addressable shards).
            return jax.make_array_from_callback(value.shape, template.sharding, lambda i: value[i])
        return jnp.asarray(value)
    return value


def _rebuild(masks: Any, new: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    """A tree with the structure of ``masks`` holding the ``new`` vectors."""
    layers = masks["layers"]
    out = {k: v for k, v in masks.items() if k != "layers"}
    if isinstance(layers, dict):
        stacked = dict(layers)
        for kind in new:
            stacked[kind] = _like(layers[kind], np.stack(new[kind]))
        out["layers"] = stacked
    else:
        rebuilt = []
        for i, layer in enumerate(layers):
            d = dict(layer)
            for kind in new:
                d[kind] = _like(layer[kind], new[kind][i])
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
    m = _layer_vectors(masks, "masks")
    s = _layer_vectors(scores, "scores")
    if set(m) != set(s):
        raise ValueError(f"masks have group kinds {sorted(m)}, scores {sorted(s)}")
    num_layers = len(next(iter(m.values()))) if m else 0
    if m and len(next(iter(s.values()))) != num_layers:
        raise ValueError(f"masks have {num_layers} layers, scores {len(next(iter(s.values())))}")
    skip = set()
    for i in excluded:
        j = int(i) + num_layers if int(i) < 0 else int(i)
        if not 0 <= j < num_layers:
            raise ValueError(f"excluded layer {i} is out of range for {num_layers} layers")
        skip.add(j)
    active = [i for i in range(num_layers) if i not in skip]

    new: dict[str, list[np.ndarray]] = {}
    for kind in m:
        kept_l, score_l = [], []
        for i in range(num_layers):
            mv, sv = m[kind][i], s[kind][i]
            if mv.shape != sv.shape:
                raise ValueError(f"layer {i} {kind!r}: mask {mv.shape} vs scores {sv.shape}")
            sv = sv.astype(np.float64)
            if not np.all(np.isfinite(sv)):
                raise ValueError(f"layer {i} {kind!r}: scores are not all finite")
            kept_l.append(mv.astype(np.float64) != 0)
            score_l.append(sv)
        if allocation == "uniform":
            new_kept = {i: _prune_uniform(kept_l[i], score_l[i], ratio, min_keep) for i in active}
        else:
            res = _prune_global(
                [kept_l[i] for i in active], [score_l[i] for i in active], ratio, min_keep
            )
            new_kept = dict(zip(active, res))
        vectors = []
        for i in range(num_layers):
            mv = m[kind][i]
            if i in new_kept:
                newly = kept_l[i] & ~new_kept[i]
                mv = np.where(newly, np.zeros((), mv.dtype), mv)
            vectors.append(mv)
        new[kind] = vectors
    return _rebuild(masks, new)


# Reporting ---------------------------------------------------------------------------------
def mask_stats(masks: Any) -> dict[str, Any]:
    """Kept groups per layer and kept fractions per kind (plain Python, JSON-ready).

    Keys per group kind (LLaMA: ``attn``, ``mlp``): ``{kind}_kept`` (per-layer kept counts),
    ``{kind}_total`` (per-layer group counts), ``{kind}_kept_fraction`` (over all layers).
    """
    m = _layer_vectors(masks, "masks")
    out: dict[str, Any] = {}
    for kind in m:
        kept = [int(np.count_nonzero(v)) for v in m[kind]]
        total = [int(v.shape[0]) for v in m[kind]]
        out[f"{kind}_kept"] = kept
        out[f"{kind}_total"] = total
        out[f"{kind}_kept_fraction"] = float(sum(kept) / sum(total)) if sum(total) else 1.0
    return out


def masked_widths(
    config: LlamaConfig, masks: Any
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Per-layer ``(heads, kv_heads, ffn)`` the masks leave (an attention unit is one KV group)."""
    stats = mask_stats(masks)
    if len(stats["attn_kept"]) != config.num_layers:
        raise ValueError(f"masks have {len(stats['attn_kept'])} layers, config {config.num_layers}")
    heads, kv_heads = [], []
    for i, units in enumerate(stats["attn_kept"]):
        per_unit = config.heads(i) // config.kv_heads(i) if config.kv_heads(i) else 0
        heads.append(units * per_unit)
        kv_heads.append(units)
    return tuple(heads), tuple(kv_heads), tuple(stats["mlp_kept"])


def masked_num_params(config: LlamaConfig, masks: Any) -> int:
    """Parameter count of the dense model left after slicing away the masked groups."""
    return config.with_widths(*masked_widths(config, masks)).num_params()


__all__: Sequence[str] = (
    "excluded_layers",
    "kinds_of",
    "mask_stats",
    "masked_num_params",
    "masked_widths",
    "num_to_prune",
    "update_masks",
)
