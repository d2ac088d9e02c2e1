"""The criteria registry and the one scoring path: element scores of any weights, group scores of
a layer's declared kinds, and a whole declaration."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loraprune_jax.config import DECLARED_CRITERIA, PruneConfig
from loraprune_jax.core import criteria as C
from loraprune_jax.core.criteria import (CRITERIA, GATE_CRITERIA, REGISTRY, declared_scores,
                                         element_scores, group_scores_of)
from loraprune_jax.core.groups import Coupling, GroupKind
from loraprune_jax.core.lora import NNX

R = 2


def rand(*shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


@pytest.fixture
def mlp():
    """A two-layer MLP in plain Flax naming, LoRA on fc1 only, 4 hidden channels."""
    params = {"fc1": {"kernel": rand(3, 4, seed=1), "bias": rand(4, seed=2)},
              "fc2": {"kernel": rand(4, 2, seed=3), "bias": rand(2, seed=4)}}
    lora = {"fc1": {"kernel": {"a": rand(3, R, seed=5), "b": rand(R, 4, seed=6)}}}
    grads = {"fc1": {"kernel": {"a": rand(3, R, seed=7), "b": rand(R, 4, seed=8)}}}
    kinds = {"hidden": GroupKind(4, (Coupling(("fc1", "kernel"), 1), Coupling(("fc1", "bias"), 0),
                                     Coupling(("fc2", "kernel"), 0)))}
    return params, lora, grads, kinds


def test_registry_is_the_one_list():
    assert CRITERIA == ("lora", "vanilla", "magnitude", "random", "wanda", "fisher", "taylor")
    assert GATE_CRITERIA == ("fisher", "taylor")
    # the vision trainer provides LoRA gradients, a key and gates: its criteria follow
    assert DECLARED_CRITERIA == ("lora", "magnitude", "random", "fisher", "taylor")
    assert PruneConfig(criterion="taylor").beta == REGISTRY["taylor"].ema_beta == 0.99
    assert PruneConfig(criterion="wanda").beta == 0.9
    with pytest.raises(ValueError, match="unknown criterion 'obs'; choose from lora, vanilla"):
        PruneConfig(criterion="obs")
    assert C.ranking_scores("taylor", {"x": jnp.array([-2.0, 1.0])})["x"].tolist() == [2.0, 1.0]
    assert C.ranking_scores("fisher", {"x": jnp.array([-2.0])})["x"].tolist() == [-2.0]
    g = {"x": jnp.array([[1.0, -2.0], [3.0, 4.0]])}  # (examples, groups)
    assert C.gate_statistic("fisher", g)["x"].tolist() == [10.0, 20.0]
    assert C.gate_statistic("taylor", g)["x"].tolist() == [4.0, 2.0]
    with pytest.raises(ValueError, match="not a gate criterion"):
        C.gate_statistic("lora", g)


def test_lora_group_scores_by_hand(mlp):
    params, lora, grads, kinds = mlp
    got = group_scores_of("lora", kinds, params, lora, scale=2.0, lora_grads=grads)["hidden"]
    p, g = lora["fc1"]["kernel"], grads["fc1"]["kernel"]
    est = p["a"] @ g["b"] + g["a"] @ p["b"] - g["a"] @ g["b"]
    per_channel = np.abs(est * (params["fc1"]["kernel"] + 2.0 * p["a"] @ p["b"])).sum(0)
    # only fc1 has a pair; the bias and fc2 do not vote
    np.testing.assert_allclose(got, per_channel / np.linalg.norm(per_channel), rtol=1e-5)


def test_magnitude_votes_every_kernel_but_not_biases(mlp):
    params, lora, _, kinds = mlp
    got = group_scores_of("magnitude", kinds, params, lora, scale=2.0)["hidden"]
    p = lora["fc1"]["kernel"]
    v1 = np.abs(params["fc1"]["kernel"] + 2.0 * p["a"] @ p["b"]).sum(0)
    v2 = np.abs(params["fc2"]["kernel"]).sum(1)
    np.testing.assert_allclose(got, v1 / np.linalg.norm(v1) + v2 / np.linalg.norm(v2), rtol=1e-5)


def test_vanilla_and_wanda_read_paths(mlp):
    params, _, _, kinds = mlp
    wgrads = {"fc1": {"kernel": rand(3, 4, seed=9)}, "fc2": {"kernel": rand(4, 2, seed=10)}}
    got = group_scores_of("vanilla", kinds, params, None, scale=1.0, weight_grads=wgrads)["hidden"]
    v1 = np.abs(wgrads["fc1"]["kernel"] * params["fc1"]["kernel"]).sum(0)
    v2 = np.abs(wgrads["fc2"]["kernel"] * params["fc2"]["kernel"]).sum(1)
    np.testing.assert_allclose(got, v1 / np.linalg.norm(v1) + v2 / np.linalg.norm(v2), rtol=1e-5)
    stats = {("fc1", "kernel"): np.array([1.0, 4.0, 9.0], np.float32),
             ("fc2", "kernel"): np.array([1.0, 1.0, 4.0, 4.0], np.float32)}
    got = group_scores_of("wanda", kinds, params, None, scale=1.0, input_stats=stats)["hidden"]
    v1 = (np.abs(params["fc1"]["kernel"]) * np.array([[1.0], [2.0], [3.0]])).sum(0)
    v2 = (np.abs(params["fc2"]["kernel"]) * np.array([[1.0], [1.0], [2.0], [2.0]])).sum(1)
    np.testing.assert_allclose(got, v1 / np.linalg.norm(v1) + v2 / np.linalg.norm(v2), rtol=1e-5)
    with pytest.raises(ValueError, match="input statistics of every scored weight"):
        group_scores_of("wanda", kinds, params, None, scale=1.0, input_stats={})


def test_element_scores_by_path(mlp):
    params, lora, grads, _ = mlp
    paths = [("fc2", "kernel"), ("fc1", "kernel")]
    got = element_scores("magnitude", params, lora, paths, scale=2.0)
    assert list(got) == paths and got[paths[0]].shape == (4, 2)
    np.testing.assert_allclose(got[paths[0]], np.abs(params["fc2"]["kernel"]), rtol=1e-6)
    with pytest.raises(ValueError, match=r"cannot score \('fc2', 'kernel'\): it has no LoRA pair"):
        element_scores("lora", params, lora, paths, scale=2.0, lora_grads=grads)
    a = element_scores("random", params, None, paths, scale=1.0, key=jax.random.PRNGKey(0))
    b = element_scores("random", params, None, paths, scale=1.0, key=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(a[paths[1]], b[paths[1]])
    values = np.concatenate([np.asarray(v).ravel() for v in a.values()])
    assert values.min() >= 0.0 and values.max() < 1.0 and len(np.unique(values)) == values.size
    with pytest.raises(ValueError, match="fisher criterion scores whole groups"):
        element_scores("fisher", params, None, paths, scale=1.0)


def test_nnx_layout_scores_like_ours(mlp):
    """The same pair named as flax.nnx's LoRALinear names it gives the same scores."""
    params, lora, grads, kinds = mlp
    def as_nnx(tree):
        return {"fc1": {**params["fc1"], "lora": {"lora_a": tree["fc1"]["kernel"]["a"],
                                                  "lora_b": tree["fc1"]["kernel"]["b"]}},
                "fc2": params["fc2"]}
    nnx_params, nnx_grads = as_nnx(lora), as_nnx(grads)
    ours = group_scores_of("lora", kinds, params, lora, scale=1.0, lora_grads=grads)
    theirs = group_scores_of("lora", kinds, nnx_params, nnx_params, scale=1.0, lora_grads=nnx_grads,
                             layout=NNX)
    np.testing.assert_array_equal(ours["hidden"], theirs["hidden"])


