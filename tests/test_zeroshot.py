"""Zero-shot scoring: lm-eval request construction, exact log-likelihoods, metrics, CLI."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import byte_tokenizer, count_compiles, tiny_config
from loraprune_jax.data.tasks import TASK_NAMES, load_task_docs
from loraprune_jax.cli.zeroshot import add_parser, cmd_zeroshot
from loraprune_jax.eval.loglikelihood import (
    bucket_length,
    continuation_scores,
    encode_pair,
    encode_requests,
    loglikelihoods,
    score_tokens,
    split_trailing_space,
)
from loraprune_jax.eval.zeroshot import evaluate_task, prepare_base, run_zeroshot
from loraprune_jax.eval.zeroshot_tasks import (
    TASKS,
    choice_metrics,
    doc_to_requests,
    hellaswag_preprocess,
    mean_stderr,
)
from loraprune_jax.models.llama import forward, token_nll
from loraprune_jax.models.llama_params import init_base
from loraprune_jax.models.llama_pruning import init_masks

DATA = Path(__file__).parent / "data" / "zeroshot"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


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


def all_requests():
    out = []
    for task in TASK_NAMES:
        for doc in load_task_docs(task, DATA):
            out += doc_to_requests(task, doc)[0]
    return out


_token_nll = jax.jit(token_nll, static_argnums=(4,))  # (base, lora, masks, tokens, config)
_forward = jax.jit(forward, static_argnums=(4,))


def reference_ll(base, cfg, ctx, cont, masks=None):
    """Independent: NLL of the whole concatenated sequence, continuation positions sliced out."""
    seq = np.asarray([ctx + cont], np.int32)
    nll = np.asarray(_token_nll(base, None, masks, seq, cfg), np.float64)[0]
    return -nll[len(ctx) - 1 :].sum()


def reference_lls(base, cfg, pairs):
    """``reference_ll`` of many requests in one call: sequences right-padded to one length
    (a causal model's outputs at real positions do not depend on what follows them)."""
    width = max(len(c) + len(x) for c, x in pairs)
    seqs = np.zeros((len(pairs), width), np.int32)
    for i, (c, x) in enumerate(pairs):
        seqs[i, : len(c) + len(x)] = c + x
    nll = np.asarray(_token_nll(base, None, None, seqs, cfg), np.float64)
    return np.array([-nll[i, len(c) - 1 : len(c) + len(x) - 1].sum() for i, (c, x) in enumerate(pairs)])


# ----------------------------------------------------------------------------- request building
def test_arc_requests_with_numeric_labels_and_odd_choice_counts():
    docs = load_task_docs("arc_easy", DATA)
    reqs, gold, choices = doc_to_requests("arc_easy", docs[0])
    ctx = "Question: Which object is the best conductor of heat?\nAnswer:"
    assert reqs == [(ctx, " " + c) for c in choices] and gold == 1
    assert doc_to_requests("arc_easy", docs[1])[1] == 1  # labels "1"-"4", answerKey "2"
    assert len(doc_to_requests("arc_easy", docs[2])[0]) == 3
    ch = load_task_docs("arc_challenge", DATA)
    assert (len(doc_to_requests("arc_challenge", ch[0])[0]), doc_to_requests("arc_challenge", ch[0])[1]) == (5, 2)
    assert doc_to_requests("arc_challenge", ch[1])[1] == 0  # answerKey "1" of 3 choices
    bad = dict(docs[0], answerKey="Z")
    with pytest.raises(ValueError, match="answerKey 'Z'"):
        doc_to_requests("arc_easy", bad)


def test_openbookqa_stem_only_and_answer_key_with_space():
    docs = load_task_docs("openbookqa", DATA)
    reqs, gold, _ = doc_to_requests("openbookqa", docs[1])
    assert reqs[0] == ("When it is cold outside, people often wear", " shorts")
    assert gold == 2  # answerKey " C" lstripped


def test_boolq_prompt():
    doc = load_task_docs("boolq", DATA)[1]
    reqs, gold, choices = doc_to_requests("boolq", doc)
    ctx = ("Penguin -- Penguins are a group of aquatic flightless birds. They live almost "
           "exclusively in the Southern Hemisphere.\nQuestion: can penguins fly?\nAnswer:")
    assert reqs == [(ctx, " no"), (ctx, " yes")] and gold == 0 and choices == ["no", "yes"]


def test_piqa_prompt():
    doc = load_task_docs("piqa", DATA)[1]
    reqs, gold, _ = doc_to_requests("piqa", doc)
    assert reqs[1] == ("Question: How do I cool a hot drink quickly?\nAnswer:",
                       " Add a few ice cubes and stir.")
    assert gold == 1


def test_winogrande_partial_scoring():
    doc = load_task_docs("winogrande", DATA)[0]
    reqs, gold, choices = doc_to_requests("winogrande", doc)
    cont = " was too big."
    assert reqs == [
        ("The trophy did not fit in the suitcase because the trophy", cont),
        ("The trophy did not fit in the suitcase because the suitcase", cont),
    ]
    assert gold == 0 and choices == [r[0] for r in reqs]
    doc2 = load_task_docs("winogrande", DATA)[1]
    assert doc_to_requests("winogrande", doc2)[1] == 1
    assert doc_to_requests("winogrande", doc2)[0][1] == (
        "Anna gave Maria a gift because Maria", " was celebrating her birthday.")


def test_hellaswag_preprocessing():
    assert hellaswag_preprocess("  Home [title] Check the soil. [step] Water it.  ") == (
        "Home. Check the soil. Water it.")
    assert hellaswag_preprocess("a [header] b") == "a b"
    assert hellaswag_preprocess("x  y") == "x y"
    assert hellaswag_preprocess("x   y") == "x  y"  # one pass of "  " -> " ", as in lm-eval
    docs = load_task_docs("hellaswag", DATA)
    reqs, gold, choices = doc_to_requests("hellaswag", docs[0])
    assert reqs[2] == ("Making a sandwich: A man takes two slices of bread out of a bag. He",
                       " spreads butter on one slice with a knife.")
    assert gold == 2
    reqs, gold, choices = doc_to_requests("hellaswag", docs[1])
    assert reqs[0][0] == ("Home and Garden: How to water a plant. Check the soil. "
                          "Stick your finger about an inch into the soil.")
    # the harness strips before dropping tags, so a leading tag leaves a leading space, and the
    # continuation starts with two (delimiter + that space); kept, as lm-eval scores it
    assert choices == [" If it feels dry, the plant needs water.", " Pour the soil into the sink.",
                       " Remove the leaves one by one.", " Paint the pot Choose a color."]
    assert reqs[0][1] == "  If it feels dry, the plant needs water."


def test_ctx_b_capitalize_lowers_the_rest():
    doc = {"activity_label": "A", "ctx_a": "x.", "ctx_b": "then the NBA player", "endings": ["e"],
           "label": 0}
    assert doc_to_requests("hellaswag", doc)[0][0][0] == "A: x. Then the nba player"


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


# ----------------------------------------------------------------------------- metrics
def test_acc_and_acc_norm_by_hand():
    # raw: choice 0 wins (-4 > -6); per character: -4/2 = -2 < -6/6 = -1 -> choice 1
    m = choice_metrics([-4.0, -6.0], 1, ["ab", "abcdef"])
    assert (m["acc"], m["acc_norm"], m["pred"], m["pred_norm"]) == (0.0, 1.0, 0, 1)
    m = choice_metrics([-4.0, -6.0], 0, ["ab", "abcdef"])
    assert (m["acc"], m["acc_norm"]) == (1.0, 0.0)
    m = choice_metrics([-3.0, -3.0, -9.0], 0, ["a", "b", "ccc"])  # ties: the first
    assert (m["acc"], m["acc_norm"]) == (1.0, 1.0)
    m = choice_metrics([-10.0, -9.0, -12.0], 2, ["aaaa", "bbb", "cccccc"])
    assert (m["pred"], m["pred_norm"]) == (1, 2)


def test_stderr_is_sample_std_over_sqrt_n():
    assert mean_stderr([1, 0, 1, 1]) == pytest.approx(0.25)  # std (ddof 1) 0.5 / sqrt(4)
    x = [1, 0, 0, 1, 1, 1, 0]
    assert mean_stderr(x) == pytest.approx(np.std(x, ddof=1) / math.sqrt(7))
    assert math.isnan(mean_stderr([1]))


# ----------------------------------------------------------------------------- exact scores
@pytest.mark.slow
@pytest.mark.parametrize("make", [gqa_model, pruned_model], ids=["gqa", "pruned"])
def test_loglikelihoods_equal_token_nll_on_concatenation(tok, make):
    cfg, base = make()
    requests = all_requests()
    encoded = encode_requests(tok, requests)
    for (ctx, cont), ids in zip(requests, encoded):  # the byte tokenizer: one token per byte
        assert ids[0] + ids[1] == tok(ctx + cont)["input_ids"]
    ref = reference_lls(base, cfg, encoded)
    assert np.all(np.isfinite(ref))
    i = len(encoded) // 2  # unpadded, on its own
    np.testing.assert_allclose(ref[i], reference_ll(base, cfg, *encoded[i]), rtol=1e-5, atol=1e-5)
    model = prepare_base(base, cfg)
    assert isinstance(model["layers"], dict) == cfg.is_uniform
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
def test_masks_and_lora_reach_the_model(tok):
    cfg, base = gqa_model()
    encoded = encode_requests(tok, all_requests()[:6])
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


# ----------------------------------------------------------------------------- tasks end to end
def test_evaluate_task_aggregates_per_document(tok):
    cfg, base = gqa_model()
    docs = load_task_docs("arc_easy", DATA)
    res = evaluate_task(base, cfg, tok, "arc_easy", docs, progress=False, keep_samples=True)
    assert (res.docs, res.requests) == (3, 11)
    accs, norms = [], []
    for doc, sample in zip(docs, res.samples):
        reqs, gold, choices = doc_to_requests("arc_easy", doc)
        lls = reference_lls(base, cfg, [encode_pair(tok, c, x) for c, x in reqs])
        np.testing.assert_allclose(sample["lls"], lls, rtol=1e-5, atol=1e-5)
        m = choice_metrics(lls, gold, choices)
        accs.append(m["acc"])
        norms.append(m["acc_norm"])
    assert res.acc == pytest.approx(np.mean(accs))
    assert res.acc_norm == pytest.approx(np.mean(norms))
    assert res.acc_stderr == pytest.approx(mean_stderr(accs), nan_ok=True)
    out = res.to_dict()
    assert "samples" not in out and "acc_norm" in out
    boolq = evaluate_task(base, cfg, tok, "boolq", load_task_docs("boolq", DATA), progress=False)
    assert boolq.acc_norm is None and "acc_norm" not in boolq.to_dict()
    assert {t for t, task in TASKS.items() if "acc_norm" in task.metrics} == {
        "arc_easy", "arc_challenge", "openbookqa", "piqa", "hellaswag"}


def test_run_zeroshot_all_tasks(tok):
    cfg, base = gqa_model()
    results = run_zeroshot(base, cfg, tok, list(TASK_NAMES), data_dir=DATA, limit=2, bucket=256,
                           progress=False)
    assert list(results) == list(TASK_NAMES)
    for name, res in results.items():
        assert res.docs == 2 and 0.0 <= res.acc <= 1.0 and res.seconds > 0, name
    with pytest.raises(FileNotFoundError, match="boolq/dev.jsonl"):
        run_zeroshot(base, cfg, tok, ["boolq"], data_dir=DATA / "arc", progress=False)


def test_cli_subcommand(tiny_run_inputs, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="loraprune-jax")
    add_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "zs.json"
    args = parser.parse_args([
        "zeroshot", "--model", str(tiny_run_inputs / "model"), "--tasks", "boolq", "winogrande",
        "piqa", "--data-dir", str(DATA), "--limit", "2", "--json", str(out), "--no-progress",
        "--batch-size", "4",
    ])
    assert args.func is cmd_zeroshot
    assert cmd_zeroshot(args) == 0
    payload = json.loads(out.read_text())
    assert set(payload["results"]) == {"boolq", "winogrande", "piqa"}
    assert payload["results"]["piqa"]["docs"] == 2 and "acc_norm" in payload["results"]["piqa"]
    assert payload["mean_acc"] == pytest.approx(
        np.mean([r["acc"] for r in payload["results"].values()]))
    printed = capsys.readouterr().out
    assert "winogrande" in printed and "mean acc" in printed
    bad = parser.parse_args(["zeroshot", "--model", str(tiny_run_inputs / "model"),
                             "--tasks", "hellaswag", "--data-dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="hellaswag_val.jsonl"):
        cmd_zeroshot(bad)
    with pytest.raises(SystemExit):
        parser.parse_args(["zeroshot", "--model", "x", "--tasks", "mmlu"])


# ----------------------------------------------------------------------------- the real model
ARC_ITEMS = [
    ("What gas do plants take in from the air to make food?",
     ["oxygen", "carbon dioxide", "nitrogen", "helium"], 1),
    ("Which of these is a source of light?", ["a mirror", "the Sun", "the Moon at noon", "a rock"], 1),
    ("What is the boiling point of water at sea level?",
     ["0 degrees Celsius", "50 degrees Celsius", "100 degrees Celsius", "200 degrees Celsius"], 2),
    ("Which organ pumps blood through the body?", ["the lungs", "the stomach", "the heart"], 2),
    ("Which planet is closest to the Sun?", ["Mercury", "Venus", "Earth", "Mars", "Jupiter"], 0),
]


def arc_docs():
    return [
        {"id": f"hand-{i}", "question": q,
         "choices": {"text": c, "label": list("ABCDE"[: len(c)])}, "answerKey": "ABCDE"[g]}
        for i, (q, c, g) in enumerate(ARC_ITEMS)
    ]


@pytest.mark.slow
def test_smollm2_arc_items_reproducible_and_match_pytorch(smollm2, torch_smollm2):
    config, base, tokenizer = smollm2
    docs = arc_docs()
    model = prepare_base(base, config)
    res = evaluate_task(model, config, tokenizer, "arc_easy", docs, progress=False, keep_samples=True)
    again = evaluate_task(model, config, tokenizer, "arc_easy", docs, progress=False,
                          keep_samples=True, batch_size=1)
    lls = np.array([x for s in res.samples for x in s["lls"]])
    assert np.all(np.isfinite(lls)) and np.all(lls < 0)
    np.testing.assert_allclose([x for s in again.samples for x in s["lls"]], lls, rtol=1e-5, atol=1e-4)
    assert (res.acc, res.acc_norm) == (again.acc, again.acc_norm)
    assert res.acc >= 0.6  # easy hand-written science questions; SmolLM2-135M gets most right

    import torch

    ref = torch_smollm2
    requests = [r for d in docs for r in doc_to_requests("arc_easy", d)[0]]
    want = []
    with torch.no_grad():
        for ctx, cont in encode_requests(tokenizer, requests):
            ids = torch.tensor([ctx + cont], dtype=torch.long)
            logp = torch.log_softmax(ref(ids).logits[0].double(), dim=-1)
            pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
            want.append(float(logp[pos, torch.tensor(cont)].sum()))
    np.testing.assert_allclose(lls, want, rtol=1e-4, atol=2e-3)
