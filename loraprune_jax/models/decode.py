"""KV-cache decoding for the (base, lora, masks) pytrees: prefill, one-token steps, generation.

The cache holds each layer's keys and values after RoPE (and after the masks, so a masked model
caches exactly what its sliced model would). Slots are shared by all rows; ragged prompts are
left-padded, ``start[b]`` is the first real slot of row ``b``, its RoPE position is
``slot - start[b]``, and attention never looks at slots before ``start[b]``. Left padding puts
every row's last prompt token in the same slot, so the decode loop needs one write index.

``generate`` runs prefill and the whole decode loop (``lax.while_loop``, stopping when every row
has emitted EOS) in one jitted function, compiled once per (batch, padded prompt length,
``max_new_tokens``, sampling mode).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..config import LlamaConfig, LoraConfig
from ..core.lora import lora_linear
from ..parallel.mesh import (
    activation_sharding, batch_multiple, batch_sharding, constrain, global_array, host_tree,
)
from .attention import rms_norm, rope_tables
from .llama import attention_inputs, logits_from_hidden, mlp
from .llama_params import place_base
from .quant import project

Array = jax.Array
_NEG = float(jnp.finfo(jnp.float32).min)


# ----------------------------------------------------------------------------- cache
def init_cache(
    config: LlamaConfig,
    batch: int,
    max_len: int,
    dtype: Any = None,
    *,
    stacked: bool = False,
    start: Array | Sequence[int] | None = None,
) -> dict[str, Any]:
    """An empty cache of ``max_len`` slots: ``{"layers", "length", "start"}``.

    ``layers`` is a list of ``{"k", "v": (B, max_len, kv_heads(i), hd)}`` (per-layer widths), or
    with ``stacked`` one dict of ``(L, B, max_len, kv, hd)`` arrays for a stacked base, which the
    step scans over. ``length`` is the number of filled slots; ``start`` (``(B,)``, default 0)
    the first real slot of each row (left padding). Size it for prompt + new tokens: a write
    past ``max_len`` is not detected inside jit (XLA clamps the index).
    """
    dtype = dtype or config.jnp_dtype
    hd = config.head_dim
    names = ("batch", "seq", "kv_heads", None)  # pinned to the mesh when one is active

    def zeros(shape: tuple[int, ...], logical: tuple[str | None, ...]) -> Array:
        return constrain(jnp.zeros(shape, dtype), logical)

    if stacked:
        if not config.is_uniform:
            raise ValueError("a stacked cache needs uniform layer widths")
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, hd)
        layers: Any = {"k": zeros(shape, ("layers",) + names), "v": zeros(shape, ("layers",) + names)}
    else:
        layers = [
            {
                "k": zeros((batch, max_len, config.kv_heads(i), hd), names),
                "v": zeros((batch, max_len, config.kv_heads(i), hd), names),
            }
            for i in range(config.num_layers)
        ]
    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    return {"layers": layers, "length": jnp.zeros((), jnp.int32), "start": start}


# ----------------------------------------------------------------------------- one block
def _cached_attention(q: Array, k: Array, v: Array, ck: Array, cv: Array, cache_ok: Array,
                      new_ok: Array) -> Array:
    """Softmax attention of ``q`` (B,T,H,hd) over the cache ``ck/cv`` (B,S,K,hd) and the chunk's
    own ``k/v`` (B,T,K,hd); ``cache_ok`` (B,S) and ``new_ok`` (B,T,T) say which keys count.

    Scores are formed for both parts and normalised jointly, so the cache is read in place and
    written once afterwards. GQA grouping and precision follow ``attention.causal_attention``.
    """
    b, t, h, hd = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, hd)
    scale = 1.0 / jnp.sqrt(jnp.float32(hd))
    s_cache = jnp.einsum("btkgd,bskd->bkgts", qg, ck, preferred_element_type=jnp.float32) * scale
    s_new = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    s_cache = jnp.where(cache_ok[:, None, None, None, :], s_cache, _NEG)
    s_new = jnp.where(new_ok[:, None, None, :, :], s_new, _NEG)
    probs = jax.nn.softmax(jnp.concatenate([s_cache, s_new], axis=-1), axis=-1).astype(v.dtype)
    n = ck.shape[1]
    out = jnp.einsum("bkgts,bskd->btkgd", probs[..., :n], cv)
    out = out + jnp.einsum("bkgts,bskd->btkgd", probs[..., n:], v)
    return out.reshape(b, t, h * hd)


def _cached_block(x, layer, adapters, mask, ck, cv, cos, sin, cache_ok, new_ok, config, scale):
    """One decoder layer on a chunk ``x`` (B,T,D) given its cache; returns (x, new k, new v).

    Same computation as ``llama._block`` (masks gate q/k/v and gate/up after base + LoRA), with
    attention over cache + chunk instead of the chunk alone.
    """
    hd = config.head_dim
    heads = layer["q"].shape[-1] // hd
    kv_heads = layer["k"].shape[-1] // hd
    b, t, _ = x.shape

    def proj(name: str, inp: Array, key: Array | None = None) -> Array:
        pair = adapters.get(name) if adapters else None
        return lora_linear(inp, layer[name], pair, scale, matmul=project)  # int8 base: project

    k = v = jnp.zeros((b, t, kv_heads, hd), ck.dtype)
    if heads > 0:
        _, q, k, v = attention_inputs(x, layer, mask, cos, sin, config, proj)
        k, v = k.astype(ck.dtype), v.astype(cv.dtype)
        attn = _cached_attention(q, k.astype(q.dtype), v.astype(q.dtype), ck.astype(q.dtype),
                                 cv.astype(q.dtype), cache_ok, new_ok)
        x = x + proj("o", attn)
    if layer["gate"].shape[-1] > 0:
        x = mlp(x, layer, mask, config, proj)[0]
    return x, k, v


# ----------------------------------------------------------------------------- prefill / step
def _extend(base, config, tokens, cache, lora, masks, lora_cfg, last_only):
    """Run ``tokens`` (B,T) after the cache's ``length`` filled slots; return (logits, cache)."""
    if lora is not None and lora_cfg is None:
        raise ValueError("got a LoRA tree but no lora_cfg (rank/alpha)")
    scale = lora_cfg.scale if lora_cfg is not None else 0.0
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, seq), got shape {tokens.shape}")
    b, t = tokens.shape
    length, start = cache["length"], cache["start"]
    layers_c = cache["layers"]
    max_len = (layers_c["k"].shape[2] if isinstance(layers_c, dict) else layers_c[0]["k"].shape[1])
    if t > max_len:
        raise ValueError(f"{t} tokens do not fit a cache of {max_len} slots")

    slots = length + jnp.arange(t, dtype=jnp.int32)                       # (T,)
    positions = jnp.maximum(slots[None, :] - start[:, None], 0)           # (B, T)
    cos, sin = rope_tables(positions, config.head_dim, config.rope_theta)
    cache_slots = jnp.arange(max_len, dtype=jnp.int32)
    cache_ok = (cache_slots[None, :] < length) & (cache_slots[None, :] >= start[:, None])
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    new_ok = causal[None] & (slots[None, None, :] >= start[:, None, None])  # (B, T, T)

    table = constrain(base["embed"], (None, None))  # whole on every device, as in llama.forward
    x = jnp.take(table, tokens, axis=0).astype(base["embed"].dtype)
    block = functools.partial(_cached_block, cos=cos, sin=sin, cache_ok=cache_ok, new_ok=new_ok,
                              config=config, scale=scale)
    layers = base["layers"]
    lora_layers = lora["layers"] if lora is not None else None
    mask_layers = masks["layers"] if masks is not None else None
    if isinstance(layers, dict):
        if not isinstance(layers_c, dict):
            raise ValueError("a stacked base needs a stacked cache (init_cache(stacked=True))")

        def step(h, xs):
            layer, adapters, mask, ck, cv = xs
            h, k, v = block(h, layer, adapters, mask, ck, cv)
            return h, (k, v)

        x, (ks, vs) = jax.lax.scan(
            step, x, (layers, lora_layers, mask_layers, layers_c["k"], layers_c["v"]))
        at = (0, 0, length, 0, 0)
        new_layers: Any = {"k": jax.lax.dynamic_update_slice(layers_c["k"], ks, at),
                           "v": jax.lax.dynamic_update_slice(layers_c["v"], vs, at)}
    else:
        if isinstance(layers_c, dict) or len(layers_c) != len(layers):
            raise ValueError("a list-layout base needs a list cache with one entry per layer")
        new_layers = []
        for i, layer in enumerate(layers):
            c = layers_c[i]
            x, k, v = block(x, layer, lora_layers[i] if lora_layers is not None else None,
                            mask_layers[i] if mask_layers is not None else None, c["k"], c["v"])
            at = (0, length, 0, 0)
            new_layers.append({"k": jax.lax.dynamic_update_slice(c["k"], k, at),
                               "v": jax.lax.dynamic_update_slice(c["v"], v, at)})
    if last_only:
        x = x[:, -1:]
    x = rms_norm(x, base["final_norm"], config.rms_norm_eps)
    logits = logits_from_hidden(base, x)
    return logits, {"layers": new_layers, "length": length + t, "start": start}


