"""Structured pruning: groups and masks."""

from .groups import expand_unit_mask, init_masks, num_units

__all__ = ["expand_unit_mask", "init_masks", "num_units"]
