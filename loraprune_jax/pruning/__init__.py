"""Structured pruning: groups and masks."""

from .groups import expand_unit_mask, init_masks, num_units

__all__ = ["expand_unit_mask", "init_masks", "num_units"]

from .masks import (  # noqa: E402
    excluded_layers,
    mask_stats,
    masked_num_params,
    masked_widths,
    num_to_prune,
    update_masks,
)
from .schedule import OneShotSchedule, PruneSchedule, Schedule  # noqa: E402

__all__ += [
    "OneShotSchedule",
    "PruneSchedule",
    "Schedule",
    "excluded_layers",
    "mask_stats",
    "masked_num_params",
    "masked_widths",
    "num_to_prune",
    "update_masks",
]

from .slicing import count_params, kept_indices, slice_and_merge  # noqa: E402

__all__ += ["count_params", "kept_indices", "slice_and_merge"]
