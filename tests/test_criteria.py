"""Baseline criteria reduce to the same groups as LoRAPrune's, from their own element scores."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import reference_group_scores
from loraprune_jax.pruning.criteria import element_scores, layer_scores, merged_weight
from loraprune_jax.pruning.importance import layer_group_scores, lora_guided_importance

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
    merged = {n: layer[n] + (2.0 * adapters[n]["a"] @ adapters[n]["b"] if n in adapters else 0.0)
              for n in SHAPES}
    got = layer_scores("magnitude", layer, adapters, K, scale=2.0, power=2)
    want = reference_group_scores({n: np.abs(w) ** 2 for n, w in merged.items()}, K, F)
    np.testing.assert_allclose(got["attn"], want["attn"], rtol=1e-5)

    grads = {n: rand(*s, seed=40 + i) for i, (n, s) in enumerate(SHAPES.items())}
    got = layer_scores("vanilla", layer, adapters, K, scale=2.0, weight_grads=grads)
    want = reference_group_scores({n: np.abs(grads[n] * merged[n]) for n in SHAPES}, K, F)
    np.testing.assert_allclose(got["mlp"], want["mlp"], rtol=1e-5)

    stats = {"attn_in": rand(D, seed=1) ** 2, "o_in": rand(H * HD, seed=2) ** 2,
             "mlp_in": rand(D, seed=3) ** 2, "down_in": rand(F, seed=4) ** 2}
    got = layer_scores("wanda", layer, adapters, K, scale=2.0, input_stats=stats)
    # Wanda: |W| times the RMS of the input each row of W reads
    reads = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in",
             "gate": "mlp_in", "up": "mlp_in", "down": "down_in"}
    want = reference_group_scores(
        {n: np.abs(merged[n]) * np.sqrt(stats[reads[n]])[:, None] for n in SHAPES}, K, F)
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
                      ("wanda", "input activation"), ("random", "PRNG key"), ("fisher", "no weight scores"),
                      ("obs", "unknown")]:
        with pytest.raises(ValueError, match=msg):
            layer_scores(crit, layer, None, K, scale=1.0)


def test_element_scores_are_what_layer_scores_reduce(layer, adapters):
    grads = {n: rand(*s, seed=40 + i) for i, (n, s) in enumerate(SHAPES.items())}
    lgrads = {n: {"a": rand(SHAPES[n][0], R, seed=60 + i), "b": rand(R, SHAPES[n][1], seed=70 + i)}
              for i, n in enumerate(adapters)}
    stats = {"attn_in": rand(D, seed=1) ** 2, "o_in": rand(H * HD, seed=2) ** 2,
             "mlp_in": rand(D, seed=3) ** 2, "down_in": rand(F, seed=4) ** 2}
    kw = dict(scale=2.0, power=2, lora_grads=lgrads, weight_grads=grads, input_stats=stats)
    for criterion in ("lora", "vanilla", "magnitude", "wanda"):
        elements = element_scores(criterion, layer, adapters, **kw)
        want = set(adapters) if criterion == "lora" else set(SHAPES)
        assert set(elements) == want
        assert all(elements[n].shape == SHAPES[n] and elements[n].dtype == np.float32 for n in want)
        groups = layer_scores(criterion, layer, adapters, K, **kw)
        reduced = layer_group_scores(elements, K, F)
        np.testing.assert_array_equal(groups["attn"], reduced["attn"])
        np.testing.assert_array_equal(groups["mlp"], reduced["mlp"])
    q = adapters["q"]
    np.testing.assert_array_equal(
        element_scores("lora", layer, adapters, **kw)["q"],
        lora_guided_importance(layer["q"], q["a"], q["b"], lgrads["q"]["a"], lgrads["q"]["b"], 2.0, 2))
    picked = element_scores("magnitude", layer, adapters, scale=2.0, names=("o", "down"))
    assert list(picked) == ["o", "down"]
    np.testing.assert_allclose(picked["o"], np.abs(layer["o"]), rtol=1e-6)
    with pytest.raises(ValueError, match=r"cannot score \['k'\]: they have no adapters"):
        element_scores("lora", layer, adapters, scale=2.0, lora_grads=lgrads, names=("q", "k"))


def test_random_element_scores_are_uniform_noise_per_weight(layer):
    a = element_scores("random", layer, None, scale=1.0, key=jax.random.PRNGKey(0))
    b = element_scores("random", layer, None, scale=1.0, key=jax.random.PRNGKey(0))
    assert {n: v.shape for n, v in a.items()} == SHAPES
    np.testing.assert_array_equal(a["down"], b["down"])
    values = np.concatenate([np.asarray(v).reshape(-1) for v in a.values()])
    assert values.min() >= 0.0 and values.max() < 1.0 and len(np.unique(values)) == values.size
    assert not np.array_equal(np.asarray(a["q"])[:, :4], np.asarray(a["k"]))  # one key each


# Any declared model: LLaMA's declaration through declared_scores gives LLaMA's own scores ----
@pytest.mark.slow
def test_declared_scores_equal_llama_scores():
    from conftest import randomize_b, tiny_config
    from loraprune_jax.config import LoraConfig
    from loraprune_jax.models.llama import init_base
    from loraprune_jax.models.lora import init_lora
    from loraprune_jax.pruning.criteria import declared_scores
    from loraprune_jax.pruning.groups import llama_declaration
    from loraprune_jax.pruning.importance import lora_layer_scores

    cfg = tiny_config("gqa")
    lc = LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "o", "up", "down"))
    base = init_base(cfg, 0, std=0.3)
    lora = randomize_b(init_lora(jax.random.PRNGKey(0), base, lc))
    grads = randomize_b(jax.tree.map(lambda x: 0.1 * x, lora), key=7)
    decl = llama_declaration(cfg)
    got = declared_scores("lora", base, lora, decl, scale=lc.scale, lora_grads=grads)
    mag = declared_scores("magnitude", base, lora, decl, scale=lc.scale, power=2)
    for i in range(cfg.num_layers):
        want = lora_layer_scores(base["layers"][i], lora["layers"][i], grads["layers"][i], lc.scale,
                                 cfg.kv_heads(i))
        want_mag = layer_scores("magnitude", base["layers"][i], lora["layers"][i], cfg.kv_heads(i),
                                scale=lc.scale, power=2)
        for kind in ("attn", "mlp"):
            np.testing.assert_allclose(got["layers"][i][kind], want[kind], rtol=1e-5)
            np.testing.assert_allclose(mag["layers"][i][kind], want_mag[kind], rtol=1e-5)
    rnd = declared_scores("random", base, None, decl, scale=1.0, key=jax.random.PRNGKey(3))
    assert [r["attn"].shape for r in rnd["layers"]] == [(cfg.kv_heads(i),) for i in range(cfg.num_layers)]
    with pytest.raises(ValueError, match="not available for declared"):
        declared_scores("wanda", base, lora, decl, scale=1.0)
    with pytest.raises(ValueError, match="gradients"):
        declared_scores("lora", base, lora, decl, scale=1.0)
