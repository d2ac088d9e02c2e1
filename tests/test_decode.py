"""KV-cache decoding: parity with the full forward pass, generation, sampling, compilation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import count_compiles, noisy_norms, randomize_b, tiny_config
from loraprune_jax.config import LoraConfig
from loraprune_jax.models.decode import (
    decode_step,
    filter_logits,
    generate,
    init_cache,
    pad_prompts,
    prefill,
)
from loraprune_jax.models.llama import forward
from loraprune_jax.models.llama_params import init_base, stack_layers
from loraprune_jax.models.lora import init_lora
from loraprune_jax.models.llama_pruning import slice_and_merge

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
PROMPT = np.random.RandomState(0).randint(0, 97, size=(2, 11)).astype(np.int32)


def model(kind="gqa", tied=True, **kw):
    cfg = tiny_config(kind, tied, **kw)
    return cfg, noisy_norms(init_base(cfg, 0, std=0.2))


def stacked_model(kind="gqa", tied=True, **kw):
    """A stacked tiny model: the decode loop scans one compiled layer (faster to compile)."""
    cfg, base = model(kind, tied, **kw)
    return cfg, stack_layers(base)


def random_masks(cfg, seed=0, empty_attn_layer=None):
    """0/1 masks with about half the units and channels pruned (at least one kept each)."""
    rs = np.random.RandomState(seed)
    layers = []
    for i in range(cfg.num_layers):
        attn = (rs.rand(cfg.kv_heads(i)) < 0.5).astype(np.float32)
        mlp = (rs.rand(cfg.ffn(i)) < 0.5).astype(np.float32)
        attn[rs.randint(len(attn))] = 1.0
        mlp[rs.randint(len(mlp))] = 1.0
        if i == empty_attn_layer:
            attn[:] = 0.0
        layers.append({"attn": jnp.asarray(attn), "mlp": jnp.asarray(mlp)})
    return {"layers": layers}


def incremental_logits(base, cfg, tokens, split, lora=None, masks=None, lora_cfg=None, chunks=1):
    """Logits (B, T, V) from prefilling ``tokens[:, :split]`` (in ``chunks`` pieces), then one
    decode step per remaining token."""
    b, t = tokens.shape
    cache = init_cache(cfg, b, t + 3, stacked=isinstance(base["layers"], dict))
    out = []
    bounds = np.linspace(0, split, chunks + 1).astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        logits, cache = prefill(base, cfg, tokens[:, lo:hi], cache, lora, masks, lora_cfg)
        out.append(np.asarray(logits))
    for i in range(split, t):
        logits, cache = decode_step(base, cfg, tokens[:, i], cache, lora, masks, lora_cfg)
        out.append(np.asarray(logits)[:, None])
    assert int(cache["length"]) == t
    return np.concatenate(out, axis=1)


_forward = jax.jit(forward, static_argnums=(4, 5))


def naive_greedy(base, cfg, prompt, n, lora=None, masks=None, lora_cfg=None):
    """Re-run the full forward pass on the sequence so far and take the argmax. The sequence
    is right-padded to its final length (causal: padding after a position does not change its
    logits), so the forward pass compiles once."""
    prompt = np.atleast_2d(np.asarray(prompt, np.int32))
    b, t = prompt.shape
    seq = np.zeros((b, t + n), np.int32)
    seq[:, :t] = prompt
    for i in range(t, t + n):
        logits = _forward(base, lora, masks, seq, cfg, lora_cfg)
        seq[:, i] = np.asarray(jnp.argmax(logits[:, i - 1], axis=-1))
    return seq[:, t:]


# ----------------------------------------------------------------------------- cache parity
@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, tied, stacked",
    [("mha", True, False), ("mha", False, True), ("gqa", False, False), ("gqa", True, True)],
)
def test_cache_matches_forward(kind, tied, stacked):
    cfg, base = model(kind, tied)
    want = np.asarray(forward(base, None, None, PROMPT, cfg))
    if stacked:
        base = stack_layers(base)
    got = incremental_logits(base, cfg, PROMPT, split=4)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_and_one_token_prompt():
    cfg, base = model("gqa")
    want = np.asarray(forward(base, None, None, PROMPT, cfg))
    base = stack_layers(base)
    # later chunks attend to the cache and to themselves
    np.testing.assert_allclose(incremental_logits(base, cfg, PROMPT, 9, chunks=3), want,
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(incremental_logits(base, cfg, PROMPT, 1), want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_cache_matches_forward_pruned_widths():
    cfg, base = model("gqa")
    masks = random_masks(cfg, seed=1, empty_attn_layer=1)
    small, small_cfg = slice_and_merge(base, None, masks, cfg)
    assert not small_cfg.is_uniform and small_cfg.heads(1) == 0
    want = np.asarray(forward(small, None, None, PROMPT, small_cfg))
    got = incremental_logits(small, small_cfg, PROMPT, split=5)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True])
def test_cache_matches_forward_lora_and_masks(kind, stacked):
    cfg, base = model(kind)
    lora = randomize_b(init_lora(jax.random.PRNGKey(0), base, LORA))
    masks = random_masks(cfg, seed=2)
    want = np.asarray(forward(base, lora, masks, PROMPT, cfg, LORA))
    # the adapters and masks matter
    assert np.abs(want - np.asarray(forward(base, None, None, PROMPT, cfg))).max() > 1e-2
    if stacked:
        base, lora, masks = stack_layers(base), stack_layers(lora), stack_layers(masks)
    got = incremental_logits(base, cfg, PROMPT, 6, lora, masks, LORA)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_unmerged_masked_generation_equals_sliced_merged(kind):
    cfg, base = model(kind)
    lora = randomize_b(init_lora(jax.random.PRNGKey(3), base, LORA))
    masks = random_masks(cfg, seed=3)
    small, small_cfg = slice_and_merge(base, lora, masks, cfg, LORA)
    got = generate(base, cfg, PROMPT, 12, lora=lora, masks=masks, lora_cfg=LORA)
    want = generate(small, small_cfg, PROMPT, 12)
    np.testing.assert_array_equal(got, want)
    assert got.shape == (2, 12)
    np.testing.assert_array_equal(got, naive_greedy(base, cfg, PROMPT, 12, lora, masks, LORA))


@pytest.mark.slow
def test_bfloat16_cache_close_to_forward():
    cfg, base = model("gqa", dtype="bfloat16")
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    want = np.asarray(forward(base, None, None, PROMPT, cfg))
    got = incremental_logits(stack_layers(base), cfg, PROMPT, split=4)
    assert init_cache(cfg, 1, 4)["layers"][0]["k"].dtype == jnp.bfloat16
    np.testing.assert_allclose(got, want, atol=0.1, rtol=0.05)
    assert generate(base, cfg, PROMPT, 4).shape == (2, 4)


@pytest.mark.slow
def test_left_padded_prefill_matches_unpadded():
    cfg, base = model("gqa")
    short = PROMPT[1, :6]
    tokens, start = pad_prompts([PROMPT[0], short], bucket=16, pad_id=5)
    assert tokens.shape == (2, 16) and list(start) == [5, 10]
    cache = init_cache(cfg, 2, 20, start=start)
    logits, _ = prefill(base, cfg, tokens, cache)
    for row, prompt in ((0, PROMPT[0]), (1, short)):
        want = np.asarray(forward(base, None, None, prompt[None], cfg))[0]
        np.testing.assert_allclose(np.asarray(logits)[row, start[row]:], want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("stacked", [False, True])
def test_greedy_equals_naive_loop(stacked):
    cfg, base = model("gqa", tied=False)
    want = naive_greedy(base, cfg, PROMPT, 10)
    got = generate(stack_layers(base) if stacked else base, cfg, PROMPT, 10)
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_ragged_prompts_equal_each_alone():
    cfg, base = stacked_model("mha")
    prompts = [list(PROMPT[0]), list(PROMPT[1, :3]), [7]]
    batch = generate(base, cfg, prompts, 9)
    for row, p in enumerate(prompts):
        alone = generate(base, cfg, [p], 9)
        np.testing.assert_array_equal(batch[row], alone[0])
        np.testing.assert_array_equal(alone, naive_greedy(base, cfg, p, 9))
    # no bucketing: the same tokens
    np.testing.assert_array_equal(generate(base, cfg, prompts, 9, bucket=1), batch)


@pytest.mark.slow
def test_eos_stops_a_row_and_pads_with_eos():
    cfg, base = stacked_model("gqa")
    free = generate(base, cfg, PROMPT, 10)
    stop = next(i for i in range(1, 9) if free[0, i] not in free[0, :i])  # first fresh token
    eos = int(free[0, stop])
    got = generate(base, cfg, PROMPT, 10, eos_id=eos)
    np.testing.assert_array_equal(got[0, : stop + 1], free[0, : stop + 1])
    assert (got[0, stop + 1 :] == eos).all()
    row1_stop = np.flatnonzero(free[1] == eos)
    n1 = row1_stop[0] + 1 if len(row1_stop) else 10
    np.testing.assert_array_equal(got[1, :n1], free[1, :n1])
    # a single row that stops ends the whole output early
    alone = generate(base, cfg, PROMPT[:1], 10, eos_id=eos)
    np.testing.assert_array_equal(alone, free[:1, : stop + 1])


@pytest.mark.slow
def test_sampling_reproducible_and_greedy_limits():
    cfg, base = stacked_model("gqa")
    greedy = generate(base, cfg, PROMPT, 8)
    kw = dict(temperature=1.0, top_p=0.9, top_k=20)
    a = generate(base, cfg, PROMPT, 8, key=jax.random.PRNGKey(1), **kw)
    b = generate(base, cfg, PROMPT, 8, key=jax.random.PRNGKey(1), **kw)
    c = generate(base, cfg, PROMPT, 8, key=jax.random.PRNGKey(2), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, greedy)
    np.testing.assert_array_equal(generate(base, cfg, PROMPT, 8, temperature=1e-7, key=3), greedy)
    np.testing.assert_array_equal(generate(base, cfg, PROMPT, 8, temperature=2.0, top_k=1), greedy)
    np.testing.assert_array_equal(
        generate(base, cfg, PROMPT, 8, temperature=1.0, top_p=1e-6, key=4), greedy)


def test_filter_logits_top_p_keeps_smallest_nucleus():
    probs = np.array([[0.05, 0.4, 0.1, 0.3, 0.15], [0.2, 0.2, 0.2, 0.2, 0.2]], np.float32)
    logits = jnp.log(jnp.asarray(probs))
    kept = lambda out: set(np.flatnonzero(np.isfinite(np.asarray(out))))
    # sorted: 0.4 (1), 0.3 (3), 0.15 (4), 0.1 (2), 0.05 (0); cumulative 0.4, 0.7, 0.85, 0.95, 1
    for p, want in ((0.3, {1}), (0.4, {1}), (0.5, {1, 3}), (0.7, {1, 3}), (0.71, {1, 3, 4}),
                    (0.9, {1, 3, 4, 2}), (1.0, {0, 1, 2, 3, 4})):
        out = filter_logits(logits, top_p=p)
        assert kept(out[0]) == want, (p, kept(out[0]))
    assert kept(filter_logits(logits, top_k=2)[0]) == {1, 3}
    assert kept(filter_logits(logits, top_k=2, top_p=0.3)[0]) == {1}
    # kept logits are unchanged
    out = np.asarray(filter_logits(logits, top_p=0.5))
    np.testing.assert_array_equal(out[0, [1, 3]], np.asarray(logits)[0, [1, 3]])
    # ties with the last member of the nucleus are kept
    assert kept(filter_logits(logits, top_p=0.3)[1]) == {0, 1, 2, 3, 4}


@pytest.mark.slow
def test_compiles_once_per_shape():
    cfg, base = stacked_model("gqa")
    generate(base, cfg, PROMPT, 6, temperature=0.7, key=0, eos_id=3)
    with count_compiles() as compiles:
        # other prompts of the same padded length, another temperature, seed and eos: no recompile
        generate(base, cfg, [list(PROMPT[0, :5]), list(PROMPT[1, :9])], 6, temperature=1.3, key=5,
                 eos_id=9)
        generate(base, cfg, PROMPT[::-1], 6, temperature=0.7, key=1, eos_id=3)
        assert compiles.total == 0
        generate(base, cfg, PROMPT, 7, temperature=0.7, key=0, eos_id=3)  # a new max_new_tokens
        assert compiles["_generate_jit"] == 1  # the decode loop, as JAX names it in its log


def test_bad_arguments():
    cfg, base = model("gqa")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(base, cfg, PROMPT, 0)
    with pytest.raises(ValueError, match="top_p"):
        generate(base, cfg, PROMPT, 2, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="at least one token"):
        generate(base, cfg, [[1, 2], []], 2)
    with pytest.raises(ValueError, match="do not fit"):
        prefill(base, cfg, PROMPT, init_cache(cfg, 2, 8))
    with pytest.raises(ValueError, match="stacked cache"):
        prefill(stack_layers(base), cfg, PROMPT, init_cache(cfg, 2, 16))


# ----------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2, torch_smollm2):
    """A ragged batch (a chat-template prompt and a plain one) on the real model: each row's
    greedy tokens equal PyTorch transformers' ``generate`` and our naive forward-argmax loop."""
    config, base, tok = smollm2
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    prompts = [tok(chat, add_special_tokens=False)["input_ids"],
               tok("The three primary colors are")["input_ids"]]
    n, eos = 12, config.eos_token_id
    got = generate(stack_layers(base), config, prompts, n, eos_id=eos)
    for row in got:
        print(repr(tok.decode(row)))
    import torch

    ref = torch_smollm2
    for ids, row in zip(prompts, got):
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                               eos_token_id=eos, pad_token_id=eos)
        theirs = out[0, len(ids):].numpy()
        assert len(theirs) >= 5
        np.testing.assert_array_equal(row[: len(theirs)], theirs)
    stop = list(got[0]).index(eos) + 1
    np.testing.assert_array_equal(got[0, :stop], naive_greedy(base, config, prompts[0], stop)[0])
