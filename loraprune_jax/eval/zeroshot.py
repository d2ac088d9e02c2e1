"""Zero-shot multiple-choice accuracy with lm-evaluation-harness (0.4.13) semantics.

Tasks: BoolQ, PIQA, HellaSwag, WinoGrande, ARC-Easy, ARC-Challenge, OpenBookQA (the seven of
the LoRAPrune / LLM-Pruner tables). Each document becomes a list of ``(context, continuation)``
requests and a gold index:

* ordinary tasks: one request ``(doc_to_text, " " + choice)`` per choice;
* WinoGrande (partial scoring): one context per option, ``sentence[:i] + option`` with ``i`` the
  blank, and one shared continuation ``" " + sentence[i+1:].strip()``.

A request is scored by the *summed* log-likelihood of its continuation tokens given the context
(float32 log-softmax). ``acc`` = argmax of the sums; ``acc_norm`` (ARC, OpenBookQA, PIQA,
HellaSwag) = argmax of the sum divided by the choice's length in characters. Standard errors are
the sample standard deviation over documents divided by ``sqrt(n)``, as the harness reports.

Tokenization follows the harness' Hugging Face causal-LM backend: trailing spaces of a context
move to the front of the continuation; ``context + continuation`` is encoded whole and the
continuation tokens are the tail after ``len(encode(context))`` tokens; the tokenizer's own
special-token policy applies (BOS only when the tokenizer adds one; none when the text already
starts with the BOS string); an empty context is replaced by the BOS (else EOS) token; sequences
longer than ``max_length + 1`` tokens are truncated from the left.

Scoring is batched: requests are turned into rows (input tokens, continuation targets), rows are
grouped into length buckets (:func:`bucket_length`) with a fixed number of rows per call in each
bucket, so the jitted :func:`continuation_scores` compiles once per bucket. Rows are
right-padded, which a causal model cannot see. Requests whose continuation is a single token and
whose inputs are identical (BoolQ's " no" / " yes") share one row, as the harness' logits cache
does. Only the hidden states at the continuation positions go through the LM head.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..config import LlamaConfig, LoraConfig
from ..data.tasks import TASK_NAMES, load_task_docs
from ..models.llama import forward, logits_from_hidden, stack_layers

TARGET_DELIMITER = " "
MAX_SHARED = 8  # requests that can share one row (one-token continuations of the same input)
TOKENS_PER_BATCH = 4096  # rows per call when no batch size is given: about this many tokens

Doc = dict[str, Any]


# ============================================================================= tasks
def hellaswag_preprocess(text: str) -> str:
    """The harness' HellaSwag cleaning: strip, ``" [title]"`` -> ``". "``, drop ``[...]`` tags,
    double spaces -> one (a single pass, as ``str.replace`` does)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _label_index(doc: Doc, key: str) -> int:
    labels = list(doc["choices"]["label"])
    if key not in labels:
        raise ValueError(
            f"document {doc.get('id', '?')!r}: answerKey {key!r} is not one of its labels {labels}"
        )
    return labels.index(key)


def _winogrande_blank(doc: Doc) -> int:
    i = doc["sentence"].find("_")
    if i < 0:
        raise ValueError(f"winogrande sentence has no blank '_': {doc['sentence']!r}")
    return i


@dataclasses.dataclass(frozen=True)
class Task:
    """A multiple-choice task as the harness defines it.

    ``text(doc)``: the context (``doc_to_text``); ``choices(doc)``: the answer strings
    (``doc_to_choice``; for a partial-scoring task, the contexts); ``gold(doc)``: the gold index;
    ``continuation(doc)``: the shared continuation of a partial-scoring task (``doc_to_target``).
    """

    name: str
    text: Callable[[Doc], str] | None
    choices: Callable[[Doc], list[str]]
    gold: Callable[[Doc], int]
    metrics: tuple[str, ...]
    split: str
    dataset: str
    continuation: Callable[[Doc], str] | None = None

    @property
    def partial(self) -> bool:
        return self.continuation is not None


