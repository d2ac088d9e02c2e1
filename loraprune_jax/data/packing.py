"""Tokenize, pack, shuffle, shard and batch: pure, deterministic numpy.

Two ways to turn text into fixed-length rows:

* :func:`tokenize_join` + :func:`windows` -- the LLM-Pruner / LoRAPrune perplexity protocol: join
  documents with ``"\\n\\n"``, tokenize once, cut non-overlapping windows, drop the remainder
  (:func:`spread_windows`: at most N of them, evenly spaced).
* :func:`pack_documents` -- training packing: tokenize each document, end each with EOS (if
  given), concatenate, cut full rows.

:class:`PackedDataset` then serves shuffled, process-sharded batches whose order depends only on
``(seed, epoch)``, so training can resume at any step and any number of processes together see
exactly the batches one process with the global batch would see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

# Callable[[str], Sequence[int]], or an object with .encode(text, add_special_tokens=...)
Tokenizer = Any


def encode_fn(tokenizer: Tokenizer, add_special_tokens: bool = False) -> Callable[[str], list[int]]:
    """A ``str -> list[int]`` callable from a tokenizer.

    Accepts an object with ``.encode(text, add_special_tokens=...)`` (a transformers tokenizer, or a
    ``tokenizers.Tokenizer`` whose result has ``.ids``) or a plain callable ``str -> ids``. Special
    tokens (BOS/EOS) are not added unless ``add_special_tokens`` -- callers add them explicitly.
    """
    encode = getattr(tokenizer, "encode", None)
    if encode is not None and callable(encode):
        # transformers tokenizers warn about texts longer than the model; whole corpora are
        # tokenized on purpose here and cut into windows afterwards.
        extra = {"verbose": False} if hasattr(tokenizer, "model_max_length") else {}

        def fn(text: str) -> list[int]:
            out = encode(text, add_special_tokens=add_special_tokens, **extra)
            ids = getattr(out, "ids", out)  # tokenizers.Encoding -> .ids
            return list(ids)

        return fn
    if callable(tokenizer):
        if add_special_tokens:
            raise ValueError("add_special_tokens needs a tokenizer with .encode(), not a callable")
        return lambda text: list(tokenizer(text))
    raise TypeError(f"not a tokenizer: {type(tokenizer).__name__} (need .encode() or a callable)")


def _as_ids(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros((0,), np.int32)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be 1-D integers, got shape {arr.shape} {arr.dtype}")
    return arr.astype(np.int32, copy=False)


def tokenize_join(
    texts: str | Iterable[str],
    tokenizer: Tokenizer,
    sep: str = "\n\n",
    add_special_tokens: bool = False,
) -> np.ndarray:
    """Join documents with ``sep`` and tokenize the whole string once (perplexity protocol).

    Tokenizing once (not per document) is what the LLM-Pruner protocol does, so token boundaries at
    document joins match the published numbers. Returns int32 ids.
    """
    text = texts if isinstance(texts, str) else sep.join(texts)
    return _as_ids(encode_fn(tokenizer, add_special_tokens)(text))


def windows(
    ids: Sequence[int] | np.ndarray, seq_len: int, max_windows: int | None = None
) -> np.ndarray:
    """Non-overlapping ``(n, seq_len)`` windows of ``ids``; the remainder is dropped.

    ``max_windows`` keeps only the first windows (quick evaluations).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    arr = _as_ids(ids)
    n = arr.shape[0] // seq_len
    if n == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens for a window, got {arr.shape[0]}")
    if max_windows is not None:
        if max_windows <= 0:
            raise ValueError(f"max_windows must be positive, got {max_windows}")
        n = min(n, max_windows)
    return arr[: n * seq_len].reshape(n, seq_len)


def spread_windows(ids: Sequence[int] | np.ndarray, seq_len: int,
                   max_windows: int | None) -> np.ndarray:
    """Non-overlapping windows; when capped, ``max_windows`` of them evenly spaced over the text
    (the first ones alone can all fall in one untypical document, such as a list article)."""
    all_windows = windows(ids, seq_len)
    n = all_windows.shape[0]
    if max_windows is None or max_windows >= n:
        return all_windows
    return all_windows[np.linspace(0, n - 1, max_windows).round().astype(int)]


