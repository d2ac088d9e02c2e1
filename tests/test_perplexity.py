"""Perplexity: the protocol on tiny models, and the golden value of the real bundled model."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from conftest import tiny_config
from loraprune_jax.config import LoraConfig
from loraprune_jax.data import lee_text
from loraprune_jax.data.packing import tokenize_join
from loraprune_jax.eval.perplexity import perplexity
from loraprune_jax.models.llama import token_nll
from loraprune_jax.models.llama_params import init_base
from loraprune_jax.models.lora import init_lora
from loraprune_jax.models.llama_pruning import init_masks


@pytest.mark.slow
def test_protocol_matches_direct_nll():
    cfg = tiny_config("gqa")
    base = init_base(cfg, 0, std=0.2)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, size=70)
    res = perplexity(base, cfg, ids, 16, batch_size=3, progress=False)
    assert (res.windows, res.tokens, res.seq_len) == (4, 64, 16)  # remainder of 6 dropped
    nll = np.asarray(token_nll(base, None, None, ids[:64].reshape(4, 16), cfg), np.float64)
    assert nll.shape == (4, 15)
    np.testing.assert_allclose(res.nll, nll.mean(), rtol=1e-6)
    np.testing.assert_allclose(res.ppl, math.exp(nll.mean()), rtol=1e-6)
    # batching (with a padded last batch) does not change the value
    for bs in (1, 2, 4, 7):
        other = perplexity(base, cfg, ids, 16, batch_size=bs, progress=False)
        np.testing.assert_allclose(other.ppl, res.ppl, rtol=1e-6)
    two = perplexity(base, cfg, ids, 16, max_windows=2, progress=False)
    np.testing.assert_allclose(two.nll, nll[:2].mean(), rtol=1e-6)
    assert two.tokens == 32


def test_masks_and_lora_are_used():
    cfg = tiny_config("mha")
    base = init_base(cfg, 0, std=0.2)
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, size=64)
    dense = perplexity(base, cfg, ids, 16, progress=False)
    masks = init_masks(cfg)
    masks["layers"][1]["mlp"] = masks["layers"][1]["mlp"] * 0
    pruned = perplexity(base, cfg, ids, 16, masks=masks, progress=False)
    assert pruned.ppl != pytest.approx(dense.ppl, rel=1e-4)
    lc = LoraConfig(rank=2)
    lora = init_lora(jax.random.PRNGKey(0), base, lc)
    same = perplexity(base, cfg, ids, 16, lora=lora, lora_cfg=lc, progress=False)
    np.testing.assert_allclose(same.ppl, dense.ppl, rtol=1e-6)  # B = 0


def test_too_short_text_raises():
    cfg = tiny_config("mha")
    base = init_base(cfg, 0)
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(base, cfg, np.arange(10), 16, progress=False)


@pytest.mark.slow
def test_golden_lee_perplexity(smollm2):
    """PyTorch transformers on the same dequantized weights gives 33.304 (first 6 x 512 windows)."""
    config, base, tokenizer = smollm2
    ids = tokenize_join(lee_text(), tokenizer)
    assert ids[0] != tokenizer.bos_token_id  # no BOS: the GGUF says add_bos_token = False
    res = perplexity(base, config, ids, 512, max_windows=6, batch_size=3, progress=False)
    assert res.windows == 6 and res.tokens == 3072
    assert res.ppl == pytest.approx(33.304, rel=1e-3)