@functools.partial(jax.jit, static_argnames=("config", "lora_cfg", "last_only"))
def prefill(base, config, tokens, cache, lora=None, masks=None, lora_cfg=None, *,
            last_only=False):
    """Run the prompt ``tokens`` (B,T) into ``cache``: ``(logits (B,T,V) float32, cache)``.

    Works from any cache length (chunked prefill). ``last_only`` computes only the last
    position's logits (B,1,V), all generation needs. Left-padded rows need ``cache["start"]``.
    Jitted (``config``/``lora_cfg`` static).
    """
    return _extend(base, config, tokens, cache, lora, masks, lora_cfg, last_only)


@functools.partial(jax.jit, static_argnames=("config", "lora_cfg"))
def decode_step(base, config, token, cache, lora=None, masks=None, lora_cfg=None):
    """One new token per row (``token`` (B,) or (B,1)): ``(logits (B,V) float32, cache)``.
    Jitted (``config``/``lora_cfg`` static)."""
    token = jnp.asarray(token).reshape(-1, 1)
    logits, cache = _extend(base, config, token, cache, lora, masks, lora_cfg, False)
    return logits[:, 0], cache


# ----------------------------------------------------------------------------- sampling
def filter_logits(logits: Array, top_k: int | None = None, top_p: Array | float | None = None
                  ) -> Array:
    """Set logits outside the top-k and outside the nucleus to -inf (last axis = vocabulary).

    The nucleus is the smallest set of most probable tokens whose probability sums to >= top_p
    (tokens tied with its least probable member are kept too). The most probable token is
    always kept.
    """
    logits = logits.astype(jnp.float32)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs          # mass of strictly better tokens
        keep = before < top_p
        keep = keep.at[..., 0].set(True)
        cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _sample(logits, key, temperature, top_p, greedy, top_k, use_top_p):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    logits = filter_logits(logits, top_k, top_p if use_top_p else None)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- generation
