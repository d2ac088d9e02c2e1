"""The core of loraprune-jax: pure functions over any model's pytrees, importing only jax, numpy,
optax and flax.

A model declares its prunable groups (:class:`Coupling`, :class:`GroupKind`: which slices of which
weights each group owns, by paths into its own parameter tree); everything else works from that
declaration and a LoRA naming (:class:`LoraLayout`; ours, or flax.nnx's ``nnx.LoRALinear``):
criteria from one registry (:data:`REGISTRY`) scored layer by layer (:func:`declared_scores`), the
moving average (:func:`ema_update`), the schedule (:class:`PruneSchedule`), mask updates
(:func:`update_masks`), masks applied on the weights (:func:`apply_masks`) and slicing with LoRA
merged (:func:`slice_declared`). Models, I/O, training, evaluation and the CLI build on it.
"""

from .criteria import (
    CRITERIA,
    GATE_CRITERIA,
    REGISTRY,
    Criterion,
    criteria_given,
    declared_scores,
    element_scores,
    gate_statistic,
    get_criterion,
    group_scores_of,
    is_gate_criterion,
    ranking_scores,
)
from .elements import (
    apply_element_masks,
    nm_fraction,
    sparsity_stats,
    update_element_masks,
    update_nm_masks,
)
from .gates import init_gates
from .groups import (
    Coupling,
    Declaration,
    GroupKind,
    check_declaration,
    declared_masks,
    expand_mask,
    group_scores,
    normalize,
)
from .importance import ema_update, estimate_weight_grad, lora_guided_importance
from .lora import NNX, OURS, LoraLayout, init_pair, iter_pairs, lora_linear, merge_pair, merge_pairs, pair_at
from .masks import kinds_of, mask_stats, num_to_prune, update_masks
from .schedule import OneShotSchedule, PruneSchedule, Schedule
from .slicing import apply_masks, kept_groups, slice_declared, slice_params
from .trees import at_path, count_params, excluded_layers, unstack

__all__ = [
    "CRITERIA", "GATE_CRITERIA", "NNX", "OURS", "REGISTRY", "Coupling", "Criterion", "Declaration",
    "GroupKind", "LoraLayout", "OneShotSchedule", "PruneSchedule", "Schedule", "apply_element_masks",
    "apply_masks", "at_path", "check_declaration", "count_params", "criteria_given",
    "declared_masks", "declared_scores", "element_scores", "ema_update", "estimate_weight_grad",
    "excluded_layers", "expand_mask", "gate_statistic", "get_criterion", "group_scores",
    "group_scores_of", "init_gates", "init_pair", "is_gate_criterion", "iter_pairs", "kept_groups",
    "kinds_of", "lora_guided_importance", "lora_linear", "mask_stats", "merge_pair", "merge_pairs",
    "nm_fraction", "normalize", "num_to_prune", "pair_at", "ranking_scores", "slice_declared",
    "slice_params", "sparsity_stats", "unstack", "update_element_masks", "update_masks",
    "update_nm_masks",
]
