"""FLOP counts of the LLaMA forward pass and the measured matmul peak of this machine, shared by
the benchmarks (ratios against an ideal need both)."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from loraprune_jax.config import LlamaConfig


def forward_flops(config: LlamaConfig, batch: int, seq_len: int) -> float:
    """Multiply-adds x 2 of one forward pass: every projection, the causal attention scores and
    values (half of the full T x T), and the LM head. Per-layer widths are honoured."""
    d, hd, v = config.hidden_size, config.head_dim, config.vocab_size
    tokens = batch * seq_len
    total = 2.0 * tokens * d * v  # LM head
    for i in range(config.num_layers):
        h, kv, f = config.heads(i), config.kv_heads(i), config.ffn(i)
        proj = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
        total += 2.0 * tokens * proj
        total += 2.0 * 2 * batch * h * hd * seq_len * (seq_len + 1) / 2  # QK^T and PV, causal
    return total


def lora_flops(config: LlamaConfig, batch: int, seq_len: int, rank: int, n_targets: int = 7) -> float:
    """The adapters' share of one forward pass (x A then x B on each target)."""
    d = config.hidden_size
    per_layer = 0.0
    for i in range(config.num_layers):
        widths = [config.heads(i) * config.head_dim, config.kv_heads(i) * config.head_dim,
                  config.kv_heads(i) * config.head_dim, d, config.ffn(i), config.ffn(i), d]
        ins = [d, d, d, config.heads(i) * config.head_dim, d, d, config.ffn(i)]
        per_layer += sum(2.0 * rank * (a + b) for a, b in zip(ins[:n_targets], widths[:n_targets]))
    return batch * seq_len * per_layer


def matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
    """FLOP/s of one large ``jnp.dot`` (median of ``repeats`` after a warm-up)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(jnp.dot)
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times)
