"""Physical pruning: cut masked groups out of the weights and fold LoRA in (method.md, section 5).

During training the masks only zero the outputs of pruned groups. At the end the pruned groups
are removed for real: each kept attention unit keeps its ``H/K`` query heads (q columns, o rows)
and its KV head (k/v columns), each kept MLP channel its gate/up column and down row, and LoRA is
merged as ``W + scale * A @ B``. The result is a smaller dense base tree (list layout, widths may
differ per layer) whose logits equal those of the masked, unmerged model up to float rounding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import PROJECTIONS, LlamaConfig, LoraConfig
from .groups import Declaration, at_path, init_masks, llama_declaration

# A module import (names resolved at call time): models.llama imports pruning.groups, so
# ``from ..models.llama import ...`` here would be circular when the package re-exports slicing.
from ..models import llama as _llama
from ..models import lora as _lora

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


def kept_indices(masks: dict[str, Any] | None, config: LlamaConfig) -> list[dict[str, np.ndarray]]:
    """Per layer, the ids that survive slicing (numpy ``int64`` vectors).

    Keys: ``"units"`` (kept attention units = KV heads), ``"heads"`` (kept query heads),
    ``"q"`` (kept columns of q = rows of o), ``"kv"`` (kept columns of k and v) and ``"mlp"``
    (kept MLP channels). ``masks`` may be stacked or ``None`` (everything kept). Raises
    ``ValueError`` when a mask is not exactly 0/1 or has the wrong size.
    """
    mask_layers = _llama.unstack_layers(masks)["layers"] if masks is not None else None
    if mask_layers is not None and len(mask_layers) != config.num_layers:
        raise ValueError(f"masks have {len(mask_layers)} layers, config says {config.num_layers}")
    hd = config.head_dim
    out = []
    for i in range(config.num_layers):
        h, kv, f = config.heads(i), config.kv_heads(i), config.ffn(i)
        if mask_layers is None:
            attn, mlp = np.ones(kv, np.float32), np.ones(f, np.float32)
        else:
            attn = _mask_vector(mask_layers[i]["attn"], i, "attn", kv)
            mlp = _mask_vector(mask_layers[i]["mlp"], i, "mlp", f)
        g = h // kv if kv else 0
        units = np.flatnonzero(attn).astype(np.int64)
        heads = (units[:, None] * g + np.arange(g)[None, :]).reshape(-1)
        q_cols = (heads[:, None] * hd + np.arange(hd)[None, :]).reshape(-1)
        kv_cols = (units[:, None] * hd + np.arange(hd)[None, :]).reshape(-1)
        out.append(
            {
                "units": units,
                "heads": heads.astype(np.int64),
                "q": q_cols.astype(np.int64),
                "kv": kv_cols.astype(np.int64),
                "mlp": np.flatnonzero(mlp).astype(np.int64),
            }
        )
    return out


def kept_groups(masks: dict[str, Any], declaration: Declaration) -> list[dict[str, np.ndarray]]:
    """Per mask layer and group kind, the ids of the kept groups (``int64``), checking that every
    mask is exactly 0/1 and sized as the declaration says. ``masks`` may be stacked."""
    layers = _llama.unstack_layers(masks)["layers"]
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


def _set(tree: Any, path: tuple, value: Any) -> None:
    at_path(tree, path[:-1])[path[-1]] = value


def _take(x: Any, idx: np.ndarray, axis: int) -> Any:
    """``take`` that keeps numpy arrays on the host and jax arrays on their devices."""
    return np.take(x, idx, axis=axis) if isinstance(x, np.ndarray) else jnp.take(x, idx, axis=axis)


def _pairs(tree: Any, path: tuple = ()) -> list[tuple[tuple, dict[str, Any]]]:
    """``(path, {"a", "b"})`` of every LoRA pair in a LoRA tree."""
    if isinstance(tree, dict) and set(tree) == {"a", "b"}:
        return [(path, tree)]
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    return [p for key, sub in items for p in _pairs(sub, (*path, key))]


def slice_params(
    params: Any, declaration: Declaration, kept: list[dict[str, np.ndarray]], lora: Any = None
) -> tuple[Any, Any]:
    """Cut every coupled weight down to its kept groups: ``(params, lora)`` sliced (not merged).

    A pair ``A (..., r)``, ``B (r, out)`` of a sliced weight follows it: ``B``'s columns when the
    coupling axis is the weight's last (output) axis, ``A`` along the same axis otherwise. Inputs
    are not modified; numpy arrays stay numpy (sliced on the host).
    """
    params = jax.tree.map(lambda x: x, params)  # fresh containers, shared leaves
    lora = jax.tree.map(lambda x: x, lora) if lora is not None else None
    for layer, kinds in enumerate(declaration):
        for kind, g in kinds.items():
            ids = kept[layer][kind]
            for c in g.couplings:
                w = at_path(params, c.path)
                axis = c.axis % w.ndim
                if w.shape[axis] != g.size * c.width:
                    raise ValueError(f"layer {layer} {kind!r}: {c.path} has {w.shape[axis]} entries "
                                     f"on axis {c.axis}, the declaration {g.size} x {c.width}")
                idx = (ids[:, None] * c.width + np.arange(c.width)[None, :]).reshape(-1)
                _set(params, c.path, _take(w, idx, axis))
                pair = at_path(lora, c.path, None) if lora is not None else None
                if pair is not None:
                    side, pair_axis = ("b", -1) if axis == w.ndim - 1 else ("a", axis)
                    pair[side] = _take(pair[side], idx, pair_axis)
    return params, lora


def merge_pairs(params: Any, lora: Any, scale: float) -> Any:
    """``W + scale * A @ B`` at every LoRA pair's path (a fresh tree; inputs unchanged)."""
    params = jax.tree.map(lambda x: x, params)
    for path, pair in _pairs(lora) if lora is not None else ():
        _set(params, path, _lora.merge_pair(at_path(params, path), pair, scale))
    return params


