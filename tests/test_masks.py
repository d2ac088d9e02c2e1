"""Mask rewrites: uniform and global allocation, monotone shrinking, tree round trips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import count_compiles
from loraprune_jax.config import LlamaConfig
from loraprune_jax.models.llama_pruning import init_masks
from loraprune_jax.core.masks import mask_stats, num_to_prune, update_masks
from loraprune_jax.core.trees import excluded_layers
from loraprune_jax.models.llama_pruning import masked_widths


def tree(attn, mlp):
    """A list-form tree from per-layer numpy rows."""
    return {
        "layers": [
            {"attn": np.asarray(a, np.float32), "mlp": np.asarray(m, np.float32)}
            for a, m in zip(attn, mlp)
        ]
    }


def ones_tree(num_layers, units, ffn):
    return tree([np.ones(units)] * num_layers, [np.ones(ffn)] * num_layers)


def pruned_idx(v):
    return sorted(np.nonzero(np.asarray(v) == 0)[0].tolist())


def test_uniform_picks_lowest_scores():
    masks = ones_tree(2, 4, 6)
    scores = tree(
        [[0.4, 0.1, 0.3, 0.2], [1.0, 2.0, 0.5, 3.0]],
        [[6, 5, 4, 3, 2, 1], [1, 1, 0, 1, 1, 1]],
    )
    out = update_masks(masks, scores, 0.5)
    assert pruned_idx(out["layers"][0]["attn"]) == [1, 3]
    assert pruned_idx(out["layers"][1]["attn"]) == [0, 2]
    assert pruned_idx(out["layers"][0]["mlp"]) == [3, 4, 5]
    # ties broken by lower index
    assert pruned_idx(out["layers"][1]["mlp"]) == [0, 1, 2]
    assert set(np.unique(np.asarray(out["layers"][0]["mlp"]))) == {0.0, 1.0}


@pytest.mark.parametrize("n", [1, 3, 7, 32, 100, 11008])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.29, 0.3, 0.5, 0.7, 0.99])
def test_exact_floor_count(n, ratio):
    rng = np.random.default_rng(n)
    masks = tree([np.ones(n)], [np.ones(n)])
    scores = tree([rng.random(n)], [rng.random(n)])
    out = update_masks(masks, scores, ratio, min_keep=0)
    expected = int(np.floor(round(n * ratio, 9)))  # decimal floor, e.g. 0.29 * 100 -> 29
    assert num_to_prune(n, ratio) == expected
    assert n - int(out["layers"][0]["attn"].sum()) == expected
    assert n - int(out["layers"][0]["mlp"].sum()) == expected


def test_gqa_three_units_half():
    """SmolLM2-like 9 query / 3 KV heads: 3 units, 50% -> 1 unit pruned."""
    cfg = LlamaConfig(
        vocab_size=10, hidden_size=576, intermediate_size=16, num_layers=2, num_heads=9,
        num_kv_heads=3, head_dim=64,
    )
    masks = init_masks(cfg)
    scores = tree([[0.3, 0.1, 0.2], [0.1, 0.3, 0.2]], [np.arange(16.0)] * 2)
    out = update_masks(masks, scores, 0.5)
    assert [pruned_idx(layer["attn"]) for layer in out["layers"]] == [[1], [0]]
    heads, kv, ffn = masked_widths(cfg, out)
    assert heads == (6, 6) and kv == (2, 2) and ffn == (8, 8)
    assert cfg.with_widths(heads, kv, ffn).num_params() < cfg.num_params()


def test_masks_only_shrink_even_if_pruned_group_becomes_best():
    rng = np.random.default_rng(0)
    masks = ones_tree(3, 8, 20)
    history = []
    for step, ratio in enumerate([0.1, 0.25, 0.25, 0.4, 0.5, 0.5, 0.75]):
        scores = tree([rng.random(8) for _ in range(3)], [rng.random(20) for _ in range(3)])
        if step > 0:
            # make every previously pruned group the best-scoring one
            for i, layer in enumerate(masks["layers"]):
                scores["layers"][i]["attn"][np.asarray(layer["attn"]) == 0] = 100.0
                scores["layers"][i]["mlp"][np.asarray(layer["mlp"]) == 0] = 100.0
        new = update_masks(masks, scores, ratio)
        for old_l, new_l in zip(masks["layers"], new["layers"]):
            for kind, n in (("attn", 8), ("mlp", 20)):
                assert np.all(np.asarray(new_l[kind]) <= np.asarray(old_l[kind]))
                assert n - int(np.asarray(new_l[kind]).sum()) == num_to_prune(n, ratio)
        history.append(mask_stats(new)["attn_kept_fraction"])
        masks = new
    assert all(b <= a for a, b in zip(history, history[1:]))


def test_zero_score_kept_group_not_favoured_over_pruned():
    masks = tree([[0, 1, 1, 1]], [np.ones(4)])
    scores = tree([[5.0, 0.0, 1.0, 2.0]], [np.ones(4)])
    # 25%: one group pruned, already the case -> nothing changes (the zero-score group survives)
    out = update_masks(masks, scores, 0.25)
    assert pruned_idx(out["layers"][0]["attn"]) == [0]
    out = update_masks(masks, scores, 0.5)
    assert pruned_idx(out["layers"][0]["attn"]) == [0, 1]


def test_lower_ratio_never_unprunes():
    masks = tree([[0, 0, 1, 1]], [np.ones(4)])
    out = update_masks(masks, tree([[9, 9, 0, 0]], [np.ones(4)]), 0.25)
    assert pruned_idx(out["layers"][0]["attn"]) == [0, 1]


def test_excluded_layers_untouched():
    rng = np.random.default_rng(1)
    masks = ones_tree(10, 4, 12)
    scores = tree([rng.random(4) for _ in range(10)], [rng.random(12) for _ in range(10)])
    ex = excluded_layers(10)
    assert ex == (0, 9)
    out = update_masks(masks, scores, 0.5, excluded=ex)
    for i, layer in enumerate(out["layers"]):
        kept = (int(layer["attn"].sum()), int(layer["mlp"].sum()))
        assert kept == ((4, 12) if i in ex else (2, 6))
    out_g = update_masks(masks, scores, 0.5, excluded=ex, allocation="global")
    for i in ex:
        assert np.all(out_g["layers"][i]["attn"] == 1) and np.all(out_g["layers"][i]["mlp"] == 1)
    # negative indices count from the end
    out_n = update_masks(masks, scores, 0.5, excluded=(-1,))
    assert np.all(out_n["layers"][9]["attn"] == 1)


def test_excluded_layers_defaults():
    assert excluded_layers(32) == (0, 1, 2, 31)
    assert excluded_layers(30) == (0, 1, 2, 29)
    assert excluded_layers(9) == (8,)
    assert excluded_layers(32, first_fraction=0.0, last=False) == ()
    assert excluded_layers(1) == (0,)


def test_global_differs_from_uniform_and_respects_min_keep():
    # layer 0 scores are tiny everywhere, layer 1 large: global prunes layer 0 far more.
    masks = ones_tree(2, 8, 10)
    scores = tree(
        [np.linspace(0.01, 0.08, 8), np.linspace(1.0, 8.0, 8)],
        [np.linspace(0.01, 0.1, 10), np.linspace(1.0, 10.0, 10)],
    )
    uni = update_masks(masks, scores, 0.5)
    glo = update_masks(masks, scores, 0.5, allocation="global", min_keep=2)
    su, sg = mask_stats(uni), mask_stats(glo)
    assert su["attn_kept"] == [4, 4] and su["mlp_kept"] == [5, 5]
    assert sg["attn_kept"] == [2, 6] and sg["mlp_kept"] == [2, 8]
    assert sg["attn_kept_fraction"] == su["attn_kept_fraction"] == 0.5
    # the groups pruned in layer 0 are its lowest ones
    assert pruned_idx(glo["layers"][0]["attn"]) == list(range(6))
    glo1 = update_masks(masks, scores, 0.5, allocation="global")
    assert mask_stats(glo1)["attn_kept"] == [1, 7]


def test_global_monotone_in_ratio_and_shrinks():
    rng = np.random.default_rng(3)
    masks = ones_tree(4, 6, 30)
    prev = None
    for ratio in [0.1, 0.2, 0.35, 0.5, 0.8]:
        scores = tree(
            [rng.random(6) * (i + 1) for i in range(4)],
            [rng.random(30) ** (i + 1) for i in range(4)],
        )
        new = update_masks(masks, scores, ratio, allocation="global", excluded=(3,))
        st = mask_stats(new)
        assert sum(6 - k for k in st["attn_kept"]) == num_to_prune(18, ratio)
        assert sum(30 - k for k in st["mlp_kept"]) == num_to_prune(90, ratio)
        assert min(st["attn_kept"]) >= 1 and st["attn_kept"][3] == 6
        for old_l, new_l in zip(masks["layers"], new["layers"]):
            assert np.all(new_l["attn"] <= old_l["attn"]) and np.all(new_l["mlp"] <= old_l["mlp"])
        if prev is not None:
            assert sum(st["mlp_kept"]) <= sum(prev["mlp_kept"])
        prev, masks = st, new


def _check_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert type(x) is type(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        if isinstance(x, jax.Array):
            assert x.sharding == y.sharding and x.committed == y.committed


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_jax_trees_keep_structure(stacked, dtype):
    cfg = LlamaConfig(
        vocab_size=10, hidden_size=32, intermediate_size=12, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=8,
    )
    masks = init_masks(cfg, stacked=stacked, dtype=dtype)
    key = jax.random.PRNGKey(0)
    scores = jax.tree.map(lambda m: jax.random.uniform(key, m.shape, jnp.float32), masks)
    out = update_masks(masks, scores, 0.5, excluded=(0,))
    _check_same_tree(masks, out)
    st = mask_stats(out)
    assert st["attn_kept"] == [2, 1, 1, 1] and st["mlp_kept"] == [12, 6, 6, 6]
    assert st["attn_total"] == [2] * 4 and st["mlp_total"] == [12] * 4
    assert st["mlp_kept_fraction"] == pytest.approx(30 / 48)


def test_list_and_stacked_agree():
    cfg = LlamaConfig(
        vocab_size=10, hidden_size=32, intermediate_size=16, num_layers=3, num_heads=4,
        num_kv_heads=4, head_dim=8,
    )
    rng = np.random.default_rng(5)
    s_list = {"layers": [{"attn": rng.random(4), "mlp": rng.random(16)} for _ in range(3)]}
    s_stacked = {"layers": jax.tree.map(lambda *xs: np.stack(xs), *s_list["layers"])}
    for alloc in ("uniform", "global"):
        a = update_masks(init_masks(cfg), s_list, 0.3, allocation=alloc)
        b = update_masks(init_masks(cfg, stacked=True), s_stacked, 0.3, allocation=alloc)
        # scores in the other form work too
        c = update_masks(init_masks(cfg, stacked=True), s_list, 0.3, allocation=alloc)
        for kind in ("attn", "mlp"):
            stacked_a = np.stack([np.asarray(layer[kind]) for layer in a["layers"]])
            np.testing.assert_array_equal(stacked_a, np.asarray(b["layers"][kind]))
            np.testing.assert_array_equal(
                np.asarray(c["layers"][kind]), np.asarray(b["layers"][kind])
            )


def test_numpy_in_numpy_out():
    masks = ones_tree(2, 3, 5)
    out = update_masks(masks, masks, 0.5)
    _check_same_tree(masks, out)
    assert isinstance(out["layers"][0]["attn"], np.ndarray)
    # the input is not modified in place
    assert np.all(masks["layers"][0]["attn"] == 1)


@pytest.mark.parametrize("committed", [False, True])
def test_jitted_step_does_not_recompile(committed):
    cfg = LlamaConfig(
        vocab_size=10, hidden_size=32, intermediate_size=12, num_layers=2, num_heads=4,
        num_kv_heads=4, head_dim=8,
    )
    masks = init_masks(cfg)
    if committed:
        masks = jax.device_put(masks, jax.devices()[0])
    def total_of_masks(m):
        return sum(jnp.sum(x) for x in jax.tree.leaves(m))

    step = jax.jit(total_of_masks)
    rng = np.random.default_rng(0)
    with count_compiles() as compiles:
        step(masks)
        for ratio in (0.25, 0.5):
            scores = jax.tree.map(lambda m: jnp.asarray(rng.random(m.shape), jnp.float32), masks)
            masks = update_masks(masks, scores, ratio)
            step(masks)
    assert compiles["total_of_masks"] == 1


def test_errors():
    masks = ones_tree(2, 4, 6)
    with pytest.raises(ValueError, match="ratio"):
        update_masks(masks, masks, 1.0)
    with pytest.raises(ValueError, match="allocation"):
        update_masks(masks, masks, 0.5, allocation="random")
    with pytest.raises(ValueError, match="excluded"):
        update_masks(masks, masks, 0.5, excluded=(5,))
    with pytest.raises(ValueError, match="scores"):
        update_masks(masks, ones_tree(2, 3, 6), 0.5)
    bad = ones_tree(2, 4, 6)
    bad["layers"][1]["mlp"][2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        update_masks(masks, bad, 0.5)
    with pytest.raises(ValueError, match="layers"):
        update_masks(masks, ones_tree(3, 4, 6), 0.5)


def test_update_masks_any_declared_kinds():
    """A CNN-style tree of one "channels" kind per layer is ranked like LLaMA's kinds."""
    masks = {"layers": [{"channels": np.ones(4, np.float32)}, {"channels": np.ones(6, np.float32)}]}
    scores = {"layers": [{"channels": np.array([4.0, 1, 3, 2])}, {"channels": np.arange(6.0)[::-1]}]}
    new = update_masks(masks, scores, 0.5)
    np.testing.assert_array_equal(new["layers"][0]["channels"], [1, 0, 1, 0])
    np.testing.assert_array_equal(new["layers"][1]["channels"], [1, 1, 1, 0, 0, 0])
    stats = mask_stats(new)
    assert stats["channels_kept"] == [2, 3] and stats["channels_kept_fraction"] == 0.5
    with pytest.raises(ValueError, match="group kinds"):
        update_masks(masks, {"layers": [{"attn": np.ones(4)}, {"attn": np.ones(6)}]}, 0.5)
    with pytest.raises(ValueError, match="group kinds"):
        update_masks({"layers": [{"channels": np.ones(4)}, {"other": np.ones(6)}]}, scores, 0.5)
    # layers may hold different kinds: each kind is ranked over the layers that hold it
    mixed = {"layers": [{"channels": np.ones(4)}, {"channels": np.ones(2), "heads": np.ones(3)}]}
    mixed_scores = {"layers": [{"channels": np.array([4.0, 1, 3, 2])},
                               {"channels": np.array([0.5, 9.0]), "heads": np.array([3.0, 1, 2])}]}
    new = update_masks(mixed, mixed_scores, 0.5, allocation="global")
    np.testing.assert_array_equal(new["layers"][0]["channels"], [1, 0, 1, 0])  # 3 of 6 pruned
    np.testing.assert_array_equal(new["layers"][1]["channels"], [0, 1])
    np.testing.assert_array_equal(new["layers"][1]["heads"], [1, 0, 1])
    assert mask_stats(new)["heads_kept"] == [2] and mask_stats(new)["channels_kept"] == [2, 1]
