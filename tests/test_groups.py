"""Structured groups: unit/channel masks and their expansion to projection columns."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_config
from loraprune_jax.pruning.groups import expand_unit_mask, init_masks, num_units


def test_units_are_kv_heads():
    assert num_units(tiny_config("mha"), 0) == 4  # one unit per head
    assert num_units(tiny_config("gqa"), 0) == 2  # one unit per KV group of 3 query heads


def test_init_masks_shapes_and_stacking():
    cfg = tiny_config("gqa")
    masks = init_masks(cfg)
    assert [m["attn"].shape for m in masks["layers"]] == [(2,)] * 3
    assert [m["mlp"].shape for m in masks["layers"]] == [(40,)] * 3
    stacked = init_masks(cfg, stacked=True)
    assert stacked["layers"]["attn"].shape == (3, 2)
    assert stacked["layers"]["mlp"].shape == (3, 40)
    ragged = cfg.with_widths((6, 3, 6), (2, 1, 2), (40, 40, 40))
    assert init_masks(ragged)["layers"][1]["attn"].shape == (1,)
    with pytest.raises(ValueError, match="uniform"):
        init_masks(ragged, stacked=True)


def test_expand_gqa_unit_mask():
    cols = expand_unit_mask(np.array([1.0, 0.0]), heads=6, kv_heads=2, head_dim=2)
    # unit 1 owns query heads 3, 4, 5 (columns 6..11) and KV head 1 (columns 2..3)
    np.testing.assert_array_equal(cols["q"], [1] * 6 + [0] * 6)
    np.testing.assert_array_equal(cols["k"], [1, 1, 0, 0])
    np.testing.assert_array_equal(cols["v"], cols["k"])
    np.testing.assert_array_equal(cols["o"], cols["q"])


def test_expand_mha_unit_mask():
    cols = expand_unit_mask(np.array([0.0, 1.0, 1.0]), heads=3, kv_heads=3, head_dim=2)
    np.testing.assert_array_equal(cols["q"], [0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(cols["k"], cols["q"])