def test_declared_scores_layer_keys_and_errors(mlp):
    params, lora, grads, kinds = mlp
    decl = [kinds, kinds]
    rnd = declared_scores("random", params, None, decl, scale=1.0, key=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(  # layer i draws from fold_in(key, i)
        rnd["layers"][1]["hidden"],
        jax.random.uniform(jax.random.split(jax.random.fold_in(jax.random.PRNGKey(3), 1), 1)[0], (4,)))
    assert not np.array_equal(rnd["layers"][0]["hidden"], rnd["layers"][1]["hidden"])
    with pytest.raises(ValueError, match="needs LoRA adapters and their gradients"):
        declared_scores("lora", params, lora, decl, scale=1.0)
    with pytest.raises(ValueError, match="needs LoRA adapters on the layer's coupled weights"):
        declared_scores("lora", params, {"other": {}}, decl, scale=1.0, lora_grads=grads)


@pytest.mark.slow
def test_declared_scores_equal_llama_layer_scores():
    """The whole-tree declaration and the step's per-layer path give the same scores."""
    from conftest import randomize_b, tiny_config
    from loraprune_jax.config import LoraConfig
    from loraprune_jax.models.llama_params import init_base
    from loraprune_jax.models.llama_pruning import layer_scores, llama_declaration
    from loraprune_jax.models.lora import init_lora

    cfg = tiny_config("gqa")
    lc = LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "o", "up", "down"))
    base = init_base(cfg, 0, std=0.3)
    lora = randomize_b(init_lora(jax.random.PRNGKey(0), base, lc))
    grads = randomize_b(jax.tree.map(lambda x: 0.1 * x, lora), key=7)
    decl = llama_declaration(cfg)
    for criterion, kw in (("lora", {"lora_grads": grads}), ("magnitude", {"power": 2})):
        got = declared_scores(criterion, base, lora, decl, scale=lc.scale, **kw)
        for i in range(cfg.num_layers):
            layer_kw = {k: (v["layers"][i] if k == "lora_grads" else v) for k, v in kw.items()}
            want = layer_scores(criterion, base["layers"][i], lora["layers"][i], cfg.head_dim,
                                scale=lc.scale, **layer_kw)
            for kind in ("attn", "mlp"):
                np.testing.assert_array_equal(got["layers"][i][kind], want[kind])
