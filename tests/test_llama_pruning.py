"""LLaMA's declaration: units and channels, their masks, scores through the core, widths."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import reference_group_scores, tiny_config
from loraprune_jax.core.groups import declared_masks, group_scores
from loraprune_jax.models.llama import expand_unit_mask
from loraprune_jax.models.llama_pruning import (INPUT_STAT, init_masks, layer_scores,
                                                llama_declaration, llama_layer_groups, masked_widths)

D, HD, H, K, F, R = 4, 2, 6, 2, 3, 2
SHAPES = {"q": (D, H * HD), "k": (D, K * HD), "v": (D, K * HD), "o": (H * HD, D),
          "gate": (D, F), "up": (D, F), "down": (F, D)}


def rand(*shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def gqa_oracle(elems):
    return reference_group_scores(elems, K, F)


@pytest.fixture
def layer():
    out = {n: rand(*s, seed=i) for i, (n, s) in enumerate(SHAPES.items())}
    out.update(attn_norm=np.ones(D, np.float32), mlp_norm=np.ones(D, np.float32))
    return out


@pytest.fixture
def adapters():
    return {n: {"a": rand(s[0], R, seed=10 + i), "b": rand(R, s[1], seed=20 + i)}
            for i, (n, s) in enumerate(SHAPES.items()) if n in ("q", "up")}


def test_units_are_kv_heads():
    assert init_masks(tiny_config("mha"))["layers"][0]["attn"].shape == (4,)  # one unit per head
    assert init_masks(tiny_config("gqa"))["layers"][0]["attn"].shape == (2,)  # per KV group of 3


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



def test_gqa_groups_follow_kv_groups():
    elems = {n: rand(*s, seed=i) ** 2 for i, (n, s) in enumerate(SHAPES.items()) if n != "up"}
    got = group_scores({(n,): e for n, e in elems.items()}, llama_layer_groups(H, K, HD, F))
    want = gqa_oracle(elems)
    np.testing.assert_allclose(got["attn"], want["attn"], rtol=1e-5)
    np.testing.assert_allclose(got["mlp"], want["mlp"], rtol=1e-5)
    attn_only = {n: e for n, e in elems.items() if n in "qkvo"}
    got = group_scores({(n,): e for n, e in attn_only.items()}, llama_layer_groups(H, K, HD, F))
    np.testing.assert_array_equal(got["mlp"], np.zeros(F))


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
    got = group_scores({(n,): np.array(e, np.float32) for n, e in elems.items()}, llama_layer_groups(4, 2, 2, 2))
    np.testing.assert_allclose(got["attn"], [2.2, 2.6], rtol=1e-6)
    np.testing.assert_allclose(got["mlp"], [1.6, 1.8], rtol=1e-6)


def test_declaration_widths_and_masks():
    cfg = tiny_config("gqa")
    kinds = llama_declaration(cfg)[1]
    assert [c.path for c in kinds["attn"].couplings] == [("layers", 1, p) for p in "qkvo"]
    assert [c.width for c in kinds["attn"].couplings] == [3 * cfg.head_dim, cfg.head_dim, cfg.head_dim,
                                                          3 * cfg.head_dim]
    assert jax.tree.map(np.shape, declared_masks(llama_declaration(cfg))) == \
        jax.tree.map(np.shape, init_masks(cfg))


def test_magnitude_vanilla_wanda_scores(layer, adapters):
    merged = {n: layer[n] + (2.0 * adapters[n]["a"] @ adapters[n]["b"] if n in adapters else 0.0)
              for n in SHAPES}
    got = layer_scores("magnitude", layer, adapters, HD, scale=2.0, power=2)
    want = gqa_oracle({n: np.abs(w) ** 2 for n, w in merged.items()})
    np.testing.assert_allclose(got["attn"], want["attn"], rtol=1e-5)

    grads = {n: rand(*s, seed=40 + i) for i, (n, s) in enumerate(SHAPES.items())}
    got = layer_scores("vanilla", layer, adapters, HD, scale=2.0, weight_grads=grads)
    want = gqa_oracle({n: np.abs(grads[n] * merged[n]) for n in SHAPES})
    np.testing.assert_allclose(got["mlp"], want["mlp"], rtol=1e-5)

    stats = {"attn_in": rand(D, seed=1) ** 2, "o_in": rand(H * HD, seed=2) ** 2,
             "mlp_in": rand(D, seed=3) ** 2, "down_in": rand(F, seed=4) ** 2}
    got = layer_scores("wanda", layer, adapters, HD, scale=2.0, input_stats=stats)
    want = gqa_oracle({n: np.abs(merged[n]) * np.sqrt(stats[INPUT_STAT[n]])[:, None] for n in SHAPES})
    np.testing.assert_allclose(got["attn"], want["attn"], rtol=1e-5)
    np.testing.assert_allclose(got["mlp"], want["mlp"], rtol=1e-5)


def test_lora_scores_only_weights_with_adapters(layer, adapters):
    lgrads = {n: {"a": rand(SHAPES[n][0], R, seed=60 + i), "b": rand(R, SHAPES[n][1], seed=70 + i)}
              for i, n in enumerate(adapters)}
    got = layer_scores("lora", layer, adapters, HD, scale=2.0, lora_grads=lgrads)
    elems = {}
    for n, p in adapters.items():  # the paper's estimate, written out: (A gB + gA B - gA gB) * merged
        a, b, ga, gb = p["a"], p["b"], lgrads[n]["a"], lgrads[n]["b"]
        elems[n] = np.abs((a @ gb + ga @ b - ga @ gb) * (layer[n] + 2.0 * a @ b))
    want = gqa_oracle(elems)
    np.testing.assert_allclose(got["attn"], want["attn"], rtol=1e-4)
    np.testing.assert_allclose(got["mlp"], want["mlp"], rtol=1e-4)


def test_random_is_keyed_and_shaped(layer):
    a = layer_scores("random", layer, None, HD, scale=1.0, key=jax.random.PRNGKey(0))
    b = layer_scores("random", layer, None, HD, scale=1.0, key=jax.random.PRNGKey(0))
    c = layer_scores("random", layer, None, HD, scale=1.0, key=jax.random.PRNGKey(1))
    assert a["attn"].shape == (K,) and a["mlp"].shape == (F,)
    np.testing.assert_array_equal(a["mlp"], b["mlp"])
    assert not np.array_equal(np.asarray(a["mlp"]), np.asarray(c["mlp"]))


def test_missing_inputs_raise(layer):
    for crit, msg in [("lora", "LoRA adapters"), ("vanilla", "gradients of the frozen"),
                      ("wanda", "input activation"), ("random", "PRNG key"), ("fisher", "no weight scores"),
                      ("obs", "unknown")]:
        with pytest.raises(ValueError, match=msg):
            layer_scores(crit, layer, None, HD, scale=1.0)


def test_masked_widths_gqa():
    cfg = tiny_config("gqa")
    masks = init_masks(cfg)
    masks["layers"][1]["attn"] = np.array([0.0, 1.0], np.float32)
    masks["layers"][2]["mlp"] = np.concatenate([np.zeros(10), np.ones(30)]).astype(np.float32)
    heads, kv, ffn = masked_widths(cfg, masks)
    assert heads == (6, 3, 6) and kv == (2, 1, 2) and ffn == (40, 40, 30)