def _arc(name: str, config: str) -> Task:
    return Task(
        name=name,
        text=lambda d: f"Question: {d['question']}\nAnswer:",
        choices=lambda d: list(d["choices"]["text"]),
        gold=lambda d: _label_index(d, d["answerKey"]),
        metrics=("acc", "acc_norm"),
        split="test",
        dataset=f"allenai/ai2_arc ({config})",
    )


TASKS: dict[str, Task] = {
    "arc_easy": _arc("arc_easy", "ARC-Easy"),
    "arc_challenge": _arc("arc_challenge", "ARC-Challenge"),
    "openbookqa": Task(
        name="openbookqa",
        text=lambda d: d["question_stem"],
        choices=lambda d: list(d["choices"]["text"]),
        gold=lambda d: _label_index(d, d["answerKey"].lstrip()),
        metrics=("acc", "acc_norm"),
        split="test",
        dataset="allenai/openbookqa (main)",
    ),
    "piqa": Task(
        name="piqa",
        text=lambda d: f"Question: {d['goal']}\nAnswer:",
        choices=lambda d: [d["sol1"], d["sol2"]],
        gold=lambda d: int(d["label"]),
        metrics=("acc", "acc_norm"),
        split="validation",
        dataset="baber/piqa",
    ),
    "boolq": Task(
        name="boolq",
        text=lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
        choices=lambda d: ["no", "yes"],
        gold=lambda d: int(d["label"]),
        metrics=("acc",),
        split="validation",
        dataset="aps/super_glue (boolq)",
    ),
    "winogrande": Task(
        name="winogrande",
        text=None,
        choices=lambda d: [
            d["sentence"][: _winogrande_blank(d)] + opt for opt in (d["option1"], d["option2"])
        ],
        gold=lambda d: {"1": 0, "2": 1}[str(d["answer"])],
        metrics=("acc",),
        split="validation",
        dataset="allenai/winogrande (winogrande_xl)",
        continuation=lambda d: d["sentence"][_winogrande_blank(d) + 1 :].strip(),
    ),
    "hellaswag": Task(
        name="hellaswag",
        text=lambda d: hellaswag_preprocess(
            d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()
        ),
        choices=lambda d: [hellaswag_preprocess(e) for e in d["endings"]],
        gold=lambda d: int(d["label"]),
        metrics=("acc", "acc_norm"),
        split="validation",
        dataset="Rowan/hellaswag",
    ),
}
assert set(TASKS) == set(TASK_NAMES)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASK_NAMES)}")
    return TASKS[name]


def doc_to_requests(task: Task | str, doc: Doc) -> tuple[list[tuple[str, str]], int, list[str]]:
    """``(requests, gold, choices)`` of one document: ``(context, continuation)`` pairs, one per
    choice, the gold index and the choice strings (whose lengths ``acc_norm`` divides by)."""
    task = get_task(task) if isinstance(task, str) else task
    choices = task.choices(doc)
    if task.partial:
        cont = TARGET_DELIMITER + task.continuation(doc)
        requests = [(ctx, cont) for ctx in choices]
    else:
        ctx = task.text(doc)
        requests = [(ctx, TARGET_DELIMITER + c) for c in choices]
    gold = task.gold(doc)
    if not 0 <= gold < len(choices):
        raise ValueError(f"{task.name}: gold index {gold} outside {len(choices)} choices")
    return requests, gold, choices


# ============================================================================= metrics
def choice_metrics(
    lls: Sequence[float], gold: int, choices: Sequence[str]
) -> dict[str, float]:
    """``acc`` and ``acc_norm`` of one document from its per-choice log-likelihoods.

    ``acc_norm`` divides by ``len(choice)`` in characters (no delimiter); ties go to the first
    choice (``np.argmax``).
    """
    lls = np.asarray(lls, np.float64)
    lengths = np.array([float(len(c)) for c in choices])
    with np.errstate(divide="ignore", invalid="ignore"):
        pred_norm = int(np.argmax(lls / lengths))
    pred = int(np.argmax(lls))
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold), "pred": pred,
            "pred_norm": pred_norm}


