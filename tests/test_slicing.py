"""Slice-and-merge: the smaller dense model equals the masked LoRA model, and is really smaller."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import noisy_norms, randomize_b, tiny_config
from loraprune_jax.config import LoraConfig
from loraprune_jax.models.llama import forward
from loraprune_jax.models.llama_params import check_base, init_base, stack_layers
from loraprune_jax.models.lora import init_lora
from loraprune_jax.core.groups import Coupling, GroupKind
from loraprune_jax.core.lora import merge_pairs
from loraprune_jax.core.slicing import apply_masks, kept_groups, slice_declared, slice_params
from loraprune_jax.core.trees import count_params
from loraprune_jax.models.llama_pruning import init_masks, llama_declaration, slice_and_merge

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0)


def setup(kind, tied=True, num_layers=5, seed=0):
    cfg = tiny_config(kind, tied, num_layers=num_layers)
    base = noisy_norms(init_base(cfg, seed, std=0.2))
    lora = randomize_b(init_lora(jax.random.PRNGKey(seed), base, LORA), key=seed + 1)
    return cfg, base, lora


def random_masks(cfg, seed=0, p=0.4, pruned_layers=None):
    """Random 0/1 masks on ``pruned_layers`` (others all ones), each layer keeping >= 1 group."""
    rs = np.random.RandomState(seed)
    masks = init_masks(cfg)
    pruned_layers = range(cfg.num_layers) if pruned_layers is None else pruned_layers
    for i in pruned_layers:
        for kind in ("attn", "mlp"):
            n = masks["layers"][i][kind].shape[0]
            m = (rs.rand(n) > p).astype(np.float32)
            m[rs.randint(n)] = 1.0
            masks["layers"][i][kind] = jnp.asarray(m)
    return masks


def expected_params(cfg, masks):
    """Parameter count after slicing, by hand from the widths."""
    d, hd = cfg.hidden_size, cfg.head_dim
    removed = 0
    for i, m in enumerate(masks["layers"]):
        g = cfg.heads(i) // cfg.kv_heads(i)
        gone_units = int(np.sum(np.asarray(m["attn"]) == 0))
        gone_ch = int(np.sum(np.asarray(m["mlp"]) == 0))
        removed += gone_units * (2 * g * hd * d + 2 * hd * d) + gone_ch * 3 * d
    return removed


@pytest.mark.parametrize("tied", [True, False])
def test_sliced_equals_masked(kind, tokens, tied):
    cfg, base, lora = setup(kind, tied)
    # layers 0 and 4 excluded (all ones), 1..3 pruned at random, 2 loses all attention units,
    # 3 all MLP channels.
    masks = random_masks(cfg, seed=7, pruned_layers=[1, 2, 3])
    masks["layers"][2]["attn"] = jnp.zeros_like(masks["layers"][2]["attn"])
    masks["layers"][3]["mlp"] = jnp.zeros_like(masks["layers"][3]["mlp"])
    want = np.asarray(forward(base, lora, masks, tokens, cfg, LORA))

    small, small_cfg = slice_and_merge(base, lora, masks, cfg, LORA)
    check_base(small, small_cfg)
    assert not small_cfg.is_uniform
    assert small_cfg.heads(2) == 0 and small_cfg.kv_heads(2) == 0
    assert small_cfg.ffn(3) == 0
    assert small_cfg.heads(0) == cfg.num_heads and small_cfg.ffn(4) == cfg.intermediate_size
    assert small["layers"][2]["q"].shape == (cfg.hidden_size, 0)
    assert small["layers"][3]["down"].shape == (0, cfg.hidden_size)
    got = np.asarray(forward(small, None, None, tokens, small_cfg))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # the pruning and the adapters both matter, so the comparison is not vacuous
    assert np.abs(want - np.asarray(forward(base, lora, None, tokens, cfg, LORA))).max() > 1e-3
    assert np.abs(want - np.asarray(forward(base, None, masks, tokens, cfg))).max() > 1e-3


def test_param_count_falls_by_removed_amount(kind):
    cfg, base, lora = setup(kind)
    masks = random_masks(cfg, seed=3, pruned_layers=[1, 2, 3])
    masks["layers"][2]["attn"] = jnp.zeros_like(masks["layers"][2]["attn"])
    small, small_cfg = slice_and_merge(base, lora, masks, cfg, LORA)
    removed = expected_params(cfg, masks)
    assert removed > 0
    assert count_params(base) == cfg.num_params()
    assert count_params(small) == count_params(base) - removed
    assert count_params(small) == small_cfg.num_params()


def test_stacked_inputs(kind, tokens):
    cfg, base, lora = setup(kind, num_layers=3)
    masks = random_masks(cfg, seed=11, pruned_layers=[1])
    want_small, want_cfg = slice_and_merge(base, lora, masks, cfg, LORA)
    got_small, got_cfg = slice_and_merge(
        stack_layers(base), stack_layers(lora), stack_layers(masks), cfg, LORA
    )
    assert got_cfg == want_cfg
    assert isinstance(got_small["layers"], list)
    for a, b in zip(jax.tree.leaves(got_small), jax.tree.leaves(want_small)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(
        np.asarray(forward(got_small, None, None, tokens, got_cfg)),
        np.asarray(forward(stack_layers(base), stack_layers(lora), stack_layers(masks), tokens, cfg, LORA)),
        atol=1e-4,
        rtol=1e-4,
    )


def test_uniform_pruning_collapses_config(tokens):
    cfg, base, lora = setup("gqa", num_layers=3)
    masks = init_masks(cfg)
    for layer in masks["layers"]:
        layer["attn"] = layer["attn"].at[0].set(0.0)
        layer["mlp"] = layer["mlp"].at[:10].set(0.0)
    small, small_cfg = slice_and_merge(base, lora, masks, cfg, LORA)
    assert small_cfg.is_uniform and small_cfg.layer_num_heads is None
    assert (small_cfg.num_heads, small_cfg.num_kv_heads, small_cfg.intermediate_size) == (3, 1, 30)
    np.testing.assert_allclose(
        np.asarray(forward(stack_layers(small), None, None, tokens, small_cfg)),
        np.asarray(forward(base, lora, masks, tokens, cfg, LORA)),
        atol=1e-4,
        rtol=1e-4,
    )


def test_without_lora_and_without_masks(kind, tokens):
    cfg, base, _ = setup(kind, num_layers=3)
    masks = random_masks(cfg, seed=5)
    small, small_cfg = slice_and_merge(base, None, masks, cfg)
    np.testing.assert_allclose(
        np.asarray(forward(small, None, None, tokens, small_cfg)),
        np.asarray(forward(base, None, masks, tokens, cfg)),
        atol=1e-4,
        rtol=1e-4,
    )
    same, same_cfg = slice_and_merge(base, None, None, cfg)
    assert same_cfg == cfg
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_merge_keeps_weight_dtype(tokens):
    cfg, base, lora = setup("gqa", num_layers=3)
    base16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    small, _ = slice_and_merge(base16, lora, random_masks(cfg), cfg, LORA)
    assert {x.dtype for x in jax.tree.leaves(small)} == {jnp.dtype(jnp.bfloat16)}


def test_kept_groups_and_columns_gqa():
    cfg = tiny_config("gqa")  # 6 heads, 2 KV heads, hd 8: unit u owns heads 3u..3u+2
    masks = init_masks(cfg)
    masks["layers"][0]["attn"] = jnp.array([0.0, 1.0])
    masks["layers"][0]["mlp"] = masks["layers"][0]["mlp"].at[jnp.array([1, 5])].set(0.0)
    ids = kept_groups(masks, llama_declaration(cfg))
    assert ids[0]["attn"].tolist() == [1] and ids[1]["attn"].tolist() == [0, 1]
    assert 1 not in ids[0]["mlp"] and 5 not in ids[0]["mlp"] and len(ids[0]["mlp"]) == 38
    base = init_base(cfg, 0)
    small, _ = slice_and_merge(base, None, masks, cfg)
    layer, kept = small["layers"][0], base["layers"][0]
    np.testing.assert_array_equal(layer["q"], kept["q"][:, 24:48])  # query heads 3, 4, 5
    np.testing.assert_array_equal(layer["o"], kept["o"][24:48])
    np.testing.assert_array_equal(layer["k"], kept["k"][:, 8:16])  # KV head 1
    np.testing.assert_array_equal(layer["v"], kept["v"][:, 8:16])
    np.testing.assert_array_equal(layer["down"], np.delete(np.asarray(kept["down"]), [1, 5], axis=0))


@pytest.mark.parametrize(
    "bad",
    [
        lambda m: m.at[0].set(0.5),
        lambda m: m.at[0].set(jnp.nan),
        lambda m: m.at[0].set(2.0),
        lambda m: m[:-1],
    ],
)
def test_bad_masks_raise(bad):
    cfg, base, lora = setup("gqa", num_layers=3)
    masks = init_masks(cfg)
    masks["layers"][1]["mlp"] = bad(masks["layers"][1]["mlp"])
    with pytest.raises(ValueError, match="masks layer 1 'mlp'"):
        slice_and_merge(base, lora, masks, cfg, LORA)


def test_lora_without_config_raises():
    cfg, base, lora = setup("gqa", num_layers=3)
    with pytest.raises(ValueError, match="lora_cfg"):
        slice_and_merge(base, lora, None, cfg)


# Any declared model ----------------------------------------------------------------------


def _toy(seed=0):
    """A two-block MLP with biases and a conv-shaped (HWIO) first weight, LoRA on both kernels."""
    k = jax.random.split(jax.random.PRNGKey(seed), 8)
    params = {"blocks": [{"w": jax.random.normal(k[0], (1, 1, 5, 6)), "b": jax.random.normal(k[1], (6,))},
                         {"w": jax.random.normal(k[2], (6, 8)), "b": jax.random.normal(k[3], (8,))}],
              "head": jax.random.normal(k[4], (8, 3))}
    lora = {"blocks": [{"w": {"a": jax.random.normal(k[5], (1, 1, 5, 2)), "b": jax.random.normal(k[6], (2, 6))}},
                       {"w": {"a": jax.random.normal(k[7], (6, 2)), "b": jnp.ones((2, 8))}}]}
    decl = [{"h": GroupKind(3, (Coupling(("blocks", 0, "w"), 3, 2), Coupling(("blocks", 0, "b"), 0, 2),
                                Coupling(("blocks", 1, "w"), 0, 2)))},
            {"h": GroupKind(8, (Coupling(("blocks", 1, "w"), -1), Coupling(("blocks", 1, "b"), 0),
                                Coupling(("head",), 0)))}]
    return params, lora, decl


def _toy_forward(params, x, lora=None, masks=None, scale=0.5):
    h = x[:, None, None, :]
    for i, blk in enumerate(params["blocks"]):
        w = blk["w"]
        if lora is not None:
            w = w + scale * (lora["blocks"][i]["w"]["a"] @ lora["blocks"][i]["w"]["b"])
        h = jax.nn.relu(h @ w.reshape(-1, w.shape[-1]) + blk["b"]) if i else \
            jax.nn.relu(jnp.einsum("bhwi,xyio->bhwo", h, w) + blk["b"])[:, 0, 0, :]
        if masks is not None:
            m = masks["layers"][i]["h"]
            h = h * jnp.repeat(m, h.shape[-1] // m.shape[0])
    return h @ params["head"]


@pytest.mark.slow
def test_declared_masked_equals_sliced():
    params, lora, decl = _toy()
    masks = {"layers": [{"h": jnp.array([1.0, 0.0, 1.0])}, {"h": jnp.array([0, 1, 1, 0, 1, 1, 1, 0.0])}]}
    x = jax.random.normal(jax.random.PRNGKey(9), (4, 5))
    small = slice_declared(params, lora, masks, decl, scale=0.5)
    assert small["blocks"][0]["w"].shape == (1, 1, 5, 4) and small["blocks"][1]["w"].shape == (4, 5)
    assert small["head"].shape == (5, 3) and small["blocks"][1]["b"].shape == (5,)
    np.testing.assert_allclose(_toy_forward(small, x), _toy_forward(params, x, lora, masks), rtol=1e-5,
                               atol=1e-5)
    assert params["blocks"][0]["w"].shape == (1, 1, 5, 6)  # inputs untouched


def test_slice_params_moves_lora_with_the_weight_and_stays_numpy():
    params, lora, decl = _toy()
    params, lora = jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, lora)
    kept = [{"h": np.array([0, 2])}, {"h": np.array([1, 4])}]
    sliced, sliced_lora = slice_params(params, decl, kept, lora)
    np.testing.assert_array_equal(sliced_lora["blocks"][0]["w"]["b"], lora["blocks"][0]["w"]["b"][:, [0, 1, 4, 5]])
    np.testing.assert_array_equal(sliced_lora["blocks"][0]["w"]["a"], lora["blocks"][0]["w"]["a"])
    np.testing.assert_array_equal(sliced_lora["blocks"][1]["w"]["a"], lora["blocks"][1]["w"]["a"][[0, 1, 4, 5]])
    np.testing.assert_array_equal(sliced_lora["blocks"][1]["w"]["b"], lora["blocks"][1]["w"]["b"][:, [1, 4]])
    merged = merge_pairs(sliced, sliced_lora, 2.0)
    assert isinstance(merged["blocks"][1]["w"], np.ndarray)
    np.testing.assert_allclose(merged["blocks"][1]["w"], sliced["blocks"][1]["w"] + 2.0 * (
        sliced_lora["blocks"][1]["w"]["a"] @ sliced_lora["blocks"][1]["w"]["b"]), rtol=1e-6)


def test_declared_slicing_errors():
    params, lora, decl = _toy()
    with pytest.raises(ValueError, match="exactly 0 or 1"):
        kept_groups({"layers": [{"h": jnp.array([1.0, 0.5, 1.0])}, {"h": jnp.ones(8)}]}, decl)
    with pytest.raises(ValueError, match="expected shape"):
        kept_groups({"layers": [{"h": jnp.ones(4)}, {"h": jnp.ones(8)}]}, decl)
    with pytest.raises(ValueError, match="lacks the group kinds"):
        kept_groups({"layers": [{"x": jnp.ones(3)}, {"h": jnp.ones(8)}]}, decl)
    bad = [{"h": GroupKind(4, decl[0]["h"].couplings)}, decl[1]]
    with pytest.raises(ValueError, match="the declaration 4 x 2"):
        slice_params(params, bad, [{"h": np.arange(4)}, {"h": np.arange(8)}])


def test_apply_masks_equals_gating_the_forward_pass():
    """Zeroing the declared weights (and the LoRA side that follows them) gives the model whose
    forward pass gates the groups, without touching that forward pass; pruned entries get no
    gradient."""
    params, lora, decl = _toy()
    masks = {"layers": [{"h": jnp.array([1.0, 0.0, 1.0])}, {"h": jnp.array([0, 1, 1, 0, 1, 1, 1, 0.0])}]}
    x = jax.random.normal(jax.random.PRNGKey(9), (4, 5))
    zeroed, zeroed_lora = apply_masks(params, masks, decl, lora)
    np.testing.assert_allclose(_toy_forward(zeroed, x, zeroed_lora), _toy_forward(params, x, lora, masks),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(zeroed["blocks"][0]["w"][..., 2:4], 0.0)  # group 1: width 2
    np.testing.assert_array_equal(zeroed_lora["blocks"][0]["w"]["b"][:, 2:4], 0.0)  # B follows
    np.testing.assert_array_equal(zeroed_lora["blocks"][1]["w"]["a"][2:4], 0.0)  # A follows input rows
    np.testing.assert_array_equal(np.asarray(zeroed["head"])[[0, 3, 7]], 0.0)
    assert params["blocks"][0]["w"].shape == (1, 1, 5, 6) and float(jnp.abs(params["head"][0]).sum()) > 0

    def loss(lo):
        p, l = apply_masks(params, masks, decl, lo)
        return jnp.sum(_toy_forward(p, x, l) ** 2)

    g = jax.grad(loss)(lora)
    np.testing.assert_array_equal(g["blocks"][0]["w"]["b"][:, 2:4], 0.0)
    with pytest.raises(ValueError, match=r"masks layer 1 'h': expected shape \(8,\), got \(3,\)"):
        apply_masks(params, {"layers": [masks["layers"][0], {"h": jnp.ones(3)}]}, decl, lora)
    with pytest.raises(ValueError, match="masks have 1 layers, the declaration 2"):
        apply_masks(params, {"layers": masks["layers"][:1]}, decl)
