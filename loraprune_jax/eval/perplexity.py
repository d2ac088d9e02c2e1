"""Perplexity with the LLM-Pruner / LoRAPrune protocol (method.md section 6).

Documents are joined with "\\n\\n" and tokenized once; the ids are cut into non-overlapping
windows of ``seq_len`` tokens (the remainder is dropped); perplexity is ``exp`` of the mean
next-token NLL over all windows. Every window has the same length, so the mean of the
per-window means equals the mean over all predictions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from ..config import LlamaConfig, LoraConfig
from ..data.packing import windows
from ..models.llama import token_nll
from ..parallel.mesh import BATCH_AXES, batch_sharding, global_array, host_tree, mesh_sizes


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Perplexity and what it was measured on."""

    ppl: float
    nll: float
    tokens: int  # tokens in the evaluated windows (windows * seq_len)
    windows: int
    seq_len: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tokens_per_second"] = self.tokens_per_second
        return out


@functools.partial(jax.jit, static_argnames=("config", "lora_cfg"))
def window_nll(
    base: dict[str, Any],
    lora: dict[str, Any] | None,
    masks: dict[str, Any] | None,
    tokens: jax.Array,
    config: LlamaConfig,
    lora_cfg: LoraConfig | None = None,
) -> jax.Array:
    """Mean next-token NLL of each window ``(B,)``, in float32."""
    return jnp.mean(token_nll(base, lora, masks, tokens, config, lora_cfg), axis=1)


def perplexity(
    base: dict[str, Any],
    config: LlamaConfig,
    ids: np.ndarray,
    seq_len: int,
    *,
    lora: dict[str, Any] | None = None,
    masks: dict[str, Any] | None = None,
    lora_cfg: LoraConfig | None = None,
    max_windows: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
    mesh: Mesh | None = None,
) -> PerplexityResult:
    """Perplexity of the (masked, LoRA) model over ``ids`` cut into ``seq_len`` windows.

    Windows are evaluated ``batch_size`` at a time (default: about 4096 tokens per batch); the
    last batch is padded with repeats of its first window so every call has one shape (one
    compilation), and the padding is discarded. With a ``mesh`` (``base`` placed on it, LoRA and
    masks replicated) the windows of a batch are split over its ``data`` x ``fsdp`` axes, and
    ``batch_size`` is rounded up to a multiple of their size.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    win = windows(np.asarray(ids), seq_len, max_windows)
    n = win.shape[0]
    if batch_size is None:
        batch_size = max(1, min(n, 4096 // seq_len))
    sharding = None
    if mesh is not None:
        sharding = batch_sharding(mesh, ndim=2, batch_axis=0)
        per = math.prod(mesh_sizes(mesh)[a] for a in BATCH_AXES)
        batch_size = -(-batch_size // per) * per
    start = time.perf_counter()
    total = 0.0
    bar = tqdm(total=n, desc=desc, unit="win", disable=not progress, leave=False)
    for lo in range(0, n, batch_size):
        chunk = win[lo : lo + batch_size]
        real = chunk.shape[0]
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - real, axis=0)])
        chunk = chunk.astype(np.int32)
        ids_b = jnp.asarray(chunk) if sharding is None else global_array(chunk, sharding)
        nll = host_tree(window_nll(base, lora, masks, ids_b, config, lora_cfg))
        total += float(np.sum(nll.astype(np.float64)[:real]))
        bar.update(real)
        bar.set_postfix(ppl=f"{math.exp(total / (lo + real)):.3f}")
    bar.close()
    mean = total / n
    return PerplexityResult(
        ppl=math.exp(mean),
        nll=mean,
        tokens=n * seq_len,
        windows=n,
        seq_len=seq_len,
        seconds=time.perf_counter() - start,
    )