def slice_declared(params: Any, lora: Any, masks: Any, declaration: Declaration, scale: float) -> Any:
    """The smaller dense parameter tree of any declared model: slice the masked groups, then merge
    LoRA (equal to merging then slicing, without a full-width merged weight)."""
    sliced, sliced_lora = slice_params(params, declaration, kept_groups(masks, declaration), lora)
    return merge_pairs(sliced, sliced_lora, scale)


def slice_and_merge(
    base: dict[str, Any],
    lora: dict[str, Any] | None,
    masks: dict[str, Any] | None,
    config: LlamaConfig,
    lora_cfg: LoraConfig | None = None,
) -> tuple[dict[str, Any], LlamaConfig]:
    """The smaller dense LLaMA: ``(base tree in list layout, its config)``.

    :func:`slice_declared` on LLaMA's declaration. Accepts list or stacked layouts for all three
    trees; ``lora`` and ``masks`` may be ``None``. Embeddings, norms and the LM head are shared
    (not copied) with ``base``. A base of numpy arrays is sliced and merged on the host (numpy
    results), so a model too large for one device can be sliced after training on a mesh.
    """
    base = _llama.unstack_layers(base)
    _llama.check_base(base, config)
    if lora is not None:
        if lora_cfg is None:
            raise ValueError("slice_and_merge() got a LoRA tree but no lora_cfg (rank/alpha)")
        lora = _llama.unstack_layers(lora)
        if len(lora["layers"]) != config.num_layers:
            raise ValueError(f"lora has {len(lora['layers'])} layers, config says {config.num_layers}")
        for i, adapters in enumerate(lora["layers"]):
            unknown = set(adapters) - set(PROJECTIONS)
            if unknown:
                raise ValueError(f"lora layer {i} has unknown projections {sorted(unknown)}")
    scale = lora_cfg.scale if lora_cfg is not None else 0.0
    declaration = llama_declaration(config)
    if masks is None:
        masks = init_masks(config)
    kept = kept_groups(masks, declaration)
    sliced, sliced_lora = slice_params(base, declaration, kept, lora)
    out = merge_pairs(sliced, sliced_lora, scale)

    g = [config.heads(i) // config.kv_heads(i) if config.kv_heads(i) else 0 for i in range(config.num_layers)]
    heads = tuple(len(ids["attn"]) * g[i] for i, ids in enumerate(kept))
    kv_heads = tuple(len(ids["attn"]) for ids in kept)
    ffn = tuple(len(ids["mlp"]) for ids in kept)
    new_config = config.with_widths(heads, kv_heads, ffn)
    _llama.check_base(out, new_config)
    return out, new_config


def count_params(base: dict[str, Any]) -> int:
    """Number of parameters in a base tree (either layout; a tied head is counted once)."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base)))


__all__ = ["count_params", "kept_groups", "kept_indices", "merge_pairs", "slice_and_merge",
           "slice_declared", "slice_params"]