@functools.partial(
    jax.jit,
    static_argnames=("config", "lora_cfg", "max_new_tokens", "greedy", "top_k", "use_top_p",
                     "mesh"),
)
def _generate_jit(base, lora, masks, tokens, start, key, temperature, top_p, eos_id, *, config,
                  lora_cfg, max_new_tokens, greedy, top_k, use_top_p, mesh=None):
    """Prefill + decode loop; returns (new tokens (B, N) filled with eos after a row stops,
    number of steps run). With a ``mesh`` activations and the cache are pinned to it."""
    with activation_sharding(mesh) if mesh is not None else contextlib.nullcontext():
        return _generate_loop(base, lora, masks, tokens, start, key, temperature, top_p, eos_id,
                              config=config, lora_cfg=lora_cfg, max_new_tokens=max_new_tokens,
                              greedy=greedy, top_k=top_k, use_top_p=use_top_p)


def _generate_loop(base, lora, masks, tokens, start, key, temperature, top_p, eos_id, *, config,
                   lora_cfg, max_new_tokens, greedy, top_k, use_top_p):
    b, t = tokens.shape
    n = max_new_tokens
    stacked = isinstance(base["layers"], dict)
    cache = init_cache(config, b, t + n, base["embed"].dtype, stacked=stacked, start=start)
    logits, cache = _extend(base, config, tokens, cache, lora, masks, lora_cfg, True)
    sample = functools.partial(_sample, temperature=temperature, top_p=top_p, greedy=greedy,
                               top_k=top_k, use_top_p=use_top_p)
    fill = jnp.maximum(eos_id, 0)
    first = sample(logits[:, 0], jax.random.fold_in(key, 0))
    out = jnp.full((b, n), fill, jnp.int32).at[:, 0].set(first)
    done = first == eos_id

    def cond(state):
        i, _, _, done = state
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, cache, out, done = state
        prev = jax.lax.dynamic_index_in_dim(out, i - 1, axis=1, keepdims=False)
        logits, cache = _extend(base, config, prev[:, None], cache, lora, masks, lora_cfg, False)
        tok = sample(logits[:, 0], jax.random.fold_in(key, i))
        tok = jnp.where(done, fill, tok)
        out = jax.lax.dynamic_update_index_in_dim(out, tok, i, axis=1)
        return i + 1, cache, out, done | (tok == eos_id)

    steps, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, out, done))
    return out, steps