def pack_documents(
    texts: Iterable[str],
    tokenizer: Tokenizer,
    seq_len: int,
    eos_id: int | None = None,
) -> np.ndarray:
    """Training packing: tokenize each document, append ``eos_id`` after each (if given),
    concatenate and cut into full ``(n, seq_len)`` int32 rows (the incomplete tail is dropped).

    With EOS after every document, consecutive documents are always separated by it.
    """
    encode = encode_fn(tokenizer)
    pieces = []
    for text in texts:
        pieces.append(_as_ids(encode(text)))
        if eos_id is not None:
            pieces.append(np.asarray([eos_id], np.int32))
    ids = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
    return windows(ids, seq_len)


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index} for process_count={process_count}")
    return process_index, process_count


class PackedDataset:
    """Fixed-length token rows ``(n, seq_len)`` served as shuffled, process-sharded batches.

    Every epoch is a permutation of the rows drawn from ``(seed, epoch)``. Global step ``s`` of an
    epoch uses permuted rows ``[s*G, (s+1)*G)`` with ``G = batch_size * process_count``; process
    ``p`` takes rows ``[p*batch_size, (p+1)*batch_size)`` of that global batch. The last incomplete
    global batch of an epoch is dropped.
    """

    def __init__(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be 2-D integers, got {tokens.shape} {tokens.dtype}")
        self.tokens = tokens.astype(np.int32, copy=False)

    @classmethod
    def from_texts(
        cls, texts: Iterable[str], tokenizer: Tokenizer, seq_len: int, eos_id: int | None = None
    ) -> PackedDataset:
        """Pack documents with :func:`pack_documents`."""
        return cls(pack_documents(texts, tokenizer, seq_len, eos_id=eos_id))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def permutation(self, seed: int, epoch: int = 0) -> np.ndarray:
        """Row order of ``epoch``: a numpy Generator permutation seeded by ``(seed, epoch)``."""
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be non-negative, got seed={seed} epoch={epoch}")
        return np.random.default_rng([seed, epoch]).permutation(len(self))

    def steps_per_epoch(self, batch_size: int, process_count: int | None = None) -> int:
        """Full global batches per epoch (``batch_size`` rows per process)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if process_count is None:
            _, process_count = _process_info(None, None)
        return len(self) // (batch_size * process_count)

    def batches(
        self,
        batch_size: int,
        seed: int,
        epoch: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        start_step: int = 0,
    ) -> Iterator[dict[str, np.ndarray]]:
        """This process's ``{"tokens": int32 (batch_size, seq_len)}`` batches of one epoch.

        ``start_step`` resumes mid-epoch without materialising the skipped batches. Process index
        and count default to ``jax.process_index()`` / ``jax.process_count()``.
        """
        p, count = _process_info(process_index, process_count)
        steps = self.steps_per_epoch(batch_size, count)
        if steps == 0:
            raise ValueError(
                f"{len(self)} rows are fewer than one global batch "
                f"of {batch_size} x {count} processes"
            )
        if start_step < 0:
            raise ValueError(f"start_step must be non-negative, got {start_step}")
        perm = self.permutation(seed, epoch)
        global_bs = batch_size * count
        for step in range(start_step, steps):
            lo = step * global_bs + p * batch_size
            yield {"tokens": self.tokens[perm[lo : lo + batch_size]]}

    def iterate(
        self,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Endless ``(global step, batch)`` pairs over reshuffled epochs, from ``start_step``.

        ``epoch = step // steps_per_epoch``; resuming at ``start_step`` gives the same batches as
        running from 0 and skipping. Bound it with ``itertools.islice`` or a step check.
        """
        p, count = _process_info(process_index, process_count)
        steps = self.steps_per_epoch(batch_size, count)
        if steps == 0:
            raise ValueError(
                f"{len(self)} rows are fewer than one global batch "
                f"of {batch_size} x {count} processes"
            )
        if start_step < 0:
            raise ValueError(f"start_step must be non-negative, got {start_step}")
        epoch, within = divmod(start_step, steps)
        step = start_step
        while True:
            for batch in self.batches(batch_size, seed, epoch, p, count, start_step=within):
                yield step, batch
                step += 1
            epoch, within = epoch + 1, 0
