"""Meshes, rules and the sharded train step on 8 simulated CPU devices (see conftest.py).

The sharded runs must equal the single-device run: the same loss, LoRA gradients and group
scores (float tolerance) and identical masks after a few prune steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import count_compiles, randomize_b, tiny_config
from loraprune_jax.config import LoraConfig, PruneConfig, TrainConfig
from loraprune_jax.eval.perplexity import perplexity
from loraprune_jax.models.llama import loss
from loraprune_jax.models import llama_params as lp
from loraprune_jax.models.llama_params import init_base, stack_layers
from loraprune_jax.models.lora import init_lora
from loraprune_jax.parallel import mesh as pm
from loraprune_jax.core.criteria import ranking_scores
from loraprune_jax.models.llama_pruning import init_masks
from loraprune_jax.core.masks import update_masks
from loraprune_jax.train.step import init_state, make_train_step

MESHES = ["data:8", "fsdp:8", "data:2,fsdp:2,tensor:2", "tensor:8"]
CONFIG = tiny_config("gqa", num_heads=16, num_kv_heads=8, head_dim=4, hidden_size=64,
                     intermediate_size=48, vocab_size=128)
LORA = LoraConfig(dropout=0.0)
TRAIN = TrainConfig(steps=6, micro_batch_size=8, grad_accum=2, seq_len=16)
STEPS = 6


def test_eight_devices_are_simulated():
    assert jax.device_count() == 8


# Mesh strings --------------------------------------------------------------------------------
def test_parse_mesh_fills_the_rest():
    assert pm.parse_mesh("data:2,fsdp:-1,tensor:1", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert pm.parse_mesh("tensor:2", 2) == {"data": 1, "fsdp": 1, "tensor": 2}
    assert pm.parse_mesh(" fsdp:-1 ", 1) == {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("spec, n, words", [
    ("data:2,fsdp:-1,tensor:-1", 8, "only one mesh axis may be -1"),
    ("model:2", 2, "AXIS one of data, fsdp, tensor"),
    ("data:3", 8, "has 3 devices but there are 8"),
    ("data:3,fsdp:-1", 8, "does not divide the 8 devices"),
    ("data:two", 2, "not an integer"),
    ("data:0", 2, "positive size or -1"),
    ("data:2,data:4", 8, "given twice"),
    ("", 8, "empty mesh spec"),
])
def test_parse_mesh_errors(spec, n, words):
    with pytest.raises(pm.ShardingError, match=words):
        pm.parse_mesh(spec, n)


def test_make_mesh_axes_and_sizes():
    mesh = pm.make_mesh("data:2,fsdp:-1,tensor:2")
    assert mesh.axis_names == pm.AXES
    assert pm.mesh_sizes(mesh) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert pm.describe(mesh) == "data:2,fsdp:2,tensor:2"
    assert pm.mesh_sizes(pm.make_mesh("fsdp:-1", jax.devices()[:1])) == {"data": 1, "fsdp": 1, "tensor": 1}


# Rules ---------------------------------------------------------------------------------------
def test_rules_map_logical_axes():
    assert pm.spec_for(("layers", "embed", "q_heads")) == P(None, "fsdp", "tensor")
    assert pm.spec_for(("mlp", "embed")) == P("tensor", "fsdp")
    assert pm.spec_for(("batch", "seq", "embed")) == P(("data", "fsdp"), None, None)  # fsdp used once
    with pytest.raises(pm.ShardingError, match="no sharding rule"):
        pm.spec_for(("heads",))


def test_every_parameter_has_logical_axes():
    base = stack_layers(init_base(CONFIG, 0))
    axes = lp.logical_axes(base)
    for (path, leaf), names in zip(jax.tree.leaves_with_path(base), jax.tree.leaves(
            axes, is_leaf=lambda x: isinstance(x, tuple))):
        assert len(names) == leaf.ndim, (path, names)


def test_width_errors_say_what_to_change():
    smol_like = tiny_config("gqa", num_heads=9, num_kv_heads=3, head_dim=8, hidden_size=72,
                            intermediate_size=48, vocab_size=128)
    with pytest.raises(pm.ShardingError, match=r"layer 0 has 9 query heads, not a multiple of the "
                       r"tensor axis \(2\).*mesh=fsdp:-1"):
        lp.check_widths(smol_like, pm.make_mesh("fsdp:4,tensor:2"))
    narrow = tiny_config("gqa", num_heads=9, num_kv_heads=3, head_dim=4, hidden_size=36)
    with pytest.raises(pm.ShardingError, match=r"hidden size 36 is not a multiple of the fsdp axis \(8\)"):
        lp.check_widths(narrow, pm.make_mesh("fsdp:8"))
    pruned = CONFIG.with_widths(heads=[16, 14, 16], kv_heads=[8, 7, 8], ffn=[48, 40, 48])
    lp.check_widths(pruned, pm.make_mesh("fsdp:8"))  # no tensor axis: any widths
    with pytest.raises(pm.ShardingError, match=r"layer 1 has 14 query heads.*\(and 1 more\).*pruned"):
        lp.check_widths(pruned, pm.make_mesh("fsdp:2,tensor:4"))


def test_batch_must_split_over_batch_axes():
    pm.check_batch(8, pm.make_mesh("data:2,fsdp:4"))
    pm.check_batch(1, pm.make_mesh("tensor:8"))
    with pytest.raises(pm.ShardingError, match="micro_batch_size=2 is not a multiple of the 4"):
        pm.check_batch(2, pm.make_mesh("data:2,fsdp:2,tensor:2"))


def test_shard_base_places_and_stacks_lazily():
    host = jax.tree.map(np.asarray, init_base(CONFIG, 0))
    mesh = pm.make_mesh("data:2,fsdp:2,tensor:2")
    placed = lp.shard_base(host, CONFIG, mesh)
    ref = stack_layers(init_base(CONFIG, 0))
    for (path, got), want in zip(jax.tree.leaves_with_path(placed), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))
    q = placed["layers"]["q"]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (3, 32, 32)  # (L, 64 / fsdp 2, 64 / tensor 2)
    assert placed["layers"]["attn_norm"].sharding.spec == P(None, None)


# The sharded step equals the single-device step ----------------------------------------------
def _run(mesh, criterion: str, steps: int = STEPS):
    host = jax.tree.map(np.asarray, init_base(CONFIG, 0))
    base = stack_layers(jax.tree.map(jnp.asarray, host)) if mesh is None else lp.shard_base(host, CONFIG, mesh)
    lora = randomize_b(init_lora(jax.random.PRNGKey(1), stack_layers(init_base(CONFIG, 0)), LORA))
    masks = init_masks(CONFIG, stacked=True)
    state = init_state(lora, masks, TRAIN)
    if mesh is not None:
        state = jax.device_put(state, pm.replicated(mesh))
        masks = jax.device_put(masks, pm.replicated(mesh))
    step = make_train_step(CONFIG, LORA, TRAIN, PruneConfig(criterion=criterion), mesh=mesh)
    tokens = np.random.RandomState(0).randint(0, 128, size=(steps, 2, 8, 16)).astype(np.int32)
    key = jax.random.PRNGKey(5)
    losses = []
    for s in range(steps):
        batch = tokens[s] if mesh is None else pm.global_array(tokens[s], pm.batch_sharding(mesh))
        state, metrics = step(state, base, masks, {"tokens": batch}, key)
        if s % 2 == 1:  # three prune steps: 12.5%, 25%, 37.5% of every layer but the first
            masks = update_masks(masks, ranking_scores(criterion, state["scores"]),
                                 0.125 * (s + 1) / 2, excluded=(0,))
        losses.append(float(metrics["loss"]))
    return losses, state, masks, step


@pytest.fixture(scope="module")
def reference():
    return {c: _run(None, c) for c in ("lora", "vanilla", "wanda", "fisher", "taylor")}


def _assert_same_run(got, ref):
    losses, state, masks, _ = got
    np.testing.assert_allclose(losses, ref[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(state["scores"]), jax.tree.leaves(ref[1]["scores"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * np.abs(b).max())
    for a, b in zip(jax.tree.leaves(state["lora"]), jax.tree.leaves(ref[1]["lora"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(ref[2])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the masks really pruned something, so equality is not trivial
    assert float(np.asarray(masks["layers"]["mlp"]).mean()) < 0.9


@pytest.mark.slow
@pytest.mark.parametrize("spec", MESHES)
def test_sharded_step_equals_single_device(spec, reference):
    mesh = pm.make_mesh(spec)
    with count_compiles() as compiles:
        got = _run(mesh, "lora")
    _assert_same_run(got, reference["lora"])
    state = got[1]
    assert compiles["step"] == 1  # three mask rewrites, one compilation of the train step
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.is_fully_replicated  # LoRA, optimizer state, scores


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["vanilla", "wanda", "fisher", "taylor"])
def test_sharded_criteria_equal_single_device(criterion, reference):
    _assert_same_run(_run(pm.make_mesh("data:2,fsdp:2,tensor:2"), criterion), reference[criterion])


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["fsdp:8", "data:2,fsdp:2,tensor:2"])
def test_sharded_lora_gradients_equal(spec):
    mesh = pm.make_mesh(spec)
    host = jax.tree.map(np.asarray, init_base(CONFIG, 0))
    lora = randomize_b(init_lora(jax.random.PRNGKey(1), stack_layers(init_base(CONFIG, 0)), LORA))
    masks = init_masks(CONFIG, stacked=True)
    tokens = np.random.RandomState(1).randint(0, 128, size=(8, 16)).astype(np.int32)

    def grads(base, lora, masks, tokens):
        return jax.value_and_grad(loss, argnums=1)(base, lora, masks, {"tokens": tokens}, CONFIG, LORA)

    want_loss, want = jax.jit(grads)(stack_layers(jax.tree.map(jnp.asarray, host)), lora, masks, tokens)
    rep = pm.replicated(mesh)

    def sharded(*args):
        with pm.activation_sharding(mesh):
            return grads(*args)

    got_loss, got = jax.jit(sharded, out_shardings=rep)(
        lp.shard_base(host, CONFIG, mesh), jax.device_put(lora, rep), jax.device_put(masks, rep),
        pm.global_array(tokens, pm.batch_sharding(mesh, 2, 0)),
    )
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
    for (path, a), b in zip(jax.tree.leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7, err_msg=str(path))
        assert np.abs(np.asarray(b)).max() > 0


def test_step_checks_widths_against_the_mesh():
    smol_like = tiny_config("gqa", num_heads=9, num_kv_heads=3, head_dim=8, hidden_size=72)
    with pytest.raises(pm.ShardingError, match="query heads"):
        make_train_step(smol_like, LORA, TRAIN, PruneConfig(), mesh=pm.make_mesh("tensor:8"))


def test_sharded_perplexity_equals_unsharded():
    host = jax.tree.map(np.asarray, init_base(CONFIG, 2))
    ids = np.random.RandomState(3).randint(0, 128, size=16 * 11).astype(np.int32)
    want = perplexity(stack_layers(jax.tree.map(jnp.asarray, host)), CONFIG, ids, 16, progress=False,
                      batch_size=4)
    mesh = pm.make_mesh("data:2,fsdp:2,tensor:2")
    got = perplexity(lp.shard_base(host, CONFIG, mesh), CONFIG, ids, 16, progress=False,
                     batch_size=3, mesh=mesh)  # rounded up to 4; 11 windows, the last batch padded
    assert got.windows == want.windows == 11
    np.testing.assert_allclose(got.nll, want.nll, rtol=1e-6)
