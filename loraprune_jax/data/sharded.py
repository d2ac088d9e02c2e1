"""Training batches of a (multi-process) run: each process reads, packs and shuffles only the
documents of its data shards, and the global batch of a step is the same for any process count."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from ..config import RunConfig
from ..parallel.mesh import global_array
from .corpora import load_texts
from .packing import PackedDataset


class ShardedData:
    """Training batches of a (multi-process) run, each process reading only its data shards.

    The texts are split into ``data_shards`` shards of documents (default: one per process).
    Rows ``[s*b, (s+1)*b)`` of every micro-batch (``b = micro_batch_size / data_shards``) come
    from shard ``s``'s own packed, shuffled dataset; a process loads the shards whose rows its
    devices hold. The global batch of a step is thus fixed by ``(data_shards, seed, step)`` and
    the same for any number of processes.
    """

    def __init__(self, cfg: RunConfig, tokenizer: Any, eos_id: int | None,
                 sharding: Any) -> None:
        t = cfg.train
        self.num_shards = cfg.data_shards or jax.process_count()
        if t.micro_batch_size % self.num_shards:
            raise ValueError(
                f"train.micro_batch_size={t.micro_batch_size} is not a multiple of the "
                f"{self.num_shards} data shards; raise it or set data_shards"
            )
        self.shape = (t.grad_accum, t.micro_batch_size, t.seq_len)
        self.block = t.micro_batch_size // self.num_shards
        self.sharding = sharding
        rows: set[int] = set()
        for idx in sharding.addressable_devices_indices_map(self.shape).values():
            rows.update(range(*idx[1].indices(t.micro_batch_size)))
        self.local_shards = sorted({r // self.block for r in rows})
        self.datasets = {}
        for s in self.local_shards:
            shard = None if self.num_shards == 1 else (s, self.num_shards)
            texts = load_texts(cfg.data, shard=shard)
            which = "" if shard is None else f" (shard {s} of {self.num_shards})"
            try:
                ds = PackedDataset.from_texts(texts, tokenizer, t.seq_len, eos_id=eos_id)
            except ValueError as e:  # too few tokens for one sequence
                raise ValueError(f"data={cfg.data}{which}: {e}; give more text or a smaller "
                                 "train.seq_len") from None
            need = t.grad_accum * self.block
            if len(ds) < need:
                raise ValueError(
                    f"training data {cfg.data!r}{which} gives {len(ds)} sequences of "
                    f"{t.seq_len} tokens, fewer than one batch of {need}"
                )
            self.datasets[s] = ds
        self.seed = t.seed

    def iterate(self, start_step: int) -> Iterator[tuple[int, jax.Array]]:
        """``(step, global token batch)`` from ``start_step`` on, endlessly."""
        accum, micro, seq = self.shape
        iters = {
            s: ds.iterate(accum * self.block, self.seed, start_step=start_step,
                          process_index=0, process_count=1)
            for s, ds in self.datasets.items()
        }
        while True:
            local = np.zeros(self.shape, np.int32)  # rows of shards read elsewhere stay unused
            step = None
            for s, it in iters.items():
                step, batch = next(it)
                local[:, s * self.block:(s + 1) * self.block] = batch["tokens"].reshape(
                    accum, self.block, seq)
            yield step, global_array(local, self.sharding)


__all__ = ["ShardedData"]
