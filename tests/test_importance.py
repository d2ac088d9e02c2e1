"""LoRA-guided importance: the estimated gradient, element scores, the moving average."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from loraprune_jax.core.importance import ema_update, estimate_weight_grad, lora_guided_importance


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
