"""The declaration mechanism: couplings, group kinds, their masks and score reduction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loraprune_jax.core.groups import (Coupling, GroupKind, check_declaration, declared_masks,
                                       expand_mask, group_scores, normalize)


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


def test_declaration_validation():
    with pytest.raises(ValueError, match="non-empty tuple"):
        Coupling("q", 1)
    with pytest.raises(ValueError, match="width"):
        Coupling(("q",), 1, 0)
    with pytest.raises(ValueError, match="size"):
        GroupKind(-1, ())


def test_declared_masks_allow_different_kinds_per_layer():
    decl = [{"heads": GroupKind(2, (Coupling(("a",), 1),))},
            {"heads": GroupKind(3, (Coupling(("b",), 1),)), "mlp": GroupKind(4, (Coupling(("c",), 1),))}]
    masks = declared_masks(decl)
    assert jax.tree.map(np.shape, masks) == {"layers": [{"heads": (2,)}, {"heads": (3,), "mlp": (4,)}]}


def test_expand_mask_repeats_each_group_over_its_width():
    np.testing.assert_array_equal(expand_mask(jnp.array([1.0, 0.0, 1.0]), 2), [1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(expand_mask(jnp.ones((2, 2)), 3).shape, (2, 6))


def test_check_declaration_names_the_bad_coupling():
    params = {"fc1": {"kernel": jnp.ones((3, 4))}}
    check_declaration(params, [{"h": GroupKind(4, (Coupling(("fc1", "kernel"), 1),))}])
    with pytest.raises(ValueError, match=r"no parameter at \('fc2', 'kernel'\)"):
        check_declaration(params, [{"h": GroupKind(4, (Coupling(("fc2", "kernel"), 0),))}])
    with pytest.raises(ValueError, match="has 3 entries on axis 0, the declaration 4 groups x 1"):
        check_declaration(params, [{"h": GroupKind(4, (Coupling(("fc1", "kernel"), 0),))}])
