"""The compiled train step: gradients, accumulation, clipping, importance inside, no recompiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import count_compiles, tiny_config
from loraprune_jax.config import LoraConfig, PruneConfig, TrainConfig
from loraprune_jax.models.llama import loss
from loraprune_jax.models.llama_params import init_base, stack_layers
from loraprune_jax.models.lora import init_lora
from loraprune_jax.models.llama_pruning import layer_scores
from loraprune_jax.models.llama_pruning import init_masks
from loraprune_jax.train.step import init_state, make_train_step

LC = LoraConfig(rank=4, alpha=8.0, dropout=0.0)


def setup(kind="gqa", stacked=False, accum=2, micro=2, clip=1.0, seq=16, seed=0):
    cfg = tiny_config(kind)
    base = init_base(cfg, 0, std=0.2)
    lora = init_lora(jax.random.PRNGKey(seed), base, LC)
    lora = jax.tree.map(lambda x: x + 0.05, lora)  # non-zero B: all gradients non-trivial
    if stacked:
        base, lora = stack_layers(base), stack_layers(lora)
    masks = init_masks(cfg, stacked=stacked)
    tc = TrainConfig(steps=10, micro_batch_size=micro, grad_accum=accum, seq_len=seq, clip_norm=clip)
    tokens = np.random.RandomState(seed).randint(0, cfg.vocab_size, (accum, micro, seq)).astype(np.int32)
    return cfg, base, lora, masks, tc, {"tokens": tokens}


def mean_grads(base, lora, masks, batch, cfg):
    gs = [jax.grad(loss, argnums=1)(base, lora, masks, {"tokens": t}, cfg, LC) for t in batch["tokens"]]
    return jax.tree.map(lambda *g: sum(g) / len(g), *gs)


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True])
def test_lora_scores_match_direct_computation(stacked):
    cfg, base, lora, masks, tc, batch = setup(stacked=stacked, clip=0.01)
    step = make_train_step(cfg, LC, tc, PruneConfig(criterion="lora"), donate=False)
    state, metrics = step(init_state(lora, masks, tc), base, masks, batch, jax.random.PRNGKey(0))
    grads = mean_grads(base, lora, masks, batch, cfg)
    norm = optax.tree.norm(grads)
    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-4)
    assert float(norm) > 0.01  # clipping is active
    grads = jax.tree.map(lambda g: g * (0.01 / (norm + 1e-6)), grads)
    for i in range(cfg.num_layers):
        pick = (lambda t: jax.tree.map(lambda x: x[i], t)) if stacked else (lambda t: t[i])
        layer, adapters, g = pick(base["layers"]), pick(lora["layers"]), pick(grads["layers"])
        want = layer_scores("lora", layer, adapters, cfg.head_dim, scale=LC.scale, lora_grads=g)
        got = pick(state["scores"]["layers"])
        np.testing.assert_allclose(got["attn"], 0.1 * want["attn"], rtol=2e-4)
        np.testing.assert_allclose(got["mlp"], 0.1 * want["mlp"], rtol=2e-4)
    want_loss = np.mean([loss(base, lora, masks, {"tokens": t}, cfg, LC) for t in batch["tokens"]])
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)


@pytest.mark.slow
def test_vanilla_uses_true_weight_gradients():
    cfg, base, lora, masks, tc, batch = setup(kind="mha")
    step = make_train_step(cfg, LC, tc, PruneConfig(criterion="vanilla"), donate=False)
    state, _ = step(init_state(lora, masks, tc), base, masks, batch, jax.random.PRNGKey(0))
    gs = [jax.grad(loss)(base, lora, masks, {"tokens": t}, cfg, LC) for t in batch["tokens"]]
    wgrads = jax.tree.map(lambda *g: sum(g) / len(g), *gs)
    lgrads = mean_grads(base, lora, masks, batch, cfg)
    clip = min(1.0, 1.0 / (float(optax.tree.norm(lgrads)) + 1e-6))
    for i in (0, 2):
        want = layer_scores("vanilla", base["layers"][i], lora["layers"][i], cfg.head_dim,
                            scale=LC.scale, weight_grads=jax.tree.map(lambda g: g * clip, wgrads["layers"][i]))
        np.testing.assert_allclose(state["scores"]["layers"][i]["attn"], 0.1 * want["attn"], rtol=2e-4)
        np.testing.assert_allclose(state["scores"]["layers"][i]["mlp"], 0.1 * want["mlp"], rtol=2e-4)


@pytest.mark.slow
def test_accumulation_equals_one_big_batch():
    cfg, base, lora, masks, tc2, batch = setup(accum=2, micro=1)
    tc1 = TrainConfig(steps=10, micro_batch_size=2, grad_accum=1, seq_len=16)
    big = {"tokens": batch["tokens"].reshape(1, 2, 16)}
    s2, m2 = make_train_step(cfg, LC, tc2, PruneConfig(), donate=False)(
        init_state(lora, masks, tc2), base, masks, batch, jax.random.PRNGKey(0))
    s1, m1 = make_train_step(cfg, LC, tc1, PruneConfig(), donate=False)(
        init_state(lora, masks, tc1), base, masks, big, jax.random.PRNGKey(0))
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1["lora"], s2["lora"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), s1["scores"], s2["scores"])


@pytest.mark.slow
def test_mask_rewrites_never_recompile():
    cfg, base, lora, masks, tc, batch = setup(stacked=True)
    step = make_train_step(cfg, LC, tc, PruneConfig(), donate=True)
    state = init_state(lora, masks, tc)
    rng = np.random.RandomState(0)
    losses = []
    with count_compiles() as compiles:
        for i in range(6):
            masks = jax.tree.map(lambda m: jnp.asarray((rng.rand(*m.shape) > 0.3).astype(np.float32)), masks)
            state, metrics = step(state, base, masks, batch, jax.random.PRNGKey(i))
            losses.append(float(metrics["loss"]))
    assert compiles["step"] == 1  # the train step (make_train_step's jitted ``step``)
    assert len(set(losses)) == 6  # the masks did change the computation
    assert int(state["step"]) == 6


@pytest.mark.slow
def test_training_lowers_the_loss_and_scores_accumulate():
    cfg, base, lora, masks, _, batch = setup(stacked=True)
    tc = TrainConfig(steps=30, micro_batch_size=2, grad_accum=2, seq_len=16, lr=1e-2)
    step = make_train_step(cfg, LC, tc, PruneConfig(), donate=True)
    state = init_state(lora, masks, tc)
    first = None
    for i in range(15):
        state, m = step(state, base, masks, batch, jax.random.PRNGKey(0))
        first = first if first is not None else float(m["loss"])
    assert float(m["loss"]) < 0.7 * first
    assert float(jnp.min(state["scores"]["layers"]["attn"])) > 0


def test_non_finite_scores_are_skipped():
    cfg, base, lora, masks, tc, batch = setup()
    base = {**base, "final_norm": base["final_norm"] * jnp.nan}
    step = make_train_step(cfg, LC, tc, PruneConfig(), donate=False)
    state = init_state(lora, masks, tc)
    state = {**state, "scores": jax.tree.map(lambda s: s + 1.0, state["scores"])}
    new, metrics = step(state, base, masks, batch, jax.random.PRNGKey(0))
    assert bool(metrics["score_skipped"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new["scores"], state["scores"])
    # a NaN loss: the adapters and the optimizer state stay as they were, the step counts
    assert not np.isfinite(float(metrics["loss"]))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new["lora"], state["lora"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new["opt_state"],
                 state["opt_state"])
    assert int(new["step"]) == int(state["step"]) + 1
    # and a finite step after it trains as if the bad one had not happened
    good = {**base, "final_norm": base["final_norm"] * 0 + 1}
    after, _ = step(new, good, masks, batch, jax.random.PRNGKey(0))
    fresh, _ = step(state, good, masks, batch, jax.random.PRNGKey(0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), after["lora"], fresh["lora"])


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["magnitude", "random", "wanda"])
def test_other_criteria_give_group_scores(criterion):
    cfg, base, lora, masks, tc, batch = setup(stacked=True)
    step = make_train_step(cfg, LC, tc, PruneConfig(criterion=criterion), donate=False)
    state, _ = step(init_state(lora, masks, tc), base, masks, batch, jax.random.PRNGKey(0))
    s = state["scores"]["layers"]
    assert s["attn"].shape == (3, 2) and s["mlp"].shape == (3, 40)
    assert bool(jnp.all(s["attn"] > 0)) and bool(jnp.all(jnp.isfinite(s["mlp"])))
    if criterion == "magnitude":  # independent of the batch
        other = {"tokens": batch["tokens"][:, :, ::-1].copy()}
        s2, _ = step(init_state(lora, masks, tc), base, masks, other, jax.random.PRNGKey(0))
        np.testing.assert_allclose(s2["scores"]["layers"]["mlp"], s["mlp"], rtol=1e-6)


def test_vanilla_keeps_bf16_weight_gradients_in_bf16():
    """The full-size weight gradients of ``vanilla`` stay in the weights' dtype: clipping them
    must not promote a bf16 model's gradients to a float32 copy (twice the memory)."""
    cfg, base, lora, masks, tc, batch = setup(stacked=True)
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    step = make_train_step(cfg, LC, tc, PruneConfig(criterion="vanilla"), jit=False)
    jaxpr = jax.make_jaxpr(step)(init_state(lora, masks, tc), base, masks, batch,
                                 jax.random.PRNGKey(0))
    stacked = {tuple(x.shape) for x in jax.tree.leaves(base["layers"]) if x.ndim == 3}

    # The step's top level is where the clipped gradients of the whole stack live.
    f32_stacked = [(eqn.primitive.name, v.aval.shape) for eqn in jaxpr.jaxpr.eqns
                   for v in eqn.outvars
                   if v.aval.dtype == jnp.float32 and tuple(v.aval.shape) in stacked]
    assert not f32_stacked