def mean_stderr(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof 1) over ``sqrt(n)``; NaN below two values."""
    x = np.asarray(values, np.float64)
    if x.size < 2:
        return float("nan")
    return float(np.std(x, ddof=1) / math.sqrt(x.size))


# ============================================================================= tokenization
def prefix_token_id(tokenizer: Any) -> int | None:
    """The token that stands in for an empty context: BOS, else EOS (the harness' choice)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None else getattr(tokenizer, "eos_token_id", None)


def _bos_text(tokenizer: Any) -> str | None:
    """The text of the prefix token: a string starting with it gets no added special tokens."""
    pid = prefix_token_id(tokenizer)
    return None if pid is None else tokenizer.decode([pid])


def tok_encode(tokenizer: Any, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """Token ids of ``text``: the tokenizer's special-token policy unless told otherwise, and
    no added special tokens when the text already starts with the BOS string."""
    if add_special_tokens is None:
        bos = _bos_text(tokenizer)
        add_special_tokens = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _encode_many(tokenizer: Any, texts: Sequence[str]) -> dict[str, list[int]]:
    """``tok_encode`` of many strings (deduplicated, batched calls)."""
    unique = list(dict.fromkeys(texts))
    bos = _bos_text(tokenizer)
    out: dict[str, list[int]] = {}
    for special in (True, False):
        group = [t for t in unique if (not (bos and t.startswith(bos))) == special]
        if group:
            ids = tokenizer(group, add_special_tokens=special)["input_ids"]
            out.update({t: list(i) for t, i in zip(group, ids)})
    return out


def split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the front of the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context tokens, continuation tokens)`` of one request, as the harness encodes it."""
    return encode_requests(tokenizer, [(context, continuation)])[0]


def encode_requests(
    tokenizer: Any, requests: Sequence[tuple[str, str]]
) -> list[tuple[list[int], list[int]]]:
    """``encode_pair`` of every request, with the tokenizer called once per distinct string."""
    pairs, texts = [], []
    for context, continuation in requests:
        if context == "":
            pairs.append(None)
            continue
        ctx, cont = split_trailing_space(context, continuation)
        pairs.append((ctx, cont))
        texts += [ctx, ctx + cont]
    enc = _encode_many(tokenizer, texts)
    out = []
    for (context, continuation), pair in zip(requests, pairs):
        if pair is None:  # empty context: BOS (else EOS) stands in for it
            cont_enc = tok_encode(tokenizer, continuation, add_special_tokens=False)
            prefix = prefix_token_id(tokenizer)
            if prefix is None:
                raise ValueError("an empty context needs a BOS or EOS token; the tokenizer has neither")
            if cont_enc and cont_enc[0] == prefix:
                ctx_enc, cont_enc = cont_enc[:1], cont_enc[1:]
            else:
                ctx_enc = [prefix]
        else:
            ctx, cont = pair
            ctx_enc = enc[ctx]
            cont_enc = enc[ctx + cont][len(ctx_enc) :]
        if not ctx_enc or not cont_enc:
            raise ValueError(
                f"request ({context[-40:]!r}, {continuation[:40]!r}) has an empty "
                f"{'context' if not ctx_enc else 'continuation'} after tokenization"
            )
        out.append((ctx_enc, cont_enc))
    return out


# ============================================================================= scoring
@functools.partial(jax.jit, static_argnames=("config", "lora_cfg"))
def continuation_scores(
    base: dict[str, Any],
    lora: dict[str, Any] | None,
    masks: dict[str, Any] | None,
    tokens: jax.Array,
    starts: jax.Array,
    targets: jax.Array,
    target_mask: jax.Array,
    shared: jax.Array,
    config: LlamaConfig,
    lora_cfg: LoraConfig | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Log-likelihood of continuation targets for a right-padded batch.

    ``tokens`` ``(B, T)``: the model inputs; the prediction of ``targets[b, j]`` is read at input
    position ``starts[b] + j`` where ``target_mask[b, j]``. ``shared`` ``(B, S)``: other tokens
    scored at each row's *last* target position (one-token continuations sharing the row).
    Returns, per row, the summed float32 log-probability of the masked targets, whether each of
    them is the argmax (``is_greedy``), and for ``shared`` the log-probabilities and argmax flags.
    """
    hidden = forward(base, lora, masks, tokens, config, lora_cfg, return_hidden=True)
    t, c = tokens.shape[1], targets.shape[1]
    pos = jnp.clip(starts[:, None] + jnp.arange(c)[None, :], 0, t - 1)
    h = jnp.take_along_axis(hidden, pos[..., None], axis=1)  # (B, C, D)
    logp = jax.nn.log_softmax(logits_from_hidden(base, h).astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    ll = jnp.sum(jnp.where(target_mask, picked, 0.0), axis=1)
    argmax = jnp.argmax(logp, axis=-1)
    greedy = jnp.all(jnp.where(target_mask, argmax == targets, True), axis=1)
    last = jnp.maximum(jnp.sum(target_mask, axis=1) - 1, 0)
    last_logp = jnp.take_along_axis(logp, last[:, None, None], axis=1)[:, 0]  # (B, V)
    shared_ll = jnp.take_along_axis(last_logp, shared, axis=1)
    last_argmax = jnp.take_along_axis(argmax, last[:, None], axis=1)  # (B, 1)
    return ll, greedy, shared_ll, last_argmax == shared


@dataclasses.dataclass
class _Row:
    inp: list[int]
    targets: list[int]
    members: list[int]  # request indices; >1 only for shared one-token continuations
    shared: list[int]  # their target tokens (one-token rows)


def _rows(encoded: Sequence[tuple[list[int], list[int]]], max_length: int) -> list[_Row]:
    rows: list[_Row] = []
    by_input: dict[tuple[int, ...], _Row] = {}
    for i, (ctx, cont) in enumerate(encoded):
        if len(cont) > max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length {max_length}")
        seq = (ctx + cont)[-(max_length + 1) :]
        inp, targets = seq[:-1], cont
        if len(cont) == 1:
            key = tuple(inp)
            row = by_input.get(key)
            if row is not None and len(row.members) < MAX_SHARED:
                row.members.append(i)
                row.shared.append(cont[0])
                continue
            row = _Row(inp, targets, [i], [cont[0]])
            by_input[key] = row
        else:
            row = _Row(inp, targets, [i], [])
        rows.append(row)
    return rows


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def bucket_length(n: int, step: int = 16) -> int:
    """The padded length of an ``n``-token input: a multiple of ``step`` up to ``4 * step``,
    then the next of ``2^k`` or ``1.5 * 2^k`` (at most a third of a padded row is padding, and
    the number of buckets, hence of compilations, grows with the log of the length)."""
    if step < 1:
        raise ValueError(f"bucket step must be positive, got {step}")
    if n <= 4 * step:
        return max(step, -(-n // step) * step)
    p = _pow2(n)
    return 3 * p // 4 if 3 * p // 4 >= n else p


def score_tokens(
    base: dict[str, Any],
    config: LlamaConfig,
    encoded: Sequence[tuple[list[int], list[int]]],
    *,
    lora: dict[str, Any] | None = None,
    masks: dict[str, Any] | None = None,
    lora_cfg: LoraConfig | None = None,
    batch_size: int | None = None,
    bucket: int = 16,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> tuple[np.ndarray, np.ndarray]:
    """``(log-likelihoods, is_greedy)`` of tokenized ``(context, continuation)`` requests.

    Rows are bucketed by input length (:func:`bucket_length` with step ``bucket``); each bucket
    runs ``batch_size`` rows per call (default: about 4096 tokens per call), its last call padded
    with empty rows, so :func:`continuation_scores` compiles once per bucket (the width of its
    continuation window, a power of two, comes with the bucket). The order of ``encoded`` is
    kept.
    """
    n = len(encoded)
    ll = np.zeros(n, np.float64)
    greedy = np.zeros(n, bool)
    if n == 0:
        return ll, greedy
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    max_length = max_length or config.max_position_embeddings
    rows = _rows(encoded, max_length)
    buckets: dict[int, list[_Row]] = {}
    for row in rows:
        buckets.setdefault(bucket_length(len(row.inp), bucket), []).append(row)
    bar = tqdm(total=n, desc=desc, unit="req", disable=not progress, leave=False)

    def collect(chunk: list[_Row], out: Any) -> None:
        row_ll, row_greedy, shared_ll, shared_greedy = jax.device_get(out)
        done = 0
        for b, row in enumerate(chunk):
            if row.shared:  # one-token continuations: read each member's own token
                for j, i in enumerate(row.members):
                    ll[i], greedy[i] = shared_ll[b, j], shared_greedy[b, j]
            else:
                (i,) = row.members
                ll[i], greedy[i] = row_ll[b], row_greedy[b]
            done += len(row.members)
        bar.update(done)

    pending = None  # results are fetched one call behind, so the host prepares the next batch
    for t in sorted(buckets, reverse=True):  # longest first: memory trouble shows at once
        group = sorted(buckets[t], key=lambda r: -len(r.inp))
        c = min(t, max(8, _pow2(max(len(r.targets) for r in group))))  # continuation window
        bs = batch_size or max(1, min(64, TOKENS_PER_BATCH // t))
        for lo in range(0, len(group), bs):
            chunk = group[lo : lo + bs]
            tokens = np.zeros((bs, t), np.int32)
            starts = np.zeros((bs,), np.int32)
            targets = np.zeros((bs, c), np.int32)
            tmask = np.zeros((bs, c), bool)
            shared = np.zeros((bs, MAX_SHARED), np.int32)
            for b, row in enumerate(chunk):
                k = len(row.targets)
                tokens[b, : len(row.inp)] = row.inp
                starts[b] = len(row.inp) - k
                targets[b, :k] = row.targets
                tmask[b, :k] = True
                shared[b, : len(row.shared)] = row.shared
            out = continuation_scores(
                base, lora, masks, jnp.asarray(tokens), jnp.asarray(starts), jnp.asarray(targets),
                jnp.asarray(tmask), jnp.asarray(shared), config, lora_cfg,
            )
            if pending is not None:
                collect(*pending)
            pending = (chunk, out)
    if pending is not None:
        collect(*pending)
    bar.close()
    return ll, greedy


def loglikelihoods(
    base: dict[str, Any],
    config: LlamaConfig,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    **kwargs: Any,
) -> list[tuple[float, bool]]:
    """``(log-likelihood, is_greedy)`` of each ``(context, continuation)`` request (the harness'
    ``loglikelihood``); ``kwargs`` as for :func:`score_tokens`."""
    ll, greedy = score_tokens(base, config, encode_requests(tokenizer, requests), **kwargs)
    return [(float(a), bool(b)) for a, b in zip(ll, greedy)]


# ============================================================================= evaluation
@dataclasses.dataclass
class TaskResult:
    """Accuracy of one task (``acc_norm`` is None where the harness does not report it)."""

    task: str
    docs: int
    acc: float
    acc_stderr: float
    acc_norm: float | None
    acc_norm_stderr: float | None
    requests: int
    tokens: int  # input tokens scored (shared rows counted once per request)
    seconds: float
    samples: list[dict[str, Any]] | None = None

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not samples:
            out.pop("samples")
        if self.acc_norm is None:
            out.pop("acc_norm")
            out.pop("acc_norm_stderr")
        return out


def evaluate_task(
    base: dict[str, Any],
    config: LlamaConfig,
    tokenizer: Any,
    task: Task | str,
    docs: Sequence[Doc],
    *,
    keep_samples: bool = False,
    **kwargs: Any,
) -> TaskResult:
    """Score every document of ``task`` and aggregate; ``kwargs`` as for :func:`score_tokens`
    (``lora``, ``masks``, ``lora_cfg``, ``batch_size``, ``progress``, ...)."""
    task = get_task(task) if isinstance(task, str) else task
    if not docs:
        raise ValueError(f"{task.name}: no documents")
    start = time.perf_counter()
    built = [doc_to_requests(task, d) for d in docs]
    requests = [r for reqs, _, _ in built for r in reqs]
    encoded = encode_requests(tokenizer, requests)
    kwargs.setdefault("desc", task.name)
    ll, greedy = score_tokens(base, config, encoded, **kwargs)
    accs, norms, samples = [], [], []
    lo = 0
    for doc, (reqs, gold, choices) in zip(docs, built):
        lls = ll[lo : lo + len(reqs)]
        m = choice_metrics(lls, gold, choices)
        accs.append(m["acc"])
        norms.append(m["acc_norm"])
        if keep_samples:
            samples.append({
                "gold": gold, "lls": [float(x) for x in lls],
                "is_greedy": [bool(x) for x in greedy[lo : lo + len(reqs)]],
                "pred": m["pred"], "pred_norm": m["pred_norm"],
            })
        lo += len(reqs)
    has_norm = "acc_norm" in task.metrics
    return TaskResult(
        task=task.name,
        docs=len(docs),
        acc=float(np.mean(accs)),
        acc_stderr=mean_stderr(accs),
        acc_norm=float(np.mean(norms)) if has_norm else None,
        acc_norm_stderr=mean_stderr(norms) if has_norm else None,
        requests=len(requests),
        tokens=int(sum(len(c) + len(x) for c, x in encoded)),
        seconds=time.perf_counter() - start,
        samples=samples if keep_samples else None,
    )


def prepare_base(base: dict[str, Any], config: LlamaConfig) -> dict[str, Any]:
    """Stack the layers of a uniform model (``lax.scan``: faster to compile); a pruned model
    with per-layer widths stays a list."""
    if config.is_uniform and isinstance(base["layers"], list):
        return stack_layers(base)
    return base


def run_zeroshot(
    base: dict[str, Any],
    config: LlamaConfig,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    data_dir: str | Path | None = None,
    source: str = "files",
    limit: int | None = None,
    batch_size: int | None = None,
    bucket: int = 16,
    lora: dict[str, Any] | None = None,
    masks: dict[str, Any] | None = None,
    lora_cfg: LoraConfig | None = None,
    progress: bool = True,
    keep_samples: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, TaskResult]:
    """Evaluate ``tasks`` (names of :data:`TASKS`) on their documents (the first ``limit`` of
    each) from ``data_dir`` (release files, or tfds with ``source="tfds"``)."""
    for name in tasks:
        get_task(name)
    docs = {
        name: load_task_docs(name, data_dir, source=source, limit=limit) for name in tasks
    }  # all data first: a missing file fails before any compute
    base = prepare_base(base, config)
    results: dict[str, TaskResult] = {}
    for name in tasks:
        res = evaluate_task(
            base, config, tokenizer, name, docs[name], lora=lora, masks=masks, lora_cfg=lora_cfg,
            batch_size=batch_size, bucket=bucket, progress=progress, keep_samples=keep_samples,
        )
        results[name] = res
        if log is not None:
            log(format_result(res))
    return results


def format_result(res: TaskResult) -> str:
    line = f"{res.task:<14} n={res.docs:<5d} acc={res.acc:.4f} ± {res.acc_stderr:.4f}"
    if res.acc_norm is not None:
        line += f"  acc_norm={res.acc_norm:.4f} ± {res.acc_norm_stderr:.4f}"
    return line + f"  ({res.seconds:.1f}s)"


# ============================================================================= command line
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``loraprune-jax zeroshot`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "zeroshot", help="zero-shot multiple-choice accuracy (lm-evaluation-harness semantics)"
    )
    p.add_argument("--model", required=True, help="'smollm2', a HF LLaMA directory, or a .gguf file")
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                   choices=list(TASK_NAMES) + ["all"], help=f"{', '.join(TASK_NAMES)} or all")
    p.add_argument("--data-dir", default=None,
                   help="release files (e.g. DIR/arc/ARC-Easy/ARC-Easy-Test.jsonl, DIR/boolq/dev.jsonl; "
                        "default $LORAPRUNE_JAX_EVAL_DATA), or tfds' data dir with --source tfds")
    p.add_argument("--source", choices=["files", "tfds"], default="files",
                   help="release files under --data-dir, or prepared tfds datasets (array_record)")
    p.add_argument("--limit", type=int, default=None, help="the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per compiled call (default: about 4096 tokens per call)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="parameter dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    p.add_argument("--samples", action="store_true",
                   help="with --json, also write per-document log-likelihoods")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_zeroshot)
    return p


def cmd_zeroshot(args: argparse.Namespace) -> int:
    """Zero-shot accuracy of a model on the chosen tasks; one line per task, optional JSON."""
    from ..io import load_model
    from ..config import default_dtype
    from ..io.jsonfile import write_json

    tasks = list(TASK_NAMES) if "all" in args.tasks else list(dict.fromkeys(args.tasks))
    limit = getattr(args, "limit", None)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be positive, got {limit}")
    source = getattr(args, "source", "files")
    for name in tasks:  # data problems are reported before the model is loaded
        load_task_docs(name, args.data_dir, source=source, limit=1)
    start = time.perf_counter()
    config, base, tokenizer = load_model(args.model, dtype=args.dtype or default_dtype())
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files; cannot tokenize prompts")
    print(f"model {args.model}: {config.num_params() / 1e6:.1f}M parameters, {config.dtype}, "
          f"loaded in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    results = run_zeroshot(
        base, config, tokenizer, tasks, data_dir=args.data_dir, source=source, limit=limit,
        batch_size=args.batch_size, progress=not args.no_progress,
        keep_samples=bool(getattr(args, "samples", False)), log=print,
    )
    mean_acc = float(np.mean([r.acc for r in results.values()]))
    total = time.perf_counter() - start
    print(f"{'mean acc':<14} {mean_acc:.4f} over {len(results)} tasks  ({total:.1f}s in all)")
    if args.json:
        payload = {
            "model": str(args.model),
            "dtype": config.dtype,
            "limit": limit,
            "source": source,
            "data_dir": None if args.data_dir is None else str(args.data_dir),
            "results": {k: r.to_dict(samples=bool(getattr(args, "samples", False)))
                        for k, r in results.items()},
            "mean_acc": mean_acc,
            "seconds": total,
        }
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, payload)
    return 0


__all__ = [
    "TASKS",
    "TARGET_DELIMITER",
    "Task",
    "TaskResult",
    "add_parser",
    "bucket_length",
    "choice_metrics",
    "cmd_zeroshot",
    "continuation_scores",
    "doc_to_requests",
    "encode_pair",
    "encode_requests",
    "evaluate_task",
    "get_task",
    "hellaswag_preprocess",
    "loglikelihoods",
    "mean_stderr",
    "prepare_base",
    "run_zeroshot",
    "score_tokens",
    "split_trailing_space",
    "tok_encode",
]
