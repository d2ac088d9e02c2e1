"""Element-wise (unstructured) and N:M weight masks: progressive updates, applying, statistics.

Masks and their moving-average scores are weight-shaped, one per masked matrix of each layer: a
list ``{"layers": [{name: (in, out), ...}, ...]}`` or the stacked ``{"layers": {name: (L, in,
out), ...}}`` (LLaMA's are created by ``models.llama_pruning.init_element_masks``). The forward
pass multiplies the *merged* weight by them, ``(W + s * A @ B) * M``, so the export
``merge(W) * M`` has exact zeros where ``M`` is 0 and computes what training saw.

Updates run in numpy on the host between compiled phases, as ``masks.update_masks`` does for the
structured masks, and return a tree with the input masks' structure, dtypes, shapes, array types
and (for jax arrays) shardings, so a jitted step taking masks never recompiles. Masks only
shrink. Ties are broken by position (lower flat index first, then earlier layer and matrix, the
matrices in ``order``, by default sorted by name), so an update is a deterministic function of
``(masks, scores)``.

N:M runs along the input axis (axis 0 of the Flax ``(in, out)`` kernel, the reduction axis of
``x @ W``): in every block of ``m`` consecutive input rows of one output column, ``n`` weights are
kept (2:4 is what sparse tensor cores accelerate). No JAX kernel uses the pattern on CPU or
Hopper GPUs, so here it is a weight mask only: zeros, no speed-up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .masks import ALLOCATIONS, num_to_prune
from .trees import active_layers, like

Order = Sequence[str] | None  # the matrices' tie order; None: sorted by name


def _names(names: Iterable[str], order: Order) -> tuple[str, ...]:
    names = tuple(names)
    if not names:
        raise ValueError("an element mask layer must hold at least one matrix")
    if order is None:
        return tuple(sorted(names))
    unknown = sorted(set(names) - set(order))
    if unknown:
        raise ValueError(f"masked matrices {unknown} are not in the order {tuple(order)}")
    return tuple(n for n in order if n in names)


def check_nm(n: int, m: int) -> None:
    """Raise ``ValueError`` unless ``1 <= n < m`` are integers (keep ``n`` of every ``m``)."""
    for what, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or int(v) != v:
            raise ValueError(f"N:M {what} must be an integer, got {v!r}")
    if not 1 <= n < m:
        raise ValueError(f"N:M needs 1 <= n < m (keep n of every m weights), got n={n}, m={m}")


# Tree plumbing ---------------------------------------------------------------------------------
def _matrices(tree: Any, what: str, order: Order = None) -> list[dict[str, np.ndarray]]:
    """Per layer, ``{name: 2-D numpy array}`` from a list or stacked element tree."""
    if not isinstance(tree, Mapping) or "layers" not in tree:
        raise ValueError(f"{what} must be a dict with a 'layers' entry")
    layers = tree["layers"]
    if isinstance(layers, Mapping):  # stacked
        names = _names(layers, order)
        arrays = {name: np.asarray(layers[name]) for name in names}
        for name, arr in arrays.items():
            if arr.ndim != 3:
                raise ValueError(f"stacked {what}['layers'][{name!r}] must be 3-D, got {arr.shape}")
        n = {arr.shape[0] for arr in arrays.values()}
        if len(n) != 1:
            raise ValueError(f"stacked {what} have different layer counts: {sorted(n)}")
        return [{name: arrays[name][i] for name in names} for i in range(n.pop())]
    if isinstance(layers, (list, tuple)):
        out = []
        for i, layer in enumerate(layers):
            names = _names(layer, order)
            d = {name: np.asarray(layer[name]) for name in names}
            for name, arr in d.items():
                if arr.ndim != 2:
                    raise ValueError(f"{what} layer {i} {name!r} must be 2-D, got {arr.shape}")
            out.append(d)
        return out
    raise ValueError(f"{what}['layers'] must be a list of dicts or a dict of stacked arrays")


def _rebuild(masks: Any, new: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """A tree with the structure of ``masks`` holding the ``new`` matrices."""
    layers = masks["layers"]
    out = {k: v for k, v in masks.items() if k != "layers"}
    if isinstance(layers, Mapping):
        stacked = dict(layers)
        for name in new[0] if new else ():
            stacked[name] = like(layers[name], np.stack([layer[name] for layer in new]))
        out["layers"] = stacked
    else:
        rebuilt = [{**layer, **{k: like(layer[k], v) for k, v in nl.items()}}
                   for layer, nl in zip(layers, new)]
        out["layers"] = type(layers)(rebuilt) if isinstance(layers, tuple) else rebuilt
    return out


def _pair_up(masks: Any, scores: Any, order: Order
             ) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    m, s = _matrices(masks, "masks", order), _matrices(scores, "scores", order)
    if len(m) != len(s):
        raise ValueError(f"masks have {len(m)} layers, scores {len(s)}")
    for i, (ml, sl) in enumerate(zip(m, s)):
        if set(ml) != set(sl):
            raise ValueError(f"layer {i}: masks cover {sorted(ml)}, scores {sorted(sl)}")
        for name in ml:
            if ml[name].shape != sl[name].shape:
                raise ValueError(
                    f"layer {i} {name!r}: mask {ml[name].shape} vs scores {sl[name].shape}"
                )
            if not np.all(np.isfinite(sl[name])):
                raise ValueError(f"layer {i} {name!r}: scores are not all finite")
    return m, s


def _float(scores: np.ndarray) -> np.ndarray:
    return scores.astype(np.result_type(scores.dtype, np.float32), copy=False)


def _lowest(values: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` smallest entries of a 1-D array, ties going to lower indices.

    Equal to taking the first ``k`` of a stable sort, in linear time (a partition and the ties
    at the threshold), which matters for the tens of millions of weights of a global ranking.
    """
    n = values.shape[0]
    out = np.zeros(n, dtype=bool)
    if k <= 0:
        return out
    if k >= n:
        out[:] = True
        return out
    threshold = np.partition(values, k - 1)[k - 1]
    out |= values < threshold
    need = k - int(out.sum())
    out[np.flatnonzero(values == threshold)[:need]] = True
    return out