# ----------------------------------------------------------------------------- weight masks
def element_setup(stacked, **kw):
    from loraprune_jax.models.llama_pruning import init_element_masks

    cfg, base, lora, _, tc, batch = setup(stacked=stacked, **kw)
    return cfg, base, lora, init_element_masks(cfg, LC.targets, stacked=stacked), tc, batch


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True])
def test_element_scores_ema_inside_the_step(stacked):
    from loraprune_jax.core.criteria import element_scores

    cfg, base, lora, masks, tc, batch = element_setup(stacked, clip=0.01)
    masks = jax.tree.map(lambda m: jnp.asarray(np.random.RandomState(0).rand(*m.shape) > 0.3,
                                               jnp.float32), masks)
    pc = PruneConfig(criterion="lora", granularity="unstructured")
    step = make_train_step(cfg, LC, tc, pc, donate=False)
    state, metrics = step(init_state(lora, masks, tc), base, masks, batch, jax.random.PRNGKey(0))
    grads = mean_grads(base, lora, masks, batch, cfg)  # through the masked merged weights
    norm = optax.tree.norm(grads)
    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-4)
    grads = jax.tree.map(lambda g: g * (0.01 / (norm + 1e-6)), grads)
    for i in range(cfg.num_layers):
        pick = (lambda t: jax.tree.map(lambda x: x[i], t)) if stacked else (lambda t: t[i])
        want = element_scores("lora", pick(base["layers"]), pick(lora["layers"]),
                              [(n,) for n in LC.targets], scale=LC.scale,
                              lora_grads=pick(grads["layers"]))
        want = {path[0]: s for path, s in want.items()}
        got = pick(state["scores"]["layers"])
        assert set(got) == set(LC.targets)
        for name in got:
            assert got[name].shape == pick(base["layers"])[name].shape
            np.testing.assert_allclose(got[name], 0.1 * want[name], rtol=2e-4,
                                       atol=1e-6 * float(jnp.abs(want[name]).max()))
    want_loss = np.mean([loss(base, lora, masks, {"tokens": t}, cfg, LC) for t in batch["tokens"]])
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["magnitude", "random", "wanda", "vanilla"])
def test_other_criteria_give_element_scores(criterion):
    cfg, base, lora, masks, tc, batch = element_setup(True)
    step = make_train_step(cfg, LC, tc, PruneConfig(criterion=criterion, granularity="nm"),
                           donate=False)
    state, _ = step(init_state(lora, masks, tc), base, masks, batch, jax.random.PRNGKey(0))
    s = state["scores"]["layers"]
    assert {k: v.shape for k, v in s.items()} == {k: v.shape for k, v in masks["layers"].items()}
    assert bool(jnp.all(s["down"] >= 0)) and float(jnp.max(s["down"])) > 0


@pytest.mark.slow
def test_element_mask_rewrites_never_recompile():
    from loraprune_jax.core.elements import update_element_masks, update_nm_masks

    cfg, base, lora, masks, tc, batch = element_setup(True)
    dev = jax.devices()[0]  # committed arrays, as the loop's are
    masks = jax.device_put(masks, dev)
    step = make_train_step(cfg, LC, tc, PruneConfig(granularity="unstructured"), donate=True)
    state = jax.device_put(init_state(lora, masks, tc), dev)
    losses = []
    with count_compiles() as compiles:
        for i in range(5):
            state, metrics = step(state, base, masks, batch, jax.random.PRNGKey(i))
            losses.append(float(metrics["loss"]))
            masks = (update_nm_masks(masks, state["scores"], 0.5) if i == 0
                     else update_element_masks(masks, state["scores"], 0.1 * (i + 5)))
    assert compiles["step"] == 1
    assert len(set(losses)) == 5
