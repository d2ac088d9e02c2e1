"""LoRA-guided importance: the estimated gradient, element scores, group reductions, EMA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from conftest import reference_group_scores
from loraprune_jax.pruning.importance import (
    block_scores,
    ema_update,
    estimate_weight_grad,
    layer_group_scores,
    lora_guided_importance,
    lora_layer_scores,
    reduce_to_groups,
)


def rand(*shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def test_estimate_is_the_change_of_ab_after_one_sgd_step():
    a, b, ga, gb = rand(7, 3, seed=1), rand(3, 5, seed=2), rand(7, 3, seed=3), rand(3, 5, seed=4)
    got = np.asarray(estimate_weight_grad(a, b, ga, gb))
    np.testing.assert_allclose(got, a @ b - (a - ga) @ (b - gb), atol=1e-5)
    # the authors' PyTorch-layout expression, transposed
    a_pt, b_pt, ga_pt, gb_pt = a.T, b.T, ga.T, gb.T
    torch_layout = gb_pt @ a_pt + b_pt @ ga_pt - gb_pt @ ga_pt
    np.testing.assert_allclose(got, torch_layout.T, atol=1e-5)


def test_element_importance_powers():
    # by hand, rank 1: G = a b - (a - ga)(b - gb) = [[2, .5], [0, 7]], W + .5 a b = [[2.5, -.5], [1, -.5]]
    a, b = np.array([[1.0], [2.0]], np.float32), np.array([[3.0, -1.0]], np.float32)
    ga, gb = np.array([[0.5], [-1.0]], np.float32), np.array([[1.0, 2.0]], np.float32)
    w = np.array([[1.0, 0.0], [-2.0, 0.5]], np.float32)
    np.testing.assert_allclose(lora_guided_importance(w, a, b, ga, gb, 0.5), [[5.0, 0.25], [0.0, 3.5]], rtol=1e-6)
    np.testing.assert_allclose(lora_guided_importance(w, a, b, ga, gb, 0.5, power=2), [[25.0, 0.0625], [0.0, 12.25]],
                               rtol=1e-6)
    # random rank 2, against the definition as one SGD step on the pair
    w, a, b, ga, gb = rand(6, 4, seed=5), rand(6, 2, seed=6), rand(2, 4, seed=7), rand(6, 2, seed=8), rand(2, 4, seed=9)
    step = a.astype(np.float64) @ b - (a - ga).astype(np.float64) @ (b - gb)
    want = np.abs(step * (w + 0.5 * a.astype(np.float64) @ b))
    np.testing.assert_allclose(lora_guided_importance(w, a, b, ga, gb, 0.5), want, rtol=1e-5)
    np.testing.assert_allclose(lora_guided_importance(w, a, b, ga, gb, 0.5, power=2), want**2, rtol=1e-4)


def test_reduce_to_groups_axes():
    s = np.arange(24, dtype=np.float32).reshape(4, 6)  # (in=4, out=6)
    # output columns in 3 groups of 2, summed over inputs
    col = s.sum(0)
    np.testing.assert_allclose(reduce_to_groups(s, 3, axis=1), [col[0] + col[1], col[2] + col[3], col[4] + col[5]])
    # input rows in 2 groups of 2, summed over outputs
    row = s.sum(1)
    np.testing.assert_allclose(reduce_to_groups(s, 2, axis=0), [row[0] + row[1], row[2] + row[3]])
    assert reduce_to_groups(s[:, :0], 0, axis=1).shape == (0,)


def test_block_scores_normalise_each_module():
    v1, v2 = jnp.array([3.0, 4.0]), jnp.array([100.0, 0.0])
    np.testing.assert_allclose(block_scores({"q": v1, "o": v2}), [0.6 + 1.0, 0.8], rtol=1e-6)


def test_gqa_layer_groups_follow_kv_groups():
    d, hd, heads, kv, ffn = 4, 2, 6, 2, 3
    elems = {
        "q": rand(d, heads * hd, seed=1) ** 2,
        "k": rand(d, kv * hd, seed=2) ** 2,
        "v": rand(d, kv * hd, seed=3) ** 2,
        "o": rand(heads * hd, d, seed=4) ** 2,
        "gate": rand(d, ffn, seed=5) ** 2,
        "down": rand(ffn, d, seed=6) ** 2,
    }
    got = layer_group_scores(elems, kv, ffn)
    want = reference_group_scores(elems, kv, ffn)  # 3 query heads x hd columns per unit
    np.testing.assert_allclose(got["attn"], want["attn"], rtol=1e-5)
    np.testing.assert_allclose(got["mlp"], want["mlp"], rtol=1e-5)
    no_mlp = layer_group_scores({k_: v_ for k_, v_ in elems.items() if k_ in "qkvo"}, kv, ffn)
    np.testing.assert_array_equal(no_mlp["mlp"], np.zeros(ffn))


def test_gqa_layer_groups_by_hand():
    """4 query heads of width 2 on 2 KV heads: unit u owns q columns 4u..4u+3, k/v columns 2u,
    2u+1 and o rows 4u..4u+3. Module sums are 3-4-5 triangles, so the normalised scores are exact."""
    elems = {
        "q": [[1, 0, 0, 1, 0, 2, 0, 0], [0, 1, 0, 0, 1, 0, 1, 0]],  # unit sums 3, 4 -> .6, .8
        "k": [[0, 0, 2, 0], [0, 0, 1, 2]],                          # 0, 5 -> 0, 1
        "v": [[6, 0, 0, 8], [0, 0, 0, 0]],                          # 6, 8 -> .6, .8
        "o": [[0, 0]] * 3 + [[0.5, 0.5]] + [[0, 0]] * 4,            # 1, 0 -> 1, 0
        "gate": [[3, 0], [2, 0]],                                   # 5, 0 -> 1, 0
        "up": [[0, 2], [0, 0]],                                     # 0, 2 -> 0, 1
        "down": [[1, 2], [4, 0]],                                   # rows: 3, 4 -> .6, .8
    }
    got = layer_group_scores({n: np.array(e, np.float32) for n, e in elems.items()}, 2, 2)
    np.testing.assert_allclose(got["attn"], [2.2, 2.6], rtol=1e-6)
    np.testing.assert_allclose(got["mlp"], [1.6, 1.8], rtol=1e-6)


def test_lora_layer_scores_from_adapters():
    d, hd, heads, kv, ffn, r = 4, 2, 4, 4, 3, 2
    shapes = {"q": (d, heads * hd), "k": (d, kv * hd), "v": (d, kv * hd), "o": (heads * hd, d),
              "gate": (d, ffn), "up": (d, ffn), "down": (ffn, d)}
    layer = {n: rand(*s, seed=i) for i, (n, s) in enumerate(shapes.items())}
    adapters = {n: {"a": rand(s[0], r, seed=10 + i), "b": rand(r, s[1], seed=20 + i)} for i, (n, s) in enumerate(shapes.items())}
    grads = {n: {"a": rand(s[0], r, seed=30 + i), "b": rand(r, s[1], seed=40 + i)} for i, (n, s) in enumerate(shapes.items())}
    got = lora_layer_scores(layer, adapters, grads, 2.0, kv)
    elems = {}
    for n, p in adapters.items():  # the definition: |(change of A B after one SGD step) * merged W|
        a, b = p["a"].astype(np.float64), p["b"].astype(np.float64)
        ga, gb = grads[n]["a"], grads[n]["b"]
        elems[n] = np.abs((a @ b - (a - ga) @ (b - gb)) * (layer[n] + 2.0 * a @ b))
    want = reference_group_scores(elems, kv, ffn)
    np.testing.assert_allclose(got["attn"], want["attn"], rtol=1e-6)
    np.testing.assert_allclose(got["mlp"], want["mlp"], rtol=1e-6)
    assert got["attn"].shape == (kv,) and got["mlp"].shape == (ffn,)


def test_ema_update_and_nan_guard():
    prev = {"attn": jnp.array([1.0, 2.0]), "mlp": jnp.array([0.0])}
    new = {"attn": jnp.array([3.0, 4.0]), "mlp": jnp.array([10.0])}
    out, skipped = ema_update(prev, new)
    np.testing.assert_allclose(out["attn"], [1.2, 2.2], rtol=1e-6)
    np.testing.assert_allclose(out["mlp"], [1.0], rtol=1e-6)
    assert not bool(skipped)
    bad = {"attn": jnp.array([3.0, jnp.nan]), "mlp": jnp.array([jnp.inf])}
    out, skipped = jax.jit(ema_update)(prev, bad)
    assert bool(skipped)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), out, prev)
