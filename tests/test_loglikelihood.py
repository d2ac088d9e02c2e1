"""Harness-style tokenization of ``(context, continuation)`` requests and their bucketed, jitted
log-likelihoods: exact against a brute-force forward pass, one compilation per bucket."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import (
    ZEROSHOT_DATA,
    byte_tokenizer,
    count_compiles,
    harness_requests,
    reference_lls,
    tiny_config,
)
from loraprune_jax.data.tasks import TASK_NAMES
from loraprune_jax.eval.loglikelihood import (
    bucket_length,
    continuation_scores,
    encode_pair,
    encode_requests,
    loglikelihoods,
    score_tokens,
    split_trailing_space,
)
from loraprune_jax.models.llama import forward
from loraprune_jax.models.llama_params import init_base, stack_layers
from loraprune_jax.models.llama_pruning import init_masks


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def all_requests(tmp_path_factory):
    """Every request the harness builds from the fixture documents of the seven tasks."""
    built = harness_requests(list(TASK_NAMES), ZEROSHOT_DATA, tmp_path_factory.mktemp("tasks"))
    return [r for docs in built.values() for reqs, _ in docs for r in reqs]


def gqa_model():
    cfg = tiny_config("gqa", vocab_size=256)
    return cfg, init_base(cfg, 0, std=0.2)


def pruned_model():
    """Per-layer widths (a pruned model): list layout, one layer with no attention at all."""
    cfg = tiny_config(
        "gqa", vocab_size=256, layer_num_heads=(6, 3, 0), layer_num_kv_heads=(2, 1, 0),
        layer_intermediate_size=(40, 17, 9),
    )
    return cfg, init_base(cfg, 1, std=0.2)


_forward = jax.jit(forward, static_argnums=(4,))


def reference_ll(base, cfg, ctx, cont, masks=None):
    """One request on its own, unpadded."""
    return reference_lls(base, cfg, [(ctx, cont)], masks=masks)[0]


# ----------------------------------------------------------------------------- tokenization
def test_trailing_space_moves_to_continuation(tok):
    assert split_trailing_space("Answer: ", "yes") == ("Answer:", " yes")
    assert split_trailing_space("a \n ", "b") == ("a", " \n b")
    assert split_trailing_space("a", " b") == ("a", " b")
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert ctx == tok("Answer:")["input_ids"]
    assert ctx + cont == tok("Answer: yes")["input_ids"] and len(cont) == 4


def test_continuation_is_the_tail_of_the_whole_encoding():
    """With merges across the boundary the continuation is what follows len(encode(context))."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["ab"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    merged = PreTrainedTokenizerFast(tokenizer_object=tk)
    ctx, cont = encode_pair(merged, "xa", "bc")
    whole = merged("xabc")["input_ids"]
    assert whole == [vocab["x"], vocab["ab"], vocab["c"]]
    assert ctx == [vocab["x"], vocab["a"]] and cont == [vocab["c"]]  # the tail after 2 tokens


def test_empty_context_uses_bos_or_eos(tok):
    tok = byte_tokenizer()
    tok.add_special_tokens({"eos_token": "<|eos|>"})
    eos = tok.eos_token_id
    assert encode_requests(tok, [("", " hi")]) == [([eos], tok(" hi")["input_ids"])]
    tok.add_special_tokens({"bos_token": "<|bos|>"})
    bos = tok.bos_token_id
    assert encode_requests(tok, [("", " hi")])[0][0] == [bos]
    ctx, cont = encode_requests(tok, [("", "<|bos|> hi")])[0]  # starts with the prefix token
    assert ctx == [bos] and cont == tok(" hi")["input_ids"]


def test_bos_added_only_by_the_tokenizer_policy():
    from tokenizers import processors

    tok = byte_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    ctx, cont = encode_pair(tok, "Hi", " there")
    assert ctx[0] == bos and ctx[1:] == byte_tokenizer()("Hi")["input_ids"]
    assert cont == byte_tokenizer()(" there")["input_ids"]
    ctx, _ = encode_pair(tok, "<s>Hi", " there")  # already has BOS: not added twice
    assert ctx.count(bos) == 1


# ----------------------------------------------------------------------------- exact scores
@pytest.mark.slow
@pytest.mark.parametrize("make", [gqa_model, pruned_model], ids=["gqa", "pruned"])
def test_loglikelihoods_equal_token_nll_on_concatenation(tok, make, all_requests):
    cfg, base = make()
    requests = all_requests
    encoded = encode_requests(tok, requests)
    for (ctx, cont), ids in zip(requests, encoded):  # the byte tokenizer: one token per byte
        assert ids[0] + ids[1] == tok(ctx + cont)["input_ids"]
    ref = reference_lls(base, cfg, encoded)
    assert np.all(np.isfinite(ref))
    i = len(encoded) // 2  # unpadded, on its own
    np.testing.assert_allclose(ref[i], reference_ll(base, cfg, *encoded[i]), rtol=1e-5, atol=1e-5)
    model = stack_layers(base) if cfg.is_uniform else base  # scan over layers, or a list
    ll, greedy = score_tokens(model, cfg, encoded, bucket=256, progress=False)  # one call
    np.testing.assert_allclose(ll, ref, rtol=1e-5, atol=1e-5)
    for bs, bucket in ((1, 256), (7, 64)):  # other batch sizes, paddings and buckets
        other, other_greedy = score_tokens(model, cfg, encoded, batch_size=bs, bucket=bucket,
                                           progress=False)
        np.testing.assert_allclose(other, ll, rtol=1e-5, atol=1e-5)
        assert np.array_equal(other_greedy, greedy)


