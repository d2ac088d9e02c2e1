"""Baseline criteria reduce to the same groups as LoRAPrune's, from their own element scores."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from loraprune_jax.pruning.criteria import INPUT_STAT, layer_scores, merged_weight
from loraprune_jax.pruning.importance import layer_group_scores

D, HD, H, K, F, R = 4, 2, 6, 2, 3, 2
SHAPES = {"q": (D, H * HD), "k": (D, K * HD), "v": (D, K * HD), "o": (H * HD, D),
          "gate": (D, F), "up": (D, F), "down": (F, D)}


def rand(*shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


@pytest.fixture
def layer():
    out = {n: rand(*s, seed=i) for i, (n, s) in enumerate(SHAPES.items())}
    out.update(attn_norm=np.ones(D, np.float32), mlp_norm=np.ones(D, np.float32))
    return out


@pytest.fixture
def adapters():
    return {n: {"a": rand(s[0], R, seed=10 + i), "b": rand(R, s[1], seed=20 + i)}
            for i, (n, s) in enumerate(SHAPES.items()) if n in ("q", "up")}


def test_merged_weight(layer, adapters):
    want = layer["q"] + 2.0 * adapters["q"]["a"] @ adapters["q"]["b"]
    np.testing.assert_allclose(merged_weight(layer, adapters, "q", 2.0), want, rtol=1e-5)
    np.testing.assert_array_equal(merged_weight(layer, adapters, "k", 2.0), layer["k"])


def test_magnitude_and_vanilla_and_wanda(layer, adapters):
    merged = {n: np.asarray(merged_weight(layer, adapters, n, 2.0)) for n in SHAPES}
    got = layer_scores("magnitude", layer, adapters, K, scale=2.0, power=2)
    want = layer_group_scores({n: np.abs(w) ** 2 for n, w in merged.items()}, K, F)
    np.testing.assert_allclose(got["attn"], want["attn"], rtol=1e-5)

    grads = {n: rand(*s, seed=40 + i) for i, (n, s) in enumerate(SHAPES.items())}
    got = layer_scores("vanilla", layer, adapters, K, scale=2.0, weight_grads=grads)
    want = layer_group_scores({n: np.abs(grads[n] * merged[n]) for n in SHAPES}, K, F)
    np.testing.assert_allclose(got["mlp"], want["mlp"], rtol=1e-5)

    stats = {"attn_in": rand(D, seed=1) ** 2, "o_in": rand(H * HD, seed=2) ** 2,
             "mlp_in": rand(D, seed=3) ** 2, "down_in": rand(F, seed=4) ** 2}
    got = layer_scores("wanda", layer, adapters, K, scale=2.0, input_stats=stats)
    want = layer_group_scores(
        {n: np.abs(merged[n]) * np.sqrt(stats[INPUT_STAT[n]])[:, None] for n in SHAPES}, K, F)
    np.testing.assert_allclose(got["attn"], want["attn"], rtol=1e-5)
    np.testing.assert_allclose(got["mlp"], want["mlp"], rtol=1e-5)


def test_random_is_keyed_and_shaped(layer):
    a = layer_scores("random", layer, None, K, scale=1.0, key=jax.random.PRNGKey(0))
    b = layer_scores("random", layer, None, K, scale=1.0, key=jax.random.PRNGKey(0))
    c = layer_scores("random", layer, None, K, scale=1.0, key=jax.random.PRNGKey(1))
    assert a["attn"].shape == (K,) and a["mlp"].shape == (F,)
    np.testing.assert_array_equal(a["mlp"], b["mlp"])
    assert not np.array_equal(np.asarray(a["mlp"]), np.asarray(c["mlp"]))


def test_missing_inputs_raise(layer):
    for crit, msg in [("lora", "LoRA adapters"), ("vanilla", "gradients of the frozen"),
                      ("wanda", "input activation"), ("random", "PRNG key"), ("fisher", "unknown")]:
        with pytest.raises(ValueError, match=msg):
            layer_scores(crit, layer, None, K, scale=1.0)
