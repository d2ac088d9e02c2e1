"""The Flax LLaMA: parity with PyTorch transformers, masks, LoRA, GQA, layouts, gradients."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import noisy_norms, randomize_b, tiny_config
from loraprune_jax.config import LoraConfig
from loraprune_jax.models.llama import forward, loss, token_nll
from loraprune_jax.models.llama_params import Llama, check_base, init_base, stack_layers, unstack_layers
from loraprune_jax.models.lora import init_lora
from loraprune_jax.models.llama_pruning import init_masks

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0)


def model(kind, tied=True, **kw):
    cfg = tiny_config(kind, tied, **kw)
    return cfg, noisy_norms(init_base(cfg, 0, std=0.2))


def test_matches_pytorch_transformers(kind, tokens, tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    from loraprune_jax.io.hf import save_hf_dir

    for tied in (True, False):
        cfg, base = model(kind, tied)
        out = tmp_path / f"{kind}-{tied}"
        save_hf_dir(out, cfg, base)
        ref = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            want = ref(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        got = np.asarray(forward(base, None, None, tokens, cfg))
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_stacked_scan_equals_layer_list(kind, tokens):
    cfg, base = model(kind)
    lora = randomize_b(init_lora(jax.random.PRNGKey(0), base, LORA))
    masks = init_masks(cfg)
    masks["layers"][1]["attn"] = masks["layers"][1]["attn"].at[0].set(0.0)
    ref = forward(base, lora, masks, tokens, cfg, LORA)
    got = forward(stack_layers(base), stack_layers(lora), stack_layers(masks), tokens, cfg, LORA)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    back = unstack_layers(stack_layers(base))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, base))


def test_all_ones_masks_equal_no_masks(kind, tokens):
    cfg, base = model(kind)
    ref = forward(base, None, None, tokens, cfg)
    got = forward(base, None, init_masks(cfg), tokens, cfg)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_zero_b_lora_equals_base(kind, tokens):
    cfg, base = model(kind)
    lora = init_lora(jax.random.PRNGKey(5), base, LORA)
    assert all(float(jnp.abs(p).max()) > 0 for p in jax.tree.leaves(lora)[0::2])  # A non-zero
    ref = forward(base, None, None, tokens, cfg)
    got = forward(base, lora, None, tokens, cfg, LORA)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def _remove_attention_unit(cfg, base, layer, unit):
    """Slice one attention unit's q/k/v columns and o rows out of ``base`` by hand."""
    hd = cfg.head_dim
    h, kv = cfg.heads(layer), cfg.kv_heads(layer)
    g = h // kv
    q_keep = np.array([c for c in range(h * hd) if c // (g * hd) != unit])
    kv_keep = np.array([c for c in range(kv * hd) if c // hd != unit])
    layers = [dict(l) for l in base["layers"]]
    l = layers[layer]
    l["q"], l["o"] = l["q"][:, q_keep], l["o"][q_keep, :]
    l["k"], l["v"] = l["k"][:, kv_keep], l["v"][:, kv_keep]
    heads = [cfg.heads(i) - (g if i == layer else 0) for i in range(cfg.num_layers)]
    kvs = [cfg.kv_heads(i) - (1 if i == layer else 0) for i in range(cfg.num_layers)]
    ffn = [cfg.ffn(i) for i in range(cfg.num_layers)]
    return cfg.with_widths(tuple(heads), tuple(kvs), tuple(ffn)), {**base, "layers": layers}


def test_masked_attention_unit_equals_removed_unit(kind, tokens):
    cfg, base = model(kind)
    masks = init_masks(cfg)
    masks["layers"][1]["attn"] = masks["layers"][1]["attn"].at[1].set(0.0)
    got = forward(base, None, masks, tokens, cfg)
    small_cfg, small = _remove_attention_unit(cfg, base, 1, 1)
    assert not small_cfg.is_uniform
    check_base(small, small_cfg)
    want = forward(small, None, None, tokens, small_cfg)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # and the mask really changes the output
    assert float(jnp.abs(got - forward(base, None, None, tokens, cfg)).max()) > 1e-3


def test_masked_mlp_channels_equal_removed_channels(kind, tokens):
    cfg, base = model(kind)
    drop = np.array([0, 7, 39])
    keep = np.setdiff1d(np.arange(cfg.intermediate_size), drop)
    masks = init_masks(cfg)
    masks["layers"][2]["mlp"] = masks["layers"][2]["mlp"].at[drop].set(0.0)
    layers = [dict(l) for l in base["layers"]]
    l = layers[2]
    l["gate"], l["up"], l["down"] = l["gate"][:, keep], l["up"][:, keep], l["down"][keep, :]
    ffn = tuple(cfg.ffn(i) - (3 if i == 2 else 0) for i in range(cfg.num_layers))
    small_cfg = cfg.with_widths((cfg.num_heads,) * 3, (cfg.num_kv_heads,) * 3, ffn)
    got = forward(base, None, masks, tokens, cfg)
    want = forward({**base, "layers": layers}, None, None, tokens, small_cfg)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_fully_pruned_layer_runs_and_equals_skip(tokens):
    cfg, base = model("gqa")
    masks = init_masks(cfg)
    masks["layers"][1] = {"attn": jnp.zeros(2), "mlp": jnp.zeros(40)}
    got = forward(base, None, masks, tokens, cfg)
    widths = dict(heads=(6, 0, 6), kv=(2, 0, 2), ffn=(40, 0, 40))
    small_cfg = cfg.with_widths(widths["heads"], widths["kv"], widths["ffn"])
    layers = [dict(l) for l in base["layers"]]
    for name in ("q", "k", "v", "gate", "up"):
        layers[1][name] = layers[1][name][:, :0]
    for name in ("o", "down"):
        layers[1][name] = layers[1][name][:0, :]
    want = forward({**base, "layers": layers}, None, None, tokens, small_cfg)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _naive_mha(x, wq, wk, wv, wo, n_heads, hd, theta):
    """Per-head loop reference for multi-head attention with rotate-half RoPE (numpy, f64)."""
    t = x.shape[0]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(z):
        z1, z2 = z[:, : hd // 2], z[:, hd // 2 :]
        return z * cos + np.concatenate([-z2, z1], -1) * sin

    outs = []
    for h in range(n_heads):
        sl = slice(h * hd, (h + 1) * hd)
        q, k, v = rope(x @ wq[:, sl]), rope(x @ wk[:, sl]), x @ wv[:, sl]
        s = q @ k.T / np.sqrt(hd) + np.triu(np.full((t, t), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        outs.append((p / p.sum(-1, keepdims=True)) @ v)
    return np.concatenate(outs, -1) @ wo


def test_gqa_with_as_many_kv_heads_equals_mha():
    from loraprune_jax.models.attention import apply_rope, causal_attention, rope_tables

    cfg = tiny_config("gqa", num_kv_heads=6)
    base = init_base(cfg, 1, std=0.2)
    layer = base["layers"][0]
    x = np.random.RandomState(1).randn(9, cfg.hidden_size)
    want = _naive_mha(x, *(np.asarray(layer[n], np.float64) for n in "qkvo"), 6, 8, cfg.rope_theta)
    xj = jnp.asarray(x, jnp.float32)[None]
    cos, sin = rope_tables(jnp.arange(9)[None], 8, cfg.rope_theta)
    q = apply_rope((xj @ layer["q"]).reshape(1, 9, 6, 8), cos, sin)
    k = apply_rope((xj @ layer["k"]).reshape(1, 9, 6, 8), cos, sin)
    v = (xj @ layer["v"]).reshape(1, 9, 6, 8)
    got = causal_attention(q, k, v) @ layer["o"]
    np.testing.assert_allclose(np.asarray(got[0]), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("t, max_blocks", [(64, 16), pytest.param(65, 16, marks=pytest.mark.slow),
                                           pytest.param(200, 16, marks=pytest.mark.slow),
                                           pytest.param(200, 3, marks=pytest.mark.slow)])
def test_blocked_causal_attention_equals_one_score_matrix(t, max_blocks, monkeypatch):
    """Query blocks (64 rows, or t / max_blocks when longer) give the values and gradients of
    the one T x T softmax: one block, a one-row last block, several, and longer blocks."""
    from loraprune_jax.models import attention
    from loraprune_jax.models.attention import causal_attention

    monkeypatch.setattr(attention, "MAX_QUERY_BLOCKS", max_blocks)
    rs = np.random.RandomState(t)
    q, k, v = (jnp.asarray(rs.randn(2, t, h, 8), jnp.float32) for h in (6, 2, 2))

    def reference(q, k, v):  # GQA as repeated KV heads, one masked score matrix
        kr, vr = jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2)
        scores = jnp.einsum("bthd,bshd->bhts", q, kr) / np.sqrt(8.0)
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
        out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), vr)
        return out.reshape(2, t, 48)

    np.testing.assert_allclose(causal_attention(q, k, v), reference(q, k, v), atol=2e-6, rtol=2e-6)
    got = jax.grad(lambda *a: jnp.sum(causal_attention(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: jnp.sum(reference(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


def test_gqa_equals_mha_with_repeated_kv_heads(tokens):
    cfg, base = model("gqa")
    g = cfg.num_heads // cfg.num_kv_heads
    hd = cfg.head_dim
    layers = []
    for l in base["layers"]:
        l = dict(l)
        for n in ("k", "v"):
            w = l[n].reshape(cfg.hidden_size, cfg.num_kv_heads, 1, hd)
            l[n] = jnp.broadcast_to(w, (cfg.hidden_size, cfg.num_kv_heads, g, hd)).reshape(
                cfg.hidden_size, -1
            )
        layers.append(l)
    mha_cfg = dataclasses.replace(cfg, num_kv_heads=cfg.num_heads)
    got = forward({**base, "layers": layers}, None, None, tokens, mha_cfg)
    want = forward(base, None, None, tokens, cfg)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_gradients_flow_to_lora_only(kind, tokens):
    cfg, base = model(kind)
    lora = randomize_b(init_lora(jax.random.PRNGKey(0), base, LORA))
    masks = init_masks(cfg)
    masks["layers"][0]["attn"] = masks["layers"][0]["attn"].at[0].set(0.0)
    batch = {"tokens": tokens}
    grads = jax.jit(jax.grad(loss, argnums=1), static_argnums=(4, 5))(
        base, lora, masks, batch, cfg, LORA
    )
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    for path, g in jax.tree.flatten_with_path(grads)[0]:
        assert float(jnp.abs(g).max()) > 0, path
    # a masked attention unit gets no gradient through its q/k/v output columns
    hd, g = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    np.testing.assert_array_equal(np.asarray(grads["layers"][0]["q"]["b"][:, : g * hd]), 0.0)
    np.testing.assert_array_equal(np.asarray(grads["layers"][0]["v"]["b"][:, :hd]), 0.0)


@pytest.mark.slow
def test_remat_gives_same_loss_and_grads(tokens):
    cfg, base = model("gqa")
    lora = randomize_b(init_lora(jax.random.PRNGKey(0), base, LORA))
    batch = {"tokens": tokens}
    f = lambda lo, remat: loss(stack_layers(base), lo, None, batch, cfg, LORA, remat=remat)
    v1, g1 = jax.value_and_grad(f)(stack_layers(lora), False)
    v2, g2 = jax.value_and_grad(f)(stack_layers(lora), True)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g1, g2)


def _dot_operand_shapes(jaxpr):
    """All (lhs, rhs) operand shapes of dot_general ops, recursing into sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(tuple(v.aval.shape) for v in eqn.invars))
        for param in eqn.params.values():
            subs = param if isinstance(param, (list, tuple)) else [param]
            for sub in subs:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    found.extend(_dot_operand_shapes(getattr(inner, "jaxpr", inner)))
    return found


def test_forward_never_forms_merged_weight(tokens):
    from loraprune_jax.models.lora import merge_lora

    cfg, base = model("gqa")
    lora = randomize_b(init_lora(jax.random.PRNGKey(0), base, LORA))
    pair_shapes = {
        (tuple(p["a"].shape), tuple(p["b"].shape)) for l in lora["layers"] for p in l.values()
    }

    def forms_merge(fn, *args):
        dots = _dot_operand_shapes(jax.make_jaxpr(fn)(*args).jaxpr)
        return any(d in pair_shapes for d in dots)

    for layers_fn in (lambda t: t, stack_layers):
        b, lo = layers_fn(base), layers_fn(lora)
        fwd = lambda lo: forward(b, lo, None, tokens, cfg, LORA)
        assert not forms_merge(fwd, lo)
        grad = jax.grad(lambda lo: loss(b, lo, None, {"tokens": tokens}, cfg, LORA))
        assert not forms_merge(grad, lo)
    # the detector does see a merge when there is one
    assert forms_merge(lambda lo: merge_lora(base, lo, LORA), lora)


def test_lora_dropout_needs_rng_and_is_deterministic(tokens):
    cfg, base = model("gqa")
    lc = LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    lora = randomize_b(init_lora(jax.random.PRNGKey(0), base, lc))
    plain = forward(base, lora, None, tokens, cfg, lc)
    k = jax.random.PRNGKey(7)
    d1 = forward(base, lora, None, tokens, cfg, lc, rng=k)
    d2 = forward(base, lora, None, tokens, cfg, lc, rng=k)
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))
    assert float(jnp.abs(d1 - plain).max()) > 1e-3


def test_bfloat16_parameters_close_to_float32(tokens):
    cfg, base = model("gqa")
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
    base16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    got = forward(base16, None, None, tokens, cfg16)
    want = forward(base, None, None, tokens, cfg)
    assert got.dtype == jnp.float32
    assert float(jnp.abs(got - want).max()) < 0.1 * float(jnp.abs(want).max())


def test_token_nll_matches_log_softmax(tokens):
    cfg, base = model("mha", tied=False)
    logits = np.asarray(forward(base, None, None, tokens, cfg), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    got = token_nll(base, None, None, tokens, cfg)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    mask = np.ones_like(tokens)
    mask[0, 5:] = 0
    weighted = loss(base, None, None, {"tokens": tokens, "loss_mask": mask}, cfg)
    np.testing.assert_allclose(weighted, want[mask[:, 1:] > 0].mean(), rtol=1e-5)


def test_nnx_module_round_trip(tokens):
    cfg, base = model("gqa", tied=False)
    m = Llama.from_params(cfg, base)
    np.testing.assert_array_equal(np.asarray(m(tokens)), np.asarray(forward(base, None, None, tokens, cfg)))
    back = m.params()
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, base))
    fresh = Llama(cfg, rngs=__import__("flax").nnx.Rngs(0))
    check_base(fresh.params(), cfg)


def test_bad_inputs_raise_clearly(tokens):
    cfg, base = model("gqa")
    lora = init_lora(jax.random.PRNGKey(0), base, LORA)
    with pytest.raises(ValueError, match="lora_cfg"):
        forward(base, lora, None, tokens, cfg)
    with pytest.raises(ValueError, match="batch, seq"):
        forward(base, None, None, tokens[0], cfg)
    with pytest.raises(ValueError, match="layer 0 q"):
        bad = {**base, "layers": [dict(base["layers"][0], q=base["layers"][0]["k"])] + base["layers"][1:]}
        check_base(bad, cfg)


def test_input_stats_are_sums_of_squares(tokens):
    cfg, base = model("gqa")
    lora = randomize_b(init_lora(jax.random.PRNGKey(0), base, LORA))
    logits, stats = forward(base, lora, None, tokens, cfg, LORA, return_stats=True)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(forward(base, lora, None, tokens, cfg, LORA)))
    # layer 0: recompute the inputs of q (normed embeddings) by hand
    from loraprune_jax.models.attention import rms_norm

    x = base["embed"][tokens]
    h = rms_norm(x, base["layers"][0]["attn_norm"], cfg.rms_norm_eps)
    np.testing.assert_allclose(stats["layers"][0]["attn_in"], (h * h).sum((0, 1)), rtol=1e-5)
    shapes = {k: v.shape for k, v in stats["layers"][1].items()}
    assert shapes == {"attn_in": (48,), "o_in": (48,), "mlp_in": (48,), "down_in": (40,)}
    _, stacked = forward(stack_layers(base), stack_layers(lora), None, tokens, cfg, LORA, return_stats=True)
    for i in range(cfg.num_layers):
        for k in shapes:
            np.testing.assert_allclose(stacked["layers"][k][i], stats["layers"][i][k], rtol=1e-4)
    value, aux = loss(base, lora, None, {"tokens": tokens}, cfg, LORA, return_stats=True)
    assert float(value) == pytest.approx(float(loss(base, lora, None, {"tokens": tokens}, cfg, LORA)))
    assert len(aux["layers"]) == cfg.num_layers


# ----------------------------------------------------------------------------- weight masks
def _element_setup(kind, seed=0):
    from loraprune_jax.core.elements import update_element_masks
    from loraprune_jax.models.llama_pruning import init_element_masks

    cfg, base = model(kind)
    lora = randomize_b(init_lora(jax.random.PRNGKey(seed), base, LORA))
    masks = init_element_masks(cfg)
    rng = np.random.RandomState(seed)
    scores = jax.tree.map(lambda m: rng.rand(*m.shape).astype(np.float32), masks)
    return cfg, base, lora, update_element_masks(masks, scores, 0.5, excluded=(2,))


@pytest.mark.parametrize("stacked", [False, True])
def test_element_masked_forward_equals_merged_and_zeroed_weights(kind, tokens, stacked):
    from loraprune_jax.models.lora import merge_lora
    from loraprune_jax.core.elements import apply_element_masks

    cfg, base, lora, masks = _element_setup(kind)
    lay = stack_layers if stacked else (lambda t: t)
    got = forward(lay(base), lay(lora), lay(masks), tokens, cfg, LORA)
    host = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731 - the export merges on the host
    exported = apply_element_masks(merge_lora(host(base), host(lora), LORA), host(masks))
    assert np.all(exported["layers"][0]["q"][np.asarray(masks["layers"][0]["q"]) == 0] == 0)
    want = forward(exported, None, None, tokens, cfg)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    # the masks do matter: unmasked LoRA gives something else
    assert float(jnp.abs(forward(base, lora, None, tokens, cfg, LORA) - want).max()) > 1e-2


def test_all_ones_element_masks_equal_no_masks_with_dropout(tokens):
    from loraprune_jax.models.llama_pruning import init_element_masks

    cfg, base = model("gqa")
    lc = LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    lora = randomize_b(init_lora(jax.random.PRNGKey(0), base, lc))
    ones = init_element_masks(cfg, ("q", "o", "down"))  # the others keep the plain LoRA path
    for rng in (None, jax.random.PRNGKey(3)):
        want = forward(base, lora, None, tokens, cfg, lc, rng=rng)
        got = forward(base, lora, ones, tokens, cfg, lc, rng=rng)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_element_masks_zero_the_lora_gradient_of_pruned_weights(tokens):
    """Through ``(W + s A @ B) * M`` the gradient of ``A @ B`` vanishes where ``M`` is 0."""
    cfg, base, lora, masks = _element_setup("gqa")
    grads = jax.grad(loss, argnums=1)(base, lora, masks, {"tokens": tokens}, cfg, LORA)
    # the gradient through the masked merge is right: one entry of B against a finite difference
    eps = 1e-2
    e = jnp.zeros_like(lora["layers"][0]["q"]["b"]).at[1, 3].set(1.0)
    bumped = jax.tree.map(lambda x: x, lora)
    bumped["layers"][0]["q"] = {**lora["layers"][0]["q"], "b": lora["layers"][0]["q"]["b"] + eps * e}
    fd = (loss(base, bumped, masks, {"tokens": tokens}, cfg, LORA)
          - loss(base, lora, masks, {"tokens": tokens}, cfg, LORA)) / eps
    np.testing.assert_allclose(grads["layers"][0]["q"]["b"][1, 3], fd, rtol=5e-2, atol=1e-5)
    # a fully masked projection gets no LoRA gradient at all
    zero = jax.tree.map(lambda x: x, masks)
    zero["layers"][1]["up"] = jnp.zeros_like(masks["layers"][1]["up"])
    g = jax.grad(loss, argnums=1)(base, lora, zero, {"tokens": tokens}, cfg, LORA)
    assert float(jnp.abs(g["layers"][1]["up"]["a"]).max()) == 0.0
    assert float(jnp.abs(g["layers"][1]["up"]["b"]).max()) == 0.0


def test_structured_and_weight_masks_cannot_mix(tokens):
    cfg, base = model("gqa")
    masks = init_masks(cfg)
    masks["layers"][0] = {**masks["layers"][0], "q": jnp.ones((48, 48))}
    with pytest.raises(ValueError, match="not both"):
        forward(base, None, masks, tokens, cfg)
