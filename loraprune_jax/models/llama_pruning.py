"""LLaMA's prunable structure, declared for the core: its groups, masks and slicing.

An attention *unit* is one KV head together with the query heads that share it (for multi-head
attention exactly one head, for grouped-query attention one KV group): it owns the q columns (and
o rows) of its ``heads / kv_heads`` query heads and the k/v columns of its KV head. An MLP channel
owns a gate and an up column and a down row. Every criterion scores a layer through this
declaration (:func:`layer_scores`), as it scores any other model.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp

from ..config import PROJECTIONS, LlamaConfig, LoraConfig
from ..core.criteria import group_scores_of
from ..core.elements import check_nm, sparsity_stats
from ..core.groups import Coupling, GroupKind, declared_masks
from ..core.lora import merge_pairs
from ..core.masks import mask_stats
from ..core.slicing import kept_groups, slice_params
from ..core.trees import Path, unstack
from .llama_params import check_base, layer_shapes

Array = jax.Array

# which input statistic (forward(return_stats=True)) feeds each projection (wanda)
INPUT_STAT = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in",
              "gate": "mlp_in", "up": "mlp_in", "down": "down_in"}
# the element masks' families in sparsity_stats: kept fractions of attention and MLP weights
ELEMENT_FAMILIES = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}


def llama_layer_groups(heads: int, kv_heads: int, head_dim: int, ffn: int,
                       prefix: Path = ()) -> dict[str, GroupKind]:
    """One layer's groups; ``prefix`` is the layer's path in the tree (``()`` for a lone layer
    dict, as the train step scores them)."""
    g = heads // kv_heads if kv_heads else 0
    q_width = max(g * head_dim, 1)

    def at(name: str, axis: int, width: int = 1) -> Coupling:
        return Coupling((*prefix, name), axis, width)

    return {
        "attn": GroupKind(kv_heads, (at("q", 1, q_width), at("k", 1, head_dim),
                                     at("v", 1, head_dim), at("o", 0, q_width))),
        "mlp": GroupKind(ffn, (at("gate", 1), at("up", 1), at("down", 0))),
    }


def llama_declaration(config: LlamaConfig) -> list[dict[str, GroupKind]]:
    """Every layer's groups, with paths into a list-layout base tree."""
    return [llama_layer_groups(config.heads(i), config.kv_heads(i), config.head_dim,
                               config.ffn(i), prefix=("layers", i))
            for i in range(config.num_layers)]


def init_masks(config: LlamaConfig, stacked: bool = False, dtype: Any = jnp.float32) -> dict[str, Any]:
    """All-ones masks ``{"layers": [{"attn": (units,), "mlp": (ffn,)}, ...]}``; with
    ``stacked=True`` (uniform widths only) stacked on a leading layer axis like a stacked base."""
    masks = declared_masks(llama_declaration(config), dtype)
    if stacked:
        if not config.is_uniform:
            raise ValueError("stacked masks need uniform layer widths")
        return {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *masks["layers"])}
    return masks


def layer_scores(
    criterion: str,
    layer: Mapping[str, Array],
    adapters: Mapping[str, Any] | None,
    head_dim: int,
    *,
    scale: float,
    power: int = 1,
    lora_grads: Mapping[str, Any] | None = None,
    weight_grads: Mapping[str, Array] | None = None,
    input_stats: Mapping[str, Array] | None = None,
    key: Array | None = None,
) -> dict[str, Array]:
    """``{"attn": (units,), "mlp": (ffn,)}`` scores of one layer dict under ``criterion``: the
    core's :func:`~loraprune_jax.core.criteria.group_scores_of` on the layer's declaration.
    ``input_stats`` are the layer's ``forward(return_stats=True)`` sums (wanda)."""
    hd = head_dim
    kinds = llama_layer_groups(layer["q"].shape[-1] // hd, layer["k"].shape[-1] // hd, hd,
                               layer["gate"].shape[-1])
    return group_scores_of(criterion, kinds, layer, adapters, scale=scale, power=power,
                           lora_grads=lora_grads, weight_grads=weight_grads,
                           input_stats=stats_by_path(input_stats), key=key)


def stats_by_path(input_stats: Mapping[str, Array] | None) -> dict[Path, Array] | None:
    """A layer's input statistics keyed by the path of each projection they feed."""
    if input_stats is None:
        return None
    return {(name,): input_stats[stat] for name, stat in INPUT_STAT.items()}


def masked_widths(config: LlamaConfig, masks: Any) -> tuple[tuple[int, ...], ...]:
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


