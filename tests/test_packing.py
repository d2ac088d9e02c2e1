"""Tokenize/pack/shuffle/shard/batch: shapes, values, determinism, sharding and resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from loraprune_jax.data.packing import (
    PackedDataset,
    encode_fn,
    pack_documents,
    tokenize_join,
    windows,
)


def byte_tok(s: str) -> list[int]:
    return list(s.encode())


class EncodeTok:
    """Mimics a transformers tokenizer: .encode(text, add_special_tokens=...)."""

    bos = 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [ord(c) for c in text]
        return [self.bos, *ids] if add_special_tokens else ids


def test_encode_fn_variants():
    assert encode_fn(byte_tok)("ab") == [97, 98]
    assert encode_fn(EncodeTok())("ab") == [97, 98]  # no special tokens by default
    assert encode_fn(EncodeTok(), add_special_tokens=True)("ab") == [1, 97, 98]
    with pytest.raises(TypeError):
        encode_fn(42)


def test_tokenize_join_joins_once():
    ids = tokenize_join(["ab", "c"], byte_tok)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [97, 98, 10, 10, 99])
    np.testing.assert_array_equal(tokenize_join("ab", byte_tok), [97, 98])
    np.testing.assert_array_equal(tokenize_join(["x", "y"], EncodeTok(), sep="|"), [120, 124, 121])


def test_tokenize_join_calls_tokenizer_once():
    calls = []

    def tok(s):
        calls.append(s)
        return byte_tok(s)

    tokenize_join(["doc one", "doc two", "doc three"], tok)
    assert calls == ["doc one\n\ndoc two\n\ndoc three"]


def test_windows_shapes_values_and_errors():
    w = windows(np.arange(10), 3)
    assert w.shape == (3, 3) and w.dtype == np.int32
    np.testing.assert_array_equal(w, [[0, 1, 2], [3, 4, 5], [6, 7, 8]])  # remainder 9 dropped
    assert windows(list(range(10)), 3, max_windows=2).shape == (2, 3)
    assert windows(list(range(10)), 5).shape == (2, 5)
    with pytest.raises(ValueError, match="at least seq_len=11"):
        windows(np.arange(10), 11)
    with pytest.raises(ValueError):
        windows(np.arange(10), 0)
    text = "hello world, " * 20
    w = windows(tokenize_join([text], byte_tok), 16)
    assert w.shape == (len(text.encode()) // 16, 16)
    assert bytes(w[0].astype(np.uint8)).decode() == text[:16]


def test_pack_documents_with_and_without_eos():
    docs = ["abc", "de", "fghij"]
    np.testing.assert_array_equal(
        pack_documents(docs, byte_tok, 4),
        [[97, 98, 99, 100], [101, 102, 103, 104]],  # 10 tokens -> 2 rows, "ij" dropped
    )
    packed = pack_documents(docs, byte_tok, 4, eos_id=0)
    # abc<eos>de<eos>fghij<eos> = 13 tokens -> 3 rows of 4
    np.testing.assert_array_equal(
        packed, [[97, 98, 99, 0], [100, 101, 0, 102], [103, 104, 105, 106]]
    )
    assert packed.dtype == np.int32
    with pytest.raises(ValueError):
        pack_documents(["a"], byte_tok, 4)


def _dataset(n=23, seq_len=3):
    # row i holds [i, i, i] so rows can be identified in batches
    return PackedDataset(np.repeat(np.arange(n)[:, None], seq_len, axis=1))


def _rows(batch):
    t = batch["tokens"]
    assert t.dtype == np.int32 and (t == t[:, :1]).all()
    return t[:, 0].tolist()


def test_shuffle_is_deterministic_permutation():
    ds = _dataset()
    p = ds.permutation(seed=0, epoch=0)
    assert sorted(p.tolist()) == list(range(len(ds)))
    np.testing.assert_array_equal(p, ds.permutation(0, 0))
    assert not np.array_equal(p, ds.permutation(0, 1))
    assert not np.array_equal(p, ds.permutation(1, 0))
    rows = [r for b in ds.batches(4, seed=0, process_index=0, process_count=1) for r in _rows(b)]
    assert rows == p[: 5 * 4].tolist()  # 23 // 4 = 5 steps; last partial batch dropped
    assert len(set(rows)) == len(rows)
    again = [r for b in ds.batches(4, seed=0, process_index=0, process_count=1) for r in _rows(b)]
    assert again == rows
    epoch1 = ds.batches(4, seed=0, epoch=1, process_index=0, process_count=1)
    other = [r for b in epoch1 for r in _rows(b)]
    assert other != rows


def test_steps_per_epoch_and_shapes():
    ds = _dataset()
    assert ds.steps_per_epoch(4, process_count=1) == 5
    assert ds.steps_per_epoch(4, process_count=2) == 2
    assert ds.steps_per_epoch(2) == 11  # process_count from jax (1 here)
    batches = list(ds.batches(4, seed=3, process_index=0, process_count=2))
    assert len(batches) == 2 and all(b["tokens"].shape == (4, 3) for b in batches)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        list(ds.batches(12, seed=0, process_index=0, process_count=2))
    with pytest.raises(ValueError):
        list(ds.batches(4, seed=0, process_index=2, process_count=2))


@pytest.mark.parametrize("count", [2, 3])
def test_process_shards_are_disjoint_and_cover_global_batch(count):
    ds, bs = _dataset(n=40), 2
    single = list(ds.batches(bs * count, seed=7, epoch=2, process_index=0, process_count=1))
    shards = [
        list(ds.batches(bs, seed=7, epoch=2, process_index=p, process_count=count))
        for p in range(count)
    ]
    assert all(len(s) == len(single) for s in shards)
    for step, glob in enumerate(single):
        parts = [_rows(shards[p][step]) for p in range(count)]
        flat = [r for part in parts for r in part]
        assert len(set(flat)) == len(flat)  # disjoint
        assert flat == _rows(glob)  # concatenated in process order == the global batch
        np.testing.assert_array_equal(
            np.concatenate([shards[p][step]["tokens"] for p in range(count)]), glob["tokens"]
        )


def test_start_step_resume_equals_skipping():
    ds = _dataset()
    full = list(ds.batches(3, seed=5, epoch=1, process_index=0, process_count=1))
    resumed = list(ds.batches(3, seed=5, epoch=1, process_index=0, process_count=1, start_step=4))
    assert len(resumed) == len(full) - 4
    for a, b in zip(full[4:], resumed):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert list(ds.batches(3, seed=5, process_index=0, process_count=1, start_step=99)) == []


def test_iterate_over_epochs_and_resume():
    ds = _dataset()
    spe = ds.steps_per_epoch(4, 1)  # 5
    it = list(itertools.islice(ds.iterate(4, seed=1, process_index=0, process_count=1), 3 * spe))
    assert [s for s, _ in it] == list(range(3 * spe))
    for epoch in range(3):
        expect = list(ds.batches(4, seed=1, epoch=epoch, process_index=0, process_count=1))
        for k in range(spe):
            np.testing.assert_array_equal(it[epoch * spe + k][1]["tokens"], expect[k]["tokens"])
    # reshuffled per epoch
    assert _rows(it[0][1]) != _rows(it[spe][1])
    from7 = ds.iterate(4, seed=1, start_step=7, process_index=0, process_count=1)
    resumed = list(itertools.islice(from7, 6))
    assert [s for s, _ in resumed] == list(range(7, 13))
    for (s, b), (s2, b2) in zip(it[7:13], resumed):
        assert s == s2
        np.testing.assert_array_equal(b["tokens"], b2["tokens"])


def test_from_texts():
    ds = PackedDataset.from_texts(["abcd", "efgh"], byte_tok, seq_len=3, eos_id=0)
    assert len(ds) == 3 and ds.seq_len == 3  # 10 tokens -> 3 rows
    with pytest.raises(ValueError):
        PackedDataset(np.zeros((3,), np.int32))


def test_encode_fn_with_a_tokenizers_tokenizer():
    import tokenizers
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    assert encode_fn(tok)("hello world again") == [1, 2, 0]  # Encoding -> .ids
    np.testing.assert_array_equal(tokenize_join(["hello", "world"], tok), [1, 2])
