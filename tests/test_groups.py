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


# The declaration mechanism ---------------------------------------------------------------
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from loraprune_jax.pruning.groups import (  # noqa: E402
    Coupling,
    GroupKind,
    declared_masks,
    group_scores,
    llama_declaration,
    llama_groups,
    normalize,
)
from loraprune_jax.pruning.importance import layer_group_scores  # noqa: E402


def test_group_scores_sums_normalised_couplings():
    s_out = jnp.arange(12.0).reshape(3, 4)  # (in, out): 2 groups x width 2 on axis 1
    s_in = jnp.arange(8.0).reshape(4, 2) + 1  # (in, out): 2 groups x width 2 on axis 0
    kind = GroupKind(2, (Coupling(("w1",), 1, 2), Coupling(("b1",), 0, 2), Coupling(("w2",), 0, 2)))
    got = group_scores({("w1",): s_out, ("w2",): s_in}, {"hidden": kind})["hidden"]
    per_out = np.asarray(s_out).sum(0).reshape(2, 2).sum(1)
    per_in = np.asarray(s_in).sum(1).reshape(2, 2).sum(1)
    want = per_out / np.linalg.norm(per_out) + per_in / np.linalg.norm(per_in)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)  # the bias does not vote


def test_group_scores_conv_axes_and_empty_kind():
    s = jax.random.uniform(jax.random.PRNGKey(0), (3, 3, 4, 6))  # HWIO conv kernel scores
    kinds = {"out": GroupKind(6, (Coupling(("k",), 3),)), "in": GroupKind(4, (Coupling(("k",), 2),)),
             "none": GroupKind(5, (Coupling(("bias",), 0),))}
    got = group_scores({("k",): s}, kinds)
    np.testing.assert_allclose(got["out"], normalize(s.sum((0, 1, 2))), rtol=1e-6)
    np.testing.assert_allclose(got["in"], normalize(s.sum((0, 1, 3))), rtol=1e-6)
    np.testing.assert_array_equal(got["none"], np.zeros(5))


def test_group_scores_rejects_wrong_width():
    kind = GroupKind(3, (Coupling(("w",), 1, 2),))
    with pytest.raises(ValueError, match="expected 3 groups x 2"):
        group_scores({("w",): jnp.ones((4, 5))}, {"k": kind})


def test_llama_declaration_matches_layer_group_scores():
    """LLaMA's declared groups give the scores of the projection-keyed LLaMA reducer."""
    cfg = tiny_config("gqa")
    kinds = llama_groups(cfg, 1)
    keys = jax.random.split(jax.random.PRNGKey(1), 7)
    d, hd, h, kv, f = cfg.hidden_size, cfg.head_dim, cfg.heads(1), cfg.kv_heads(1), cfg.ffn(1)
    shapes = {"q": (d, h * hd), "k": (d, kv * hd), "v": (d, kv * hd), "o": (h * hd, d),
              "gate": (d, f), "up": (d, f), "down": (f, d)}
    scores = {n: jax.random.uniform(k, s) for k, (n, s) in zip(keys, shapes.items())}
    got = group_scores({("layers", 1, n): s for n, s in scores.items()}, kinds)
    want = layer_group_scores(scores, kv, f)
    for kind in ("attn", "mlp"):
        np.testing.assert_allclose(got[kind], want[kind], rtol=1e-6)
    assert [c.width for c in kinds["attn"].couplings] == [3 * hd, hd, hd, 3 * hd]
    assert jax.tree.map(np.shape, declared_masks(llama_declaration(cfg))) == \
        jax.tree.map(np.shape, init_masks(cfg))


def test_declaration_validation():
    with pytest.raises(ValueError, match="non-empty tuple"):
        Coupling("q", 1)
    with pytest.raises(ValueError, match="width"):
        Coupling(("q",), 1, 0)
    with pytest.raises(ValueError, match="size"):
        GroupKind(-1, ())
