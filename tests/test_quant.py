"""The int8 frozen base: quantization against qwix, its error bound, lazy slices, and that the
forward pass, the LoRA gradients and every criterion's step with an int8 base equal the same on
the dequantized float base."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from conftest import randomize_b, tiny_config
from loraprune_jax.config import CRITERIA, LoraConfig, PruneConfig, TrainConfig
from loraprune_jax.core.criteria import get_criterion
from loraprune_jax.models import quant
from loraprune_jax.models.llama import forward, loss
from loraprune_jax.models.llama_params import base_shardings, init_base, shard_base, stack_layers
from loraprune_jax.models.llama_pruning import init_element_masks, init_masks
from loraprune_jax.models.lora import init_lora
from loraprune_jax.parallel.mesh import make_mesh
from loraprune_jax.train.step import init_state, make_train_step


FAST = {("lora", "structured")}


def _weights(shape=(96, 40), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 3.0, (1, shape[1]))
    w[:, 3] = 0.0  # an all-zero channel takes scale 1, as in qwix
    return w.astype(np.float32)


@pytest.mark.parametrize("shape", [(96, 40), (7, 300), (1, 5)])
def test_host_quantization_equals_qwix_bit_for_bit(shape):
    w = _weights(shape)
    ours = quant.quantize_host(w)
    ref = qwix.quantize(jnp.asarray(w), jnp.int8, channelwise_axes=[1])
    assert ours.qvalue.dtype == np.int8 and ours.scale.shape == (1, shape[1])
    np.testing.assert_array_equal(ours.qvalue, np.asarray(ref.qvalue))
    np.testing.assert_array_equal(ours.scale, np.asarray(ref.scale))
    np.testing.assert_array_equal(np.asarray(quant.quantize(jnp.asarray(w)).qvalue), ours.qvalue)


def test_round_trip_error_is_at_most_half_a_step():
    w = _weights((256, 64), seed=1)
    q = quant.quantize_host(w)
    back = quant.dequantize_host(q)
    step = q.scale[0]
    err = np.abs(back - w)
    assert np.all(err <= step / 2 * (1 + 1e-4))  # half a step, up to float rounding
    # the largest magnitude of each channel sits at the edge of the range (+-127 or -128)
    nonzero = np.abs(w).max(0) > 0
    assert np.all(np.abs(q.qvalue.astype(np.int32)).max(0)[nonzero] >= 127)
    np.testing.assert_allclose(np.asarray(quant.dequantize(jax.tree.map(jnp.asarray, q))), back,
                               rtol=1e-6, atol=1e-7)


def test_lazy_slices_equal_the_whole_quantization():
    w = _weights((50, 33), seed=2)
    whole = quant.quantize_host(w)
    lazy = quant.quantize_host(w, lazy=True)
    assert isinstance(lazy.qvalue, quant.Int8Slices) and lazy.qvalue.shape == (50, 33)
    np.testing.assert_array_equal(lazy.scale, whole.scale)
    for idx in [(slice(0, 50), slice(0, 33)), (slice(10, 20), slice(5, 6)), (slice(None), slice(32, 33))]:
        np.testing.assert_array_equal(lazy.qvalue[idx], whole.qvalue[idx])
    np.testing.assert_array_equal(np.asarray(lazy.qvalue), whole.qvalue)


def test_scales_read_in_blocks_equal_one_pass(monkeypatch):
    w = _weights((64, 70), seed=3)
    one = quant.quantize_host(w)
    monkeypatch.setattr(quant, "_CHUNK_BYTES", 64 * 4 * 3)  # three columns per block
    np.testing.assert_array_equal(quant.quantize_host(w).scale, one.scale)


def _tiny(stacked: bool, seed: int = 0):
    config = tiny_config("gqa")
    host = jax.tree.map(np.asarray, init_base(config, seed, std=0.2))
    qhost = quant.quantize_base(host)
    deq = quant.dequantize_base_host(qhost)
    q = jax.tree.map(jnp.asarray, qhost)
    f = jax.tree.map(jnp.asarray, deq)
    if stacked:
        q, f = stack_layers(q), stack_layers(f)
    return config, q, f


@pytest.mark.parametrize("stacked", [pytest.param(False, marks=pytest.mark.slow),
                                     pytest.param(True, marks=pytest.mark.slow)])
def test_forward_and_lora_grads_equal_the_dequantized_float_base(stacked, tokens):
    config, q, f = _tiny(stacked)
    lora_cfg = LoraConfig(rank=4, alpha=8.0)
    lora = randomize_b(init_lora(jax.random.PRNGKey(0), f, lora_cfg))
    masks = init_masks(config, stacked=stacked)
    assert quant.is_quantized(q["layers"]["q"] if stacked else q["layers"][0]["q"])
    np.testing.assert_allclose(np.asarray(forward(q, lora, masks, tokens, config, lora_cfg)),
                               np.asarray(forward(f, lora, masks, tokens, config, lora_cfg)),
                               rtol=1e-5, atol=1e-5)
    batch = {"tokens": tokens}
    gq = jax.grad(lambda l: loss(q, l, masks, batch, config, lora_cfg))(lora)
    gf = jax.grad(lambda l: loss(f, l, masks, batch, config, lora_cfg))(lora)
    for a, b in zip(jax.tree.leaves(gq), jax.tree.leaves(gf)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


# every criterion, structured and (where it scores weights) unstructured; two in the fast lane
CASES = [pytest.param(c, g, marks=() if (c, g) in FAST else pytest.mark.slow)
         for g in ("structured", "unstructured") for c in CRITERIA
         if g == "structured" or not get_criterion(c).gated]


@pytest.mark.parametrize("criterion,granularity", CASES)
def test_every_criterion_steps_on_an_int8_base_as_on_its_dequantized_base(criterion, granularity):
    config, q, f = _tiny(stacked=True, seed=1)
    lora_cfg = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
    prune_cfg = PruneConfig(criterion=criterion, granularity=granularity, ratio=0.5)
    train_cfg = TrainConfig(steps=4, micro_batch_size=2, grad_accum=2, seq_len=16)
    masks = (init_element_masks(config, lora_cfg.targets, stacked=True)
             if prune_cfg.element_wise else init_masks(config, stacked=True))
    lora = randomize_b(init_lora(jax.random.PRNGKey(0), f, lora_cfg))
    batch = {"tokens": jax.random.randint(jax.random.PRNGKey(5), (2, 2, 16), 0, config.vocab_size)}
    key = jax.random.PRNGKey(2)
    out = []
    for base in (q, f):
        step = make_train_step(config, lora_cfg, train_cfg, prune_cfg, donate=False)
        state, metrics = step(init_state(lora, masks, train_cfg), base, masks, batch, key)
        out.append((state["scores"], state["lora"], metrics["loss"]))
    for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


@pytest.mark.slow
def test_int8_base_places_on_a_mesh_and_steps_as_on_one_device():
    config = tiny_config("gqa", vocab_size=96)  # the tensor axis splits the vocabulary
    host = jax.tree.map(np.asarray, init_base(config, 0, std=0.2))
    lazy = quant.quantize_base(host, lazy=True)
    mesh = make_mesh("data:2,fsdp:2,tensor:2")
    placed = shard_base(lazy, config, mesh)
    want = base_shardings(config, mesh, stacked=True, base_dtype="int8")
    assert jax.tree.structure(placed) == jax.tree.structure(want)
    for x, sharding in zip(jax.tree.leaves(placed), jax.tree.leaves(want)):
        assert x.sharding.is_equivalent_to(sharding, x.ndim)
    one = stack_layers(jax.tree.map(jnp.asarray, quant.quantize_base(host)))
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(one)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lora_cfg = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
    train_cfg = TrainConfig(steps=4, micro_batch_size=4, grad_accum=1, seq_len=16)
    prune_cfg = PruneConfig(criterion="lora", ratio=0.5)
    masks = init_masks(config, stacked=True)
    lora = randomize_b(init_lora(jax.random.PRNGKey(0), one, lora_cfg))
    batch = {"tokens": jax.random.randint(jax.random.PRNGKey(5), (1, 4, 16), 0, config.vocab_size)}
    key = jax.random.PRNGKey(2)
    single = make_train_step(config, lora_cfg, train_cfg, prune_cfg, donate=False)
    sharded = make_train_step(config, lora_cfg, train_cfg, prune_cfg, donate=False, mesh=mesh,
                              stacked=True, base_dtype="int8")
    s1, m1 = single(init_state(lora, masks, train_cfg), one, masks, batch, key)
    s2, m2 = sharded(init_state(lora, masks, train_cfg), placed, masks, batch, key)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1["scores"]), jax.tree.leaves(s2["scores"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_bad_base_dtype_names_what_is_accepted():
    with pytest.raises(ValueError, match="base_dtype must be one of int8"):
        quant.check_base_dtype("int4")
    with pytest.raises(ValueError, match=r"\(in, out\) weight"):
        quant.quantize_host(np.zeros((2, 3, 4), np.float32))


def test_w8a8_forward_is_close_and_its_gradient_is_the_float_one(tokens):
    config, q, f = _tiny(stacked=True, seed=2)
    lora_cfg = LoraConfig(rank=4, alpha=8.0)
    lora = randomize_b(init_lora(jax.random.PRNGKey(0), f, lora_cfg))
    x = jax.random.normal(jax.random.PRNGKey(3), (5, 48))
    w = jax.tree.map(lambda a: a[0], q["layers"]["q"])  # layer 0 of the stacked weight
    with quant.w8a8():
        y8 = quant.project(x, w)
        g8 = jax.grad(lambda x: jnp.sum(jnp.sin(quant.project(x, w))))(x)
    y = quant.project(x, w)
    g = jax.grad(lambda x: jnp.sum(jnp.sin(quant.project(x, w))))(x)
    # int8 activations (one scale per row): error about one activation step
    step = np.abs(np.asarray(x)).max(1, keepdims=True) / 127.5
    bound = step * np.abs(np.asarray(quant.dequantize(w))).sum(0)  # |dx| |W| summed over inputs
    assert np.all(np.abs(np.asarray(y8 - y)) <= bound) and not np.allclose(y8, y)
    # straight through: the W8A8 gradient is the float one at the W8A8 output
    want = (np.cos(np.asarray(y8)) @ np.asarray(quant.dequantize(w)).T)
    np.testing.assert_allclose(np.asarray(g8), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(g8, g, rtol=1e-7, atol=0)
    with quant.w8a8():
        logits8 = forward(q, lora, None, tokens, config, lora_cfg)
    logits = forward(q, lora, None, tokens, config, lora_cfg)
    assert float(jnp.max(jnp.abs(logits8 - logits))) < 0.05 * float(jnp.max(jnp.abs(logits)))


@pytest.mark.slow
def test_cli_commands_with_an_int8_base_on_one_device_and_a_mesh(tmp_path, capsys):
    """eval, zeroshot and generate take --base-dtype int8: perplexity within 1% of float (and not
    equal to it), and the same numbers on a mesh as on one device."""
    import json
    from pathlib import Path

    from conftest import byte_tokenizer, noisy_norms
    from loraprune_jax.cli import main
    from loraprune_jax.io import save_hf_dir

    cfg = tiny_config("gqa", vocab_size=256)
    model = tmp_path / "model"
    save_hf_dir(model, cfg, noisy_norms(init_base(cfg, 0, std=0.3)), byte_tokenizer())
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    ev = ["eval", "--model", str(model), "--text", str(text), "--seq-len", "32", "--batch-size", "4",
          "--no-progress", "--json"]
    ppl = {}
    for name, extra in {"float": [], "int8": ["--base-dtype", "int8"],
                        "int8-mesh": ["--base-dtype", "int8", "--mesh", "data:2,fsdp:2,tensor:2"]}.items():
        assert main(ev + [str(tmp_path / f"{name}.json")] + extra) == 0
        ppl[name] = json.loads((tmp_path / f"{name}.json").read_text())["ppl"]
    assert "projections int8" in capsys.readouterr().err
    assert ppl["int8"] == pytest.approx(ppl["float"], rel=1e-2) and ppl["int8"] != ppl["float"]
    assert ppl["int8-mesh"] == pytest.approx(ppl["int8"], rel=1e-5)
    data = Path(__file__).parent / "data" / "zeroshot"
    zs = ["zeroshot", "--model", str(model), "--tasks", "piqa", "--data-dir", str(data),
          "--limit", "2", "--samples", "--no-progress", "--base-dtype", "int8", "--json"]
    assert main(zs + [str(tmp_path / "z1.json")]) == 0
    assert main(zs + [str(tmp_path / "z8.json"), "--mesh", "fsdp:-1"]) == 0
    one, many = (json.loads((tmp_path / f).read_text())["results"]["piqa"] for f in ("z1.json", "z8.json"))
    assert one["acc"] == many["acc"]
    for a, b in zip(one["samples"], many["samples"]):
        np.testing.assert_allclose(a["lls"], b["lls"], rtol=1e-5, atol=1e-5)
    gen = ["generate", "--model", str(model), "--prompt", "Hello", "--max-new-tokens", "5",
           "--base-dtype", "int8"]
    capsys.readouterr()
    assert main(gen) == 0
    one_text = capsys.readouterr().out.split("new tokens in")[0]
    assert main(gen + ["--mesh", "fsdp:-1"]) == 0
    assert capsys.readouterr().out.split("new tokens in")[0] == one_text