def _pruned(mask: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``mask`` with zeros where ``keep`` is False (the rest untouched, same dtype)."""
    return np.where(keep, mask, np.zeros((), mask.dtype))


# Unstructured ----------------------------------------------------------------------------------
def update_element_masks(
    masks: Any,
    scores: Any,
    ratio: float,
    *,
    excluded: Iterable[int] = (),
    allocation: str = "uniform",
    order: Order = None,
) -> Any:
    """Zero the lowest-scoring weights until the pruned layers reach ``ratio``.

    ``uniform``: in every non-excluded layer, each masked matrix of ``N`` weights has
    ``floor(N * ratio)`` zeros, chosen by the lowest ``score`` among the weights it still keeps
    (already-pruned weights count first: masks only shrink), ties by lower flat index.
    ``global``: the weights of all non-excluded matrices are ranked together and
    ``floor(total * ratio)`` are zeroed (ties by layer, matrix in ``order``, then index), so matrices
    end with different sparsities. Excluded layers are returned unchanged.

    Returns a tree of the same structure, dtypes, shapes and array types as ``masks``.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    m, s = _pair_up(masks, scores, order)
    active = active_layers(len(m), excluded)
    new = [dict(layer) for layer in m]
    if allocation == "uniform":
        for i in active:
            for name, mask in m[i].items():
                new[i][name] = _prune_matrix(mask, s[i][name], num_to_prune(mask.size, ratio))
        return _rebuild(masks, new)

    slots = [(i, name) for i in active for name in m[i]]
    if not slots:
        return _rebuild(masks, new)
    kept = [m[i][name].reshape(-1) != 0 for i, name in slots]
    total = sum(k.size for k in kept)
    target = num_to_prune(total, ratio)
    if target <= total - sum(int(k.sum()) for k in kept):
        return _rebuild(masks, new)  # already at least as sparse
    dtype = np.result_type(*(s[i][name].dtype for i, name in slots), np.float32)
    effective = np.concatenate([
        np.where(k, s[i][name].reshape(-1).astype(dtype, copy=False), -np.inf)
        for k, (i, name) in zip(kept, slots)
    ])
    prune = _lowest(effective, target)
    del effective
    start = 0
    for k, (i, name) in zip(kept, slots):
        mask = m[i][name]
        new[i][name] = _pruned(mask, ~prune[start:start + k.size].reshape(mask.shape))
        start += k.size
    return _rebuild(masks, new)


def _prune_matrix(mask: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """``mask`` with its ``k`` lowest-scoring weights (already-pruned first) zeroed."""
    kept = mask.reshape(-1) != 0
    if k <= kept.size - int(kept.sum()):
        return mask
    effective = np.where(kept, _float(score).reshape(-1), -np.inf)
    return _pruned(mask, ~_lowest(effective, k).reshape(mask.shape))


# N:M -------------------------------------------------------------------------------------------
def update_nm_masks(
    masks: Any,
    scores: Any,
    fraction: float,
    n: int = 2,
    m: int = 4,
    *,
    excluded: Iterable[int] = (),
    order: Order = None,
) -> Any:
    """Give a ``fraction`` of each pruned matrix's blocks the N:M pattern.

    A block is ``m`` consecutive input rows of one output column of an ``(in, out)`` kernel.
    Its to-be-removed weights are the ``kept - n`` lowest-scoring ones it still keeps (ties by
    lower row); a block keeping ``n`` or fewer is done. In every matrix of a non-excluded layer,
    ``floor(blocks * fraction)`` blocks end up done: the done ones first (masks only shrink),
    then those whose to-be-removed weights have the lowest summed score (ties by block index,
    row-major over ``(in / m, out)``). ``fraction`` is the schedule's progress (current ratio /
    final ratio); at 1 every block keeps exactly ``n`` of its ``m`` weights.

    Returns a tree of the same structure, dtypes, shapes and array types as ``masks``.
    """
    check_nm(n, m)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    ms, ss = _pair_up(masks, scores, order)
    new = [dict(layer) for layer in ms]
    for i in active_layers(len(ms), excluded):
        for name, mask in ms[i].items():
            if mask.shape[0] % m:
                raise ValueError(
                    f"N:M {n}:{m}: layer {i} {name!r} has input dimension {mask.shape[0]}, "
                    f"not divisible by M={m}"
                )
            new[i][name] = _nm_matrix(mask, ss[i][name], fraction, n, m)
    return _rebuild(masks, new)


def _blocks(x: np.ndarray, m: int) -> np.ndarray:
    """``(in, out)`` -> ``(in / m * out, m)``: row ``b * out + c`` is block ``b`` of column ``c``."""
    rows, cols = x.shape
    return x.reshape(rows // m, m, cols).transpose(0, 2, 1).reshape(-1, m)


def _unblocks(x: np.ndarray, rows: int, cols: int, m: int) -> np.ndarray:
    return x.reshape(rows // m, cols, m).transpose(0, 2, 1).reshape(rows, cols)


def _nm_matrix(mask: np.ndarray, score: np.ndarray, fraction: float, n: int, m: int) -> np.ndarray:
    rows, cols = mask.shape
    kept = _blocks(mask != 0, m)
    done = kept.sum(axis=1) <= n
    target = num_to_prune(kept.shape[0], fraction)
    if target <= int(done.sum()):
        return mask
    effective = np.where(kept, _blocks(_float(score), m), -np.inf)
    drop = np.argsort(effective, axis=1, kind="stable")[:, : m - n]  # lowest first, ties by row
    dropped = np.take_along_axis(effective, drop, axis=1)
    cost = np.where(np.isfinite(dropped), dropped, 0.0).sum(axis=1)
    cost = np.where(done, -np.inf, cost)  # done blocks count first
    chosen = np.flatnonzero(_lowest(cost, target) & ~done)
    new_kept = kept.copy()
    new_kept[chosen[:, None], drop[chosen]] = False
    return _pruned(mask, _unblocks(new_kept, rows, cols, m))


def nm_fraction(mask: Any, n: int = 2, m: int = 4) -> float:
    """Fraction of a matrix's N:M blocks (``m`` consecutive input rows of a column) that keep at
    most ``n`` weights; 1.0 when the whole matrix follows the pattern."""
    check_nm(n, m)
    arr = np.asarray(mask)
    if arr.ndim != 2 or arr.shape[0] % m:
        raise ValueError(f"expected an (in, out) mask with in divisible by {m}, got {arr.shape}")
    blocks = _blocks(arr != 0, m)
    return float(np.mean(blocks.sum(axis=1) <= n)) if blocks.size else 1.0


# Applying and reporting ------------------------------------------------------------------------
def apply_element_masks(base: Mapping[str, Any], masks: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with every masked projection's weight zeroed where its mask is 0 (exact zeros,
    the weight's dtype kept); numpy in, numpy out. Both trees must share one layout."""
    layers, mask_layers = base["layers"], masks["layers"]
    if isinstance(layers, Mapping) != isinstance(mask_layers, Mapping):
        raise ValueError("base and masks must both be stacked or both be layer lists")

    def zero(w: Any, mk: Any) -> Any:
        if tuple(w.shape) != tuple(mk.shape):
            raise ValueError(f"weight {tuple(w.shape)} vs mask {tuple(mk.shape)}")
        if isinstance(w, np.ndarray):
            return np.where(np.asarray(mk) != 0, w, np.zeros((), w.dtype))
        return jnp.where(mk != 0, w, jnp.zeros((), w.dtype))

    def one(layer: Mapping[str, Any], mask: Mapping[str, Any]) -> dict[str, Any]:
        return {**layer, **{name: zero(layer[name], mask[name]) for name in mask}}

    if isinstance(layers, Mapping):
        return {**base, "layers": one(layers, mask_layers)}
    if len(layers) != len(mask_layers):
        raise ValueError(f"base has {len(layers)} layers, masks {len(mask_layers)}")
    return {**base, "layers": [one(l, mk) for l, mk in zip(layers, mask_layers)]}


def sparsity_stats(masks: Any, excluded: Iterable[int] = (), *, order: Order = None,
                   families: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Achieved sparsity (fraction of zeros) of element masks, JSON-ready.

    Keys: ``zeros``, ``total`` and ``sparsity`` over every masked matrix; ``projections``
    (``{name: sparsity}`` over all layers, names in ``order``); ``layers`` (per-layer sparsity);
    ``pruned_layers`` (``sparsity`` and ``projections`` over the non-excluded layers only, where
    the target ratio applies); and per family of ``families`` (LLaMA: ``attn`` = q, k, v, o and
    ``mlp`` = gate, up, down) ``{family}_kept``, the kept fraction of its matrices' weights.
    """
    mats = _matrices(masks, "masks", order)
    active = set(active_layers(len(mats), excluded))
    zeros: dict[tuple[int, str], int] = {}
    sizes: dict[tuple[int, str], int] = {}
    for i, layer in enumerate(mats):
        for name, mk in layer.items():
            zeros[i, name] = int(mk.size - np.count_nonzero(mk))
            sizes[i, name] = int(mk.size)

    def frac(keys: list[tuple[int, str]]) -> float:
        total = sum(sizes[k] for k in keys)
        return sum(zeros[k] for k in keys) / total if total else 0.0

    names = list(dict.fromkeys(name for layer in mats for name in layer))
    every = list(sizes)
    pruned = [k for k in every if k[0] in active]
    out = {
        "zeros": sum(zeros.values()),
        "total": sum(sizes.values()),
        "sparsity": frac(every),
        "projections": {p: frac([k for k in every if k[1] == p]) for p in names},
        "layers": [frac([k for k in every if k[0] == i]) for i in range(len(mats))],
        "pruned_layers": {
            "sparsity": frac(pruned),
            "projections": {p: frac([k for k in pruned if k[1] == p]) for p in names},
        },
    }
    for family, members in (families or {}).items():
        out[f"{family}_kept"] = 1.0 - frac([k for k in every if k[1] in members])
    return out


__all__: Sequence[str] = (
    "apply_element_masks",
    "check_nm",
    "nm_fraction",
    "sparsity_stats",
    "update_element_masks",
    "update_nm_masks",
)