def pad_prompts(prompts: Any, bucket: int = 32, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts (array (B,T) or ragged list of lists) to a multiple of ``bucket``:
    ``(tokens (B, T_pad) int32, start (B,) first real slot of each row)``."""
    rows = [list(map(int, r)) for r in np.asarray(prompts)] if isinstance(
        prompts, (np.ndarray, jax.Array)) else [list(map(int, r)) for r in prompts]
    if not rows:
        raise ValueError("no prompts")
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(r) for r in rows)
    width = int(math.ceil(longest / bucket) * bucket) if bucket and bucket > 1 else longest
    tokens = np.full((len(rows), width), pad_id, np.int32)
    start = np.zeros((len(rows),), np.int32)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = r
        start[i] = width - len(r)
    return tokens, start


def generate(
    base: dict[str, Any],
    config: LlamaConfig,
    prompt_ids: Any,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: Array | int | None = None,
    eos_id: int | None = None,
    lora: dict[str, Any] | None = None,
    masks: dict[str, Any] | None = None,
    lora_cfg: LoraConfig | None = None,
    bucket: int = 32,
    timings: dict[str, float] | None = None,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """New tokens ``(B, <= max_new_tokens)`` after each prompt (greedy when ``temperature == 0``).

    ``prompt_ids``: ``(B, T)`` ids or a ragged list of lists (left-padded to a multiple of
    ``bucket`` so nearby prompt lengths share one compilation). A row that emits ``eos_id``
    stops and is padded with it; the result ends when every row has stopped. ``lora``/``masks``
    run the unmerged masked model; layouts (list or stacked) follow ``base``. With a
    ``timings`` dict the call is compiled ahead of time and ``compile_s``/``run_s`` are recorded
    there (that path does not reuse the jit cache; meant for one-off CLI runs). With a ``mesh``
    the base is placed on it (unless it already is), the rows are split over its ``data`` x
    ``fsdp`` axes (padded with copies of the first row to a multiple of their size) and so is
    the KV cache; greedy tokens equal one device's (sampled ones need not: padding changes the
    shape the random draws are made for).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    tokens, start = pad_prompts(prompt_ids, bucket, pad_id=max(eos_id or 0, 0))
    if key is None or isinstance(key, int):
        key = jax.random.PRNGKey(key or 0)
    greedy = temperature == 0.0
    rows = tokens.shape[0]
    if mesh is None:
        tokens_in, start_in = jnp.asarray(tokens), jnp.asarray(start)
    else:
        base = place_base(base, config, mesh)
        pad = -rows % batch_multiple(mesh)
        tokens = np.concatenate([tokens, np.repeat(tokens[:1], pad, axis=0)])
        start = np.concatenate([start, np.repeat(start[:1], pad)])
        tokens_in = global_array(tokens, batch_sharding(mesh, 2, 0))
        start_in = global_array(start, batch_sharding(mesh, 1, 0))
    args = (
        base, lora, masks, tokens_in, start_in, key,
        jnp.float32(temperature if not greedy else 1.0),
        jnp.float32(top_p if top_p is not None else 1.0),
        jnp.int32(-1 if eos_id is None else eos_id),
    )
    static = dict(
        config=config, lora_cfg=lora_cfg if lora is not None else None,
        max_new_tokens=int(max_new_tokens), greedy=greedy,
        top_k=None if greedy or top_k is None else int(top_k),
        use_top_p=not greedy and top_p is not None and top_p < 1.0, mesh=mesh,
    )
    if timings is None:
        out, steps = _generate_jit(*args, **static)
    else:
        t0 = time.perf_counter()
        compiled = _generate_jit.lower(*args, **static).compile()
        t1 = time.perf_counter()
        out, steps = jax.block_until_ready(compiled(*args))
        timings["compile_s"], timings["run_s"] = t1 - t0, time.perf_counter() - t1
    out, steps = host_tree((out, steps))
    return out[:rows, : int(steps)]


__all__ = ["decode_step", "filter_logits", "generate", "init_cache", "pad_prompts", "prefill"]
