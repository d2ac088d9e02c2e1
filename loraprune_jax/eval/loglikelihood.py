"""Log-likelihoods of continuations given contexts, tokenized and batched as
lm-evaluation-harness (0.4.13) does with a Hugging Face causal LM.

A request ``(context, continuation)`` is scored by the *summed* log-likelihood of its
continuation tokens given the context (float32 log-softmax), with whether greedy decoding would
have produced them.

Tokenization follows the harness' Hugging Face causal-LM backend: trailing spaces of a context
move to the front of the continuation; ``context + continuation`` is encoded whole and the
continuation tokens are the tail after ``len(encode(context))`` tokens; the tokenizer's own
special-token policy applies (BOS only when the tokenizer adds one; none when the text already
starts with the BOS string); an empty context is replaced by the BOS (else EOS) token; sequences
longer than ``max_length + 1`` tokens are truncated from the left.

Scoring is batched: requests are turned into rows (input tokens, continuation targets), rows
sorted by length are cut into calls padded to the bucket (:func:`bucket_length`) of their
longest row, with a fixed number of rows per bucket, so the jitted :func:`continuation_scores`
compiles once per bucket that starts a call and no call carries empty rows but the last. Rows are
right-padded, which a causal model cannot see. Requests whose continuation is a single token and
whose inputs are identical (BoolQ's " no" / " yes") share one row, as the harness' logits cache
does. Only the hidden states at the continuation targets, packed, go through the LM head.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from ..config import LlamaConfig, LoraConfig
from ..models.llama import forward, logits_from_hidden
from ..parallel.mesh import activation_sharding, batch_multiple, batch_sharding, global_array, host_tree

MAX_SHARED = 8  # requests that can share one row (one-token continuations of the same input)
TOKENS_PER_BATCH = 4096  # rows per call when no batch size is given: about this many tokens


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


def _scores(
    base: dict[str, Any],
    lora: dict[str, Any] | None,
    masks: dict[str, Any] | None,
    tokens: jax.Array,
    pos: jax.Array,
    targets: jax.Array,
    last: jax.Array,
    shared: jax.Array,
    config: LlamaConfig,
    lora_cfg: LoraConfig | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Log-probabilities of the continuation targets of a right-padded batch.

    ``tokens`` ``(B, T)``: the model inputs. ``pos`` ``(K,)``: flat positions (``b * T + i``)
    whose prediction is scored against ``targets`` ``(K,)``: every target of every row, packed
    (``K`` a multiple of ``B``; padding entries are ignored by the caller), so only they go
    through the LM head. ``last``
    ``(B,)``: the entry of each row's last target; ``shared`` ``(B, S)``: other tokens scored
    there (one-token continuations sharing the row). Returns the float32 log-probability of each
    target and whether it is the argmax (``is_greedy``), and for ``shared`` the same.
    """
    hidden = forward(base, lora, masks, tokens, config, lora_cfg, return_hidden=True)
    b, t, d = hidden.shape
    k = pos.shape[0]
    h = jnp.take(hidden.reshape(b * t, d), pos, axis=0)
    logits = logits_from_hidden(base, h.reshape(b, k // b, d)).reshape(k, -1)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    argmax = jnp.argmax(logp, axis=-1)
    shared_ll = jnp.take_along_axis(jnp.take(logp, last, axis=0), shared, axis=1)
    return picked, argmax == targets, shared_ll, jnp.take(argmax, last)[:, None] == shared


continuation_scores = jax.jit(_scores, static_argnames=("config", "lora_cfg"))


@functools.partial(jax.jit, static_argnames=("config", "lora_cfg", "mesh"))
def _scores_on_mesh(base, lora, masks, tokens, pos, targets, last, shared, config, lora_cfg, mesh):
    """:func:`continuation_scores` traced with activations pinned to ``mesh`` (its own jit, so
    a trace without the mesh is never reused for one with it)."""
    with activation_sharding(mesh):
        return _scores(base, lora, masks, tokens, pos, targets, last, shared, config, lora_cfg)


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


def _plan(rows: list[_Row], bucket: int, batch_size: int | None, per: int
          ) -> list[tuple[int, int, int, list[_Row]]]:
    """Calls ``(rows B, length T, head slots K, rows)``, longest rows first.

    Rows sorted by length are cut into consecutive calls: a call's length is the bucket of its
    longest row, its row count fixed by that length, and it is filled with the next rows (the
    last rows of a bucket share a call with the longest of the next instead of empty rows), so
    there is one compilation per bucket that starts a call. ``K`` (the packed targets' slots, a
    multiple of ``B``) is the same for every call of a shape: the bucket of its largest need.
    """
    order = sorted(rows, key=lambda r: -len(r.inp))
    calls: list[tuple[int, int, list[_Row]]] = []
    need: dict[tuple[int, int], int] = {}
    lo = 0
    while lo < len(order):
        t = bucket_length(len(order[lo].inp), bucket)
        bs = batch_size or max(1, min(64, TOKENS_PER_BATCH // t))
        bs = -(-bs // per) * per
        chunk = order[lo : lo + bs]
        lo += bs
        slots = -(-sum(len(r.targets) for r in chunk) // bs)  # targets per row, rounded up
        need[bs, t] = max(need.get((bs, t), 1), slots)
        calls.append((bs, t, chunk))
    return [(bs, t, bs * min(t, bucket_length(need[bs, t], 4)), chunk) for bs, t, chunk in calls]


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
    mesh: Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(log-likelihoods, is_greedy)`` of tokenized ``(context, continuation)`` requests.

    Rows sorted by input length run ``batch_size`` rows per call (default: about 4096 tokens),
    each call padded to the bucket (:func:`bucket_length` with step ``bucket``) of its longest
    row (:func:`_plan`), so :func:`continuation_scores` compiles once per bucket that starts a
    call; only the continuation targets, packed, go through the LM head, and each request's
    log-likelihood is summed in float64 on the host. The order of ``encoded`` is kept. With a
    ``mesh`` (``base`` placed on it, e.g. by ``models.llama_params.shard_base``; LoRA and masks
    replicated) the rows of a call are split over its ``data`` x ``fsdp`` axes, the rows per
    call rounded up to a multiple of their size; the scores equal one device's.
    """
    n = len(encoded)
    ll = np.zeros(n, np.float64)
    greedy = np.zeros(n, bool)
    if n == 0:
        return ll, greedy
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    max_length = max_length or config.max_position_embeddings
    per = 1 if mesh is None else batch_multiple(mesh)
    plan = _plan(_rows(encoded, max_length), bucket, batch_size, per)
    bar = tqdm(total=n, desc=desc, unit="req", disable=not progress, leave=False)

    def collect(chunk: list[_Row], out: Any) -> None:
        picked, hit, shared_ll, shared_greedy = host_tree(out)
        done = off = 0
        for b, row in enumerate(chunk):
            k = len(row.targets)
            if row.shared:  # one-token continuations: read each member's own token
                for j, i in enumerate(row.members):
                    ll[i], greedy[i] = shared_ll[b, j], shared_greedy[b, j]
            else:
                (i,) = row.members
                ll[i] = np.sum(picked[off : off + k], dtype=np.float64)
                greedy[i] = bool(np.all(hit[off : off + k]))
            off += k
            done += len(row.members)
        bar.update(done)

    def call(*arrays: np.ndarray) -> Any:
        if mesh is None:
            return continuation_scores(base, lora, masks, *map(jnp.asarray, arrays), config,
                                       lora_cfg)
        placed = [global_array(a, batch_sharding(mesh, a.ndim, 0)) for a in arrays]
        return _scores_on_mesh(base, lora, masks, *placed, config, lora_cfg, mesh)

    pending = None  # results are fetched one call behind, so the host prepares the next batch
    for bs, t, slots, chunk in plan:
        tokens = np.zeros((bs, t), np.int32)
        pos = np.zeros((slots,), np.int32)
        targets = np.zeros((slots,), np.int32)
        last = np.zeros((bs,), np.int32)
        shared = np.zeros((bs, MAX_SHARED), np.int32)
        off = 0
        for b, row in enumerate(chunk):
            k, m = len(row.targets), len(row.inp)
            tokens[b, :m] = row.inp
            pos[off : off + k] = b * t + np.arange(m - k, m)
            targets[off : off + k] = row.targets
            last[b] = off + k - 1
            shared[b, : len(row.shared)] = row.shared
            off += k
        out = call(tokens, pos, targets, last, shared)
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


__all__ = [
    "bucket_length",
    "continuation_scores",
    "encode_pair",
    "encode_requests",
    "loglikelihoods",
    "prefix_token_id",
    "score_tokens",
    "split_trailing_space",
    "tok_encode",
]