def test_loglikelihoods_from_strings(tok):
    cfg, base = gqa_model()
    requests = [("Question: why?\nAnswer: ", "because"), ("ab", " c")]
    got = loglikelihoods(base, cfg, tok, requests, progress=False)
    want = reference_lls(base, cfg, [encode_pair(tok, c, x) for c, x in requests])
    np.testing.assert_allclose([g[0] for g in got], want, rtol=1e-5, atol=1e-5)
    assert all(isinstance(g[1], bool) for g in got)


def test_is_greedy_matches_argmax_of_full_logits(tok):
    cfg, base = gqa_model()
    rng = np.random.RandomState(0)
    ctx = list(rng.randint(0, 256, size=9))
    logits = np.asarray(_forward(base, None, None, np.asarray([ctx]), cfg))[0]
    # a continuation made of the model's own greedy choices, and one that is not
    greedy_cont = []
    seq = list(ctx)
    for _ in range(3):
        nxt = int(np.argmax(np.asarray(_forward(base, None, None, np.asarray([seq]), cfg))[0, -1]))
        greedy_cont.append(nxt)
        seq.append(nxt)
    other = (int(np.argmax(logits[-1])) + 1) % 256
    ll, greedy = score_tokens(base, cfg, [(ctx, greedy_cont), (ctx, [other]), (ctx, greedy_cont[:1])],
                              progress=False)
    assert list(greedy) == [True, False, True]
    np.testing.assert_allclose(ll[0], reference_ll(base, cfg, ctx, greedy_cont), rtol=1e-5, atol=1e-5)


def test_one_token_continuations_share_a_row(tok):
    """BoolQ-style ' no' / ' yes' (one token each after the same context) share a forward pass
    and still give each its own exact score; more than MAX_SHARED sharers spill into new rows."""
    cfg, base = gqa_model()
    ctx = tok("Question: is it?\nAnswer:")["input_ids"]
    encoded = [(ctx, [t]) for t in range(20)] + [(ctx[:-2], [5])]
    ll, greedy = score_tokens(base, cfg, encoded, progress=False)
    seq = np.asarray([ctx], np.int32)
    logits = np.asarray(_forward(base, None, None, seq, cfg), np.float64)[0, -1]
    logp = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
    np.testing.assert_allclose(ll[:20], logp[:20], rtol=1e-5, atol=1e-5)
    assert greedy[:20].sum() == (1 if np.argmax(logp) < 20 else 0)
    np.testing.assert_allclose(ll[20], reference_ll(base, cfg, ctx[:-2], [5]), rtol=1e-5, atol=1e-5)


def test_left_truncation_to_max_length(tok):
    cfg, base = gqa_model()
    ctx, cont = list(range(40, 70)), [71, 72, 73]
    ll, _ = score_tokens(base, cfg, [(ctx, cont)], max_length=10, progress=False)
    seq = (ctx + cont)[-11:]  # max_length + 1 tokens kept; the model sees the first 10
    np.testing.assert_allclose(ll[0], reference_ll(base, cfg, seq[:-3], cont), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_length"):
        score_tokens(base, cfg, [([1], list(range(12)))], max_length=10, progress=False)


@pytest.mark.slow
def test_masks_and_lora_reach_the_model(tok, all_requests):
    cfg, base = gqa_model()
    encoded = encode_requests(tok, all_requests[:6])
    dense, _ = score_tokens(base, cfg, encoded, progress=False)
    masks = init_masks(cfg)
    masks["layers"][1]["mlp"] = masks["layers"][1]["mlp"] * 0
    pruned, _ = score_tokens(base, cfg, encoded, masks=masks, progress=False)
    assert not np.allclose(dense, pruned, rtol=1e-4)
    np.testing.assert_allclose(pruned[0], reference_ll(base, cfg, *encoded[0], masks=masks), rtol=1e-5)


def test_compiles_once_per_bucket(tok):
    cfg = tiny_config("gqa", vocab_size=256, rope_theta=12345.0)  # no other test uses this one
    base = init_base(cfg, 2, std=0.2)
    rng = np.random.RandomState(1)

    def reqs(lengths):
        return [(list(rng.randint(0, 256, size=n)), list(rng.randint(0, 256, size=3))) for n in lengths]

    with count_compiles() as compiles:
        ll, _ = score_tokens(base, cfg, reqs([5, 20, 40, 60, 61, 70, 100, 120]), batch_size=3,
                             bucket=64, progress=False)  # inputs of 7..122 tokens: buckets 64, 128
        assert compiles[continuation_scores.__name__] == 2
        score_tokens(base, cfg, reqs([3, 9, 44, 90, 110, 111, 112]), batch_size=3, bucket=64,
                     progress=False)
        assert compiles[continuation_scores.__name__] == 2
    assert np.all(np.isfinite(ll))


def test_bucket_lengths():
    assert [bucket_length(n) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 48, 64]
    assert [bucket_length(n) for n in (65, 96, 97, 129, 193, 257, 385, 1000)] == [
        96, 96, 128, 192, 256, 384, 512, 1024]
    assert [bucket_length(n, 64) for n in (1, 64, 65, 256, 257)] == [64, 64, 128, 256, 384]
    for n in range(1, 3000):
        b = bucket_length(n)
        assert n <= b and (b <= 64 or b - n < b / 3), n
