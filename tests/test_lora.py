"""LoRA adapters: initialisation, the unmerged linear map, merging."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from loraprune_jax.config import LoraConfig
from loraprune_jax.models.llama import forward
from loraprune_jax.models.llama_params import init_base, stack_layers
from loraprune_jax.core.lora import lora_linear
from loraprune_jax.models.lora import count_lora_params, init_lora, merge_lora


def test_init_shapes_bounds_and_zero_b():
    cfg = tiny_config("gqa")
    base = init_base(cfg, 0)
    lc = LoraConfig(rank=3, targets=("q", "v", "down"))
    lora = init_lora(jax.random.PRNGKey(0), base, lc)
    assert len(lora["layers"]) == cfg.num_layers
    for layer, adapters in zip(base["layers"], lora["layers"]):
        assert set(adapters) == {"q", "v", "down"}
        for name, p in adapters.items():
            fan_in, fan_out = layer[name].shape
            assert p["a"].shape == (fan_in, 3) and p["b"].shape == (3, fan_out)
            assert float(jnp.abs(p["a"]).max()) <= 1.0 / math.sqrt(fan_in)
            assert float(jnp.abs(p["a"]).max()) > 0.5 / math.sqrt(fan_in)  # really uniform in the bound
            assert not jnp.any(p["b"])
    expected = sum(3 * (l["q"].shape[0] + l["q"].shape[1] + l["v"].shape[0] + l["v"].shape[1]
                        + l["down"].shape[0] + l["down"].shape[1]) for l in base["layers"])
    assert count_lora_params(lora) == expected
    stacked = init_lora(jax.random.PRNGKey(0), stack_layers(base), lc)
    assert stacked["layers"]["q"]["a"].shape == (cfg.num_layers, cfg.hidden_size, 3)
    np.testing.assert_array_equal(stacked["layers"]["q"]["a"][1], lora["layers"][1]["q"]["a"])


def test_lora_linear_equals_merged_weight():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k1, (5, 7))
    w = jax.random.normal(k2, (7, 4))
    pair = {"a": jax.random.normal(k3, (7, 2)), "b": jax.random.normal(k4, (2, 4))}
    got = lora_linear(x, w, pair, 0.5)
    np.testing.assert_allclose(got, x @ (w + 0.5 * pair["a"] @ pair["b"]), atol=1e-5)
    np.testing.assert_array_equal(lora_linear(x, w, None, 0.5), x @ w)


def test_merged_model_equals_unmerged(tokens):
    cfg = tiny_config("gqa", tied=False)
    base = init_base(cfg, 0, std=0.2)
    lc = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
    lora = init_lora(jax.random.PRNGKey(1), base, lc)
    lora = jax.tree.map(lambda x: x + 0.1, lora)  # non-zero B
    want = forward(base, lora, None, tokens, cfg, lc)
    merged = merge_lora(base, lora, lc)
    np.testing.assert_allclose(forward(merged, None, None, tokens, cfg), want, atol=1e-4, rtol=1e-4)
    merged_stacked = merge_lora(stack_layers(base), stack_layers(lora), lc)
    np.testing.assert_allclose(
        forward(merged_stacked, None, None, tokens, cfg), want, atol=1e-4, rtol=1e-4
    )
    assert merge_lora(base, None, lc) is base


def test_config_validation():
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        LoraConfig(targets=("q", "lm_head"))
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraConfig(dropout=1.0)
    assert LoraConfig(rank=8, alpha=16).scale == 2.0


def test_lora_linear_gradients_over_batch_and_sequence():
    """The adapter path flattens (batch, seq) to tokens: values and gradients (x, A, B) equal
    the per-example formula with the same dropout mask."""
    r = np.random.RandomState(0)
    x = jnp.asarray(r.randn(3, 5, 16), jnp.float32)
    w = jnp.asarray(r.randn(16, 12), jnp.float32)
    pair = {"a": jnp.asarray(r.randn(16, 4), jnp.float32), "b": jnp.asarray(r.randn(4, 12), jnp.float32)}
    key = jax.random.PRNGKey(3)
    keep = jax.random.bernoulli(key, 0.8, x.shape)

    def ours(x, pair):
        return jnp.sum(jnp.sin(lora_linear(x, w, pair, 0.5, 0.2, key)))

    def reference(x, pair):
        xd = jnp.where(keep, x / 0.8, 0.0)
        y = jnp.einsum("btd,do->bto", x, w) + 0.5 * jnp.einsum("btd,dr,ro->bto", xd, pair["a"], pair["b"])
        return jnp.sum(jnp.sin(y))

    got, want = jax.grad(ours, (0, 1))(x, pair), jax.grad(reference, (0, 1))(x, pair)
    np.testing.assert_allclose(ours(x, pair), reference(x, pair), rtol=1e-5)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
