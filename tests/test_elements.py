"""Element-wise and N:M masks: exact counts, global ranking, the N:M pattern and its progression,
shrink-only updates, deterministic ties, array types kept, validation, statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from conftest import tiny_config
from loraprune_jax.config import PROJECTIONS
from loraprune_jax.core.elements import apply_element_masks, nm_fraction, sparsity_stats, update_element_masks, update_nm_masks
from loraprune_jax.models.llama_pruning import check_nm_widths as check_nm, init_element_masks, llama_sparsity_stats

CFG = tiny_config("gqa")  # 3 layers; q (48, 48), k/v (48, 16), o (48, 48), gate/up (48, 40), down (40, 48)


def random_scores(masks, seed=0):
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda m: rng.rand(*m.shape).astype(np.float32), masks)


def layer_list(tree):
    layers = tree["layers"]
    if isinstance(layers, dict):
        n = next(iter(layers.values())).shape[0]
        return [{k: np.asarray(v[i]) for k, v in layers.items()} for i in range(n)]
    return [{k: np.asarray(v) for k, v in layer.items()} for layer in layers]


def zeros(mask):
    return int(np.asarray(mask).size - np.count_nonzero(np.asarray(mask)))


def test_init_shapes_and_layouts():
    masks = init_element_masks(CFG, ("q", "down", "k"))
    assert list(masks["layers"][0]) == ["q", "k", "down"]  # projection order, whatever the input
    assert masks["layers"][2]["down"].shape == (40, 48) and masks["layers"][1]["k"].shape == (48, 16)
    stacked = init_element_masks(CFG, stacked=True)
    assert set(stacked["layers"]) == set(PROJECTIONS)
    assert stacked["layers"]["o"].shape == (3, 48, 48) and float(stacked["layers"]["up"].min()) == 1.0
    with pytest.raises(ValueError, match="subset"):
        init_element_masks(CFG, ("q", "embed"))


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 0.77, 0.9])
def test_unstructured_exact_counts_per_matrix(stacked, ratio):
    masks = init_element_masks(CFG, stacked=stacked)
    scores = random_scores(masks)
    new = update_element_masks(masks, scores, ratio, excluded=(0,))
    for i, (layer, score) in enumerate(zip(layer_list(new), layer_list(scores))):
        for name, mask in layer.items():
            if i == 0:
                assert zeros(mask) == 0
                continue
            assert zeros(mask) == int(np.floor(mask.size * ratio + 1e-9)), (i, name)
            # the zeros are exactly the lowest scores
            k = zeros(mask)
            if k:
                lowest = np.argsort(score[name].reshape(-1), kind="stable")[:k]
                assert set(np.flatnonzero(mask.reshape(-1) == 0)) == set(lowest)


def test_unstructured_only_shrinks_and_never_revives():
    masks = init_element_masks(CFG)
    ratios = [0.1, 0.3, 0.3, 0.6]
    previous = None
    for step, ratio in enumerate(ratios):
        scores = random_scores(masks, seed=step)
        if previous is not None:  # the already-pruned weights now score best: still not revived
            scores = jax.tree.map(lambda s, m: np.where(np.asarray(m) == 0, 1e9, s), scores, masks)
        masks = update_element_masks(masks, scores, ratio)
        for i, layer in enumerate(layer_list(masks)):
            for name, mask in layer.items():
                assert zeros(mask) == int(np.floor(mask.size * ratio + 1e-9))
                if previous is not None:
                    assert np.all(mask[previous[i][name] == 0] == 0)
        previous = layer_list(masks)
    # a lower ratio than what is already pruned leaves the masks alone
    same = update_element_masks(masks, random_scores(masks, 9), 0.2)
    for a, b in zip(layer_list(same), previous):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_ties_go_to_lower_indices():
    masks = {"layers": [{"q": np.ones((4, 3), np.float32)}]}
    scores = {"layers": [{"q": np.ones((4, 3), np.float32)}]}
    new = update_element_masks(masks, scores, 0.5)
    np.testing.assert_array_equal(new["layers"][0]["q"].reshape(-1), [0] * 6 + [1] * 6)
    # global ties: earlier layer, then earlier projection, then index
    masks = {"layers": [{"q": np.ones((2, 2), np.float32), "k": np.ones((2, 2), np.float32)}] * 2}
    scores = jax.tree.map(np.zeros_like, masks)
    new = update_element_masks(masks, scores, 0.375, allocation="global", order=PROJECTIONS)  # 6 of 16
    assert [zeros(new["layers"][i][n]) for i in (0, 1) for n in ("q", "k")] == [4, 2, 0, 0]
    np.testing.assert_array_equal(new["layers"][0]["k"].reshape(-1), [0, 0, 1, 1])
    new = update_element_masks(masks, scores, 0.375, allocation="global")  # default: names sorted
    assert [zeros(new["layers"][i][n]) for i in (0, 1) for n in ("q", "k")] == [2, 4, 0, 0]


@pytest.mark.parametrize("stacked", [False, True])
def test_global_allocation_ranks_all_pruned_matrices_together(stacked):
    masks = init_element_masks(CFG, stacked=stacked)
    scores = random_scores(masks)
    # down of layer 1 scores low everywhere: global ranking prunes it first, whole
    layers = scores["layers"]
    if stacked:
        layers["down"][1] *= 1e-3
    else:
        layers[1]["down"] *= 1e-3
    new = update_element_masks(masks, scores, 0.4, excluded=(2,), allocation="global")
    got = layer_list(new)
    pruned = [got[i][n] for i in (0, 1) for n in got[i]]
    total = sum(m.size for m in pruned)
    assert sum(zeros(m) for m in pruned) == int(np.floor(total * 0.4))
    assert all(zeros(m) == 0 for m in got[2].values())
    assert zeros(got[1]["down"]) == got[1]["down"].size
    # the pruned set is the globally lowest-scoring one
    flat_scores = np.concatenate([layer_list(scores)[i][n].reshape(-1) for i in (0, 1) for n in got[i]])
    flat_masks = np.concatenate([m.reshape(-1) for m in pruned])
    threshold = np.sort(flat_scores)[zeros(flat_masks) - 1]
    assert flat_scores[flat_masks == 0].max() == threshold
    assert flat_scores[flat_masks != 0].min() > threshold
    # uniform at the same ratio treats every matrix alike
    uni = layer_list(update_element_masks(masks, scores, 0.4, excluded=(2,)))
    assert zeros(uni[1]["down"]) == int(0.4 * 40 * 48)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 4), (4, 8)])
@pytest.mark.parametrize("stacked", [False, True])
def test_nm_at_full_fraction_every_block_keeps_its_n_best(n, m, stacked):
    masks = init_element_masks(CFG, stacked=stacked)
    scores = random_scores(masks, 3)
    new = update_nm_masks(masks, scores, 1.0, n, m, excluded=(2,))
    for i, (layer, score) in enumerate(zip(layer_list(new), layer_list(scores))):
        for name, mask in layer.items():
            rows, cols = mask.shape
            blocks = (mask != 0).reshape(rows // m, m, cols)
            if i == 2:
                assert blocks.all()
                continue
            assert (blocks.sum(axis=1) == n).all(), (i, name)
            assert nm_fraction(mask, n, m) == 1.0
            assert zeros(mask) == mask.size * (m - n) // m
            # the kept ones are the n highest-scoring of each block
            s = score[name].reshape(rows // m, m, cols)
            kth = np.sort(s, axis=1)[:, m - n : m - n + 1]
            assert (blocks == (s >= kth)).all()


def test_nm_progression_is_monotone_with_exact_block_counts():
    n, m = 2, 4
    masks = init_element_masks(CFG)
    previous = layer_list(masks)
    for step, fraction in enumerate([0.0, 0.1, 0.25, 0.5, 0.5, 0.8, 1.0]):
        scores = random_scores(masks, seed=10 + step)
        masks = update_nm_masks(masks, scores, fraction, n, m)
        current = layer_list(masks)
        for layer, before in zip(current, previous):
            for name, mask in layer.items():
                rows, cols = mask.shape
                n_blocks = rows * cols // m
                done = int(np.floor(n_blocks * fraction + 1e-9))
                kept = (mask != 0).reshape(rows // m, m, cols).sum(axis=1)
                assert set(np.unique(kept)) <= {n, m}  # each block is either N:M or untouched
                assert int((kept == n).sum()) == done
                assert zeros(mask) == done * (m - n)
                assert np.all(mask[before[name] == 0] == 0)  # masks only shrink
        previous = current


def test_nm_partial_picks_the_blocks_that_lose_least():
    m_ = np.ones((8, 2), np.float32)  # 2 blocks per column, 4 blocks
    s = np.array([[9, 1], [9, 1], [9, 1], [9, 1],
                  [5, 8], [0, 8], [1, 8], [6, 8]], np.float32)
    # 2:4 removes the two lowest of each block: costs col 0: (9+9, 0+1), col 1: (1+1, 8+8)
    new = update_nm_masks({"layers": [{"q": m_}]}, {"layers": [{"q": s}]}, 0.5)["layers"][0]["q"]
    np.testing.assert_array_equal(new[:, 0], [1, 1, 1, 1, 1, 0, 0, 1])  # block (1, 0): cost 1
    np.testing.assert_array_equal(new[:, 1], [0, 0, 1, 1, 1, 1, 1, 1])  # block (0, 1): cost 2
    # ties within a block: lower rows go first
    flat = update_nm_masks({"layers": [{"q": np.ones((4, 1), np.float32)}]},
                           {"layers": [{"q": np.zeros((4, 1), np.float32)}]}, 1.0)
    np.testing.assert_array_equal(flat["layers"][0]["q"][:, 0], [0, 0, 1, 1])


def test_nm_validation():
    masks = init_element_masks(CFG)
    scores = random_scores(masks)
    for n, m, msg in [(4, 4, "1 <= n < m"), (0, 4, "1 <= n < m"), (2.5, 4, "integer")]:
        with pytest.raises(ValueError, match=msg):
            update_nm_masks(masks, scores, 1.0, n, m)
    with pytest.raises(ValueError, match=r"layer 0 'q' has input dimension 48, not divisible by M=7"):
        update_nm_masks(masks, scores, 1.0, 2, 7, order=PROJECTIONS)
    with pytest.raises(ValueError, match="fraction"):
        update_nm_masks(masks, scores, 1.5)
    with pytest.raises(ValueError, match=r"'down' has input dimension 40, not divisible by M=16"):
        check_nm(CFG, ("down",), 2, 16)
    check_nm(CFG, ("down",), 2, 8)  # 40 = 5 blocks of 8
    check_nm(CFG, ("down",), 2, 16, excluded=(0, 1, 2))  # nothing pruned: nothing to check


def test_bad_inputs_raise_clearly():
    masks = init_element_masks(CFG)
    scores = random_scores(masks)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        update_element_masks(masks, scores, 1.0)
    with pytest.raises(ValueError, match="allocation"):
        update_element_masks(masks, scores, 0.5, allocation="per-head")
    bad = jax.tree.map(lambda x: x, scores)
    bad["layers"][1]["v"] = bad["layers"][1]["v"][:, :8]
    with pytest.raises(ValueError, match=r"layer 1 'v': mask \(48, 16\) vs scores \(48, 8\)"):
        update_element_masks(masks, bad, 0.5)
    bad = jax.tree.map(lambda x: x, scores)
    bad["layers"][2]["up"] = bad["layers"][2]["up"] * np.nan
    with pytest.raises(ValueError, match="not all finite"):
        update_nm_masks(masks, bad, 0.5)
    with pytest.raises(ValueError, match="out of range"):
        update_element_masks(masks, scores, 0.5, excluded=(3,))
    with pytest.raises(ValueError, match="'layers'"):
        sparsity_stats({"q": np.ones((2, 2))})


def test_array_types_dtypes_and_shardings_are_kept():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    rep = NamedSharding(mesh, PartitionSpec())
    masks = jax.device_put(init_element_masks(CFG, stacked=True), rep)
    new = update_element_masks(masks, random_scores(masks), 0.5)
    for name, arr in new["layers"].items():
        assert isinstance(arr, jax.Array) and arr.sharding == rep and arr.dtype == jnp.float32
    bf16 = {"layers": [{"q": np.ones((8, 2), jnp.bfloat16)}]}
    out = update_nm_masks(bf16, {"layers": [{"q": np.random.rand(8, 2)}]}, 1.0)
    assert isinstance(out["layers"][0]["q"], np.ndarray) and out["layers"][0]["q"].dtype == jnp.bfloat16
    assert zeros(out["layers"][0]["q"]) == 8


def test_apply_element_masks_and_stats():
    rng = np.random.RandomState(0)
    base = {"embed": rng.randn(5, 4), "layers": [
        {"q": rng.randn(4, 6).astype(np.float32), "attn_norm": np.ones(4), "down": rng.randn(8, 4)}]}
    masks = {"layers": [{"q": (rng.rand(4, 6) > 0.5).astype(np.float32)}]}
    out = apply_element_masks(base, masks)
    q, mk = out["layers"][0]["q"], masks["layers"][0]["q"]
    assert q.dtype == np.float32 and np.all(q[mk == 0] == 0)
    np.testing.assert_array_equal(q[mk != 0], base["layers"][0]["q"][mk != 0])
    assert out["layers"][0]["down"] is base["layers"][0]["down"] and out["embed"] is base["embed"]
    stacked = apply_element_masks({"layers": {"q": jnp.ones((2, 4, 4))}},
                                  {"layers": {"q": jnp.zeros((2, 4, 4))}})
    assert float(jnp.abs(stacked["layers"]["q"]).sum()) == 0.0

    two = {"layers": [{"q": np.array([[0, 1], [0, 1]]), "up": np.ones((2, 3))},
                      {"q": np.zeros((2, 2)), "up": np.array([[1, 1, 0], [0, 1, 1]])}]}
    st = llama_sparsity_stats(two, excluded=(0,))
    assert st["zeros"] == 2 + 0 + 4 + 2 and st["total"] == 20
    assert st["sparsity"] == pytest.approx(8 / 20)
    assert st["projections"] == {"q": pytest.approx(6 / 8), "up": pytest.approx(2 / 12)}
    assert st["layers"] == [pytest.approx(2 / 10), pytest.approx(6 / 10)]
    assert st["pruned_layers"]["sparsity"] == pytest.approx(6 / 10)
    assert st["pruned_layers"]["projections"] == {"q": 1.0, "up": pytest.approx(2 / 6)}
    assert st["attn_kept"] == pytest.approx(2 / 8) and st["mlp_kept"] == pytest.approx(10 / 12)