# Element-wise and N:M masks ------------------------------------------------------------------
def _masked_names(names: Iterable[str]) -> tuple[str, ...]:
    names = tuple(names)
    bad = sorted(set(names) - set(PROJECTIONS))
    if bad or not names:
        raise ValueError(f"masked projections must be a non-empty subset of {PROJECTIONS}, got {names}")
    return tuple(p for p in PROJECTIONS if p in names)  # a fixed order: ties follow it


def init_element_masks(config: LlamaConfig, names: Sequence[str] = PROJECTIONS, *,
                       stacked: bool = False, dtype: Any = jnp.float32) -> dict[str, Any]:
    """All-ones weight-shaped masks ``{"layers": [{name: (in, out)}, ...]}`` for ``names``
    (stacked on a leading layer axis with ``stacked=True``, uniform widths only)."""
    names = _masked_names(names)
    layers = [{name: jnp.ones(layer_shapes(config, i)[name], dtype) for name in names}
              for i in range(config.num_layers)]
    if stacked:
        if not config.is_uniform:
            raise ValueError("stacked masks need uniform layer widths")
        return {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    return {"layers": layers}


def check_nm_widths(config: LlamaConfig, names: Sequence[str], n: int, m: int,
                    excluded: Iterable[int] = ()) -> None:
    """Raise ``ValueError`` unless every pruned projection's input dimension splits into blocks
    of ``m`` (checked before a run starts rather than at its first mask update)."""
    check_nm(n, m)
    skip = {int(i) % config.num_layers for i in excluded} if config.num_layers else set()
    for i in range(config.num_layers):
        if i in skip:
            continue
        shapes = layer_shapes(config, i)
        for name in _masked_names(names):
            if shapes[name][0] % m:
                raise ValueError(f"N:M {n}:{m}: layer {i} {name!r} has input dimension "
                                 f"{shapes[name][0]}, not divisible by M={m}")


def llama_sparsity_stats(masks: Any, excluded: Iterable[int] = ()) -> dict[str, Any]:
    """The core's ``sparsity_stats`` of LLaMA's element masks: projections in their fixed order,
    and the kept fractions of attention (``attn_kept``) and MLP (``mlp_kept``) weights."""
    return sparsity_stats(masks, excluded, order=PROJECTIONS, families=ELEMENT_FAMILIES)


# Slicing -------------------------------------------------------------------------------------
def slice_and_merge(
    base: dict[str, Any],
    lora: dict[str, Any] | None,
    masks: dict[str, Any] | None,
    config: LlamaConfig,
    lora_cfg: LoraConfig | None = None,
) -> tuple[dict[str, Any], LlamaConfig]:
    """The smaller dense LLaMA: ``(base tree in list layout, its config)``.

    The core's slicing on LLaMA's declaration, then LoRA merged. Accepts list or stacked layouts
    for all three trees; ``lora`` and ``masks`` may be ``None``. Embeddings, norms and the LM head
    are shared (not copied) with ``base``. A base of numpy arrays is sliced and merged on the host
    (numpy results), so a model too large for one device can be sliced after training on a mesh.
    """
    base = unstack(base)
    check_base(base, config)
    if lora is not None:
        if lora_cfg is None:
            raise ValueError("slice_and_merge() got a LoRA tree but no lora_cfg (rank/alpha)")
        lora = unstack(lora)
        if len(lora["layers"]) != config.num_layers:
            raise ValueError(f"lora has {len(lora['layers'])} layers, config says {config.num_layers}")
        for i, adapters in enumerate(lora["layers"]):
            unknown = set(adapters) - set(PROJECTIONS)
            if unknown:
                raise ValueError(f"lora layer {i} has unknown projections {sorted(unknown)}")
    scale = lora_cfg.scale if lora_cfg is not None else 0.0
    declaration = llama_declaration(config)
    kept = kept_groups(masks if masks is not None else init_masks(config), declaration)
    sliced, sliced_lora = slice_params(base, declaration, kept, lora)
    out = merge_pairs(sliced, sliced_lora, scale)
    g = [config.heads(i) // config.kv_heads(i) if config.kv_heads(i) else 0
         for i in range(config.num_layers)]
    new_config = config.with_widths(tuple(len(ids["attn"]) * g[i] for i, ids in enumerate(kept)),
                                    tuple(len(ids["attn"]) for ids in kept),
                                    tuple(len(ids["mlp"]) for ids in kept))
    check_base(out, new_config)
    return out, new_config


__all__ = ["ELEMENT_FAMILIES", "INPUT_STAT", "check_nm_widths",
           "init_element_masks", "init_masks", "layer_scores", "llama_declaration", "llama_sparsity_stats",
           "llama_layer_groups", "masked_widths", "slice_and_merge", "stats_by_path"]
