"""Structured pruning: groups, importance, criteria, schedules, mask updates, slicing."""

from .criteria import layer_scores, merged_weight
from .groups import expand_unit_mask, init_masks, num_units
from .importance import (
    block_scores,
    ema_update,
    estimate_weight_grad,
    layer_group_scores,
    lora_guided_importance,
    lora_layer_scores,
    normalize,
    reduce_to_groups,
)
from .masks import (
    excluded_layers,
    mask_stats,
    masked_num_params,
    masked_widths,
    num_to_prune,
    update_masks,
)
from .schedule import OneShotSchedule, PruneSchedule, Schedule
from .slicing import count_params, kept_indices, slice_and_merge

__all__ = [
    "OneShotSchedule",
    "PruneSchedule",
    "Schedule",
    "block_scores",
    "count_params",
    "ema_update",
    "estimate_weight_grad",
    "excluded_layers",
    "expand_unit_mask",
    "init_masks",
    "kept_indices",
    "layer_group_scores",
    "layer_scores",
    "lora_guided_importance",
    "lora_layer_scores",
    "mask_stats",
    "masked_num_params",
    "masked_widths",
    "merged_weight",
    "normalize",
    "num_to_prune",
    "num_units",
    "reduce_to_groups",
    "slice_and_merge",
    "update_masks",
]
