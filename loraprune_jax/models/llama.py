"""LLaMA decoder: pure forward/loss functions over (base, lora, masks) pytrees.

The frozen weights, the LoRA adapters and the structured masks are three separate pytrees whose
layer paths line up, so ``jax.grad`` can be taken with respect to ``lora`` alone and masks can be
rewritten between compiled calls without retracing. Layers come either as a list of per-layer
dicts (widths may differ per layer, e.g. after pruning) or as one dict of arrays stacked on a
leading layer axis (uniform widths), which the forward pass runs with ``jax.lax.scan``.

Base tree (kernels in Flax layout ``(in, out)``)::

    {"embed": (V, D), "final_norm": (D,), "lm_head": (D, V)  # only when not tied
     "layers": [{"attn_norm": (D,), "q": (D, H*hd), "k": (D, K*hd), "v": (D, K*hd),
                 "o": (H*hd, D), "mlp_norm": (D,), "gate": (D, F), "up": (D, F),
                 "down": (F, D)}, ...]}

The seven projections may be int8 with per-channel scales (``models.quant``), dequantized where
each is used. Shapes, stacking and the ``flax.nnx`` module live in ``models.llama_params``, the
attention primitives in ``models.attention``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from ..config import PROJECTIONS, LlamaConfig, LoraConfig
from ..core.dropout import dropout as apply_dropout
from ..core.lora import lora_linear
from ..parallel.mesh import constrain
from .attention import apply_rope, causal_attention, rms_norm, rope_tables
from .quant import dequantize, project

_ACT = ("batch", "seq", "embed")  # logical axes of the hidden states between blocks

Array = jax.Array


# ----------------------------------------------------------------------------- one block
def gate_groups(x: Array, gate: Array, width: int) -> Array:
    """``x`` ``(B, T, n * width)`` times a per-example gate ``(B, n)`` on each group of ``width``
    consecutive features.

    The gates of the ``fisher`` and ``taylor`` criteria: at ``gate`` equal to the masks the
    output is unchanged, and ``d loss / d gate`` is the first-order estimate of removing each
    group from each example.
    """
    b, n = gate.shape
    if x.shape[0] != b or x.shape[-1] != n * width:
        raise ValueError(f"gates {gate.shape} x width {width} do not match features {x.shape}")
    cols = jnp.repeat(gate.astype(x.dtype), width, axis=-1, total_repeat_length=n * width)
    return x * cols[:, None, :]


# The gated tensors (attention output, MLP activation) are recomputed in the backward pass from
# what it keeps anyway (q, k, v; gate and up), so gating holds no second copy of them per layer.
@functools.partial(jax.checkpoint, static_argnums=(4,))
def _gated_attention(q: Array, k: Array, v: Array, gate: Array, width: int) -> Array:
    return gate_groups(causal_attention(q, k, v), gate, width)


@jax.checkpoint
def _gated_activation(g: Array, u: Array, gate: Array) -> Array:
    return gate_groups(jax.nn.silu(g) * u, gate, 1)


def expand_unit_mask(mask: Array, heads: int, kv_heads: int, head_dim: int) -> dict[str, Array]:
    """Column masks for q, k and v (and row mask for o) from a per-unit mask of length kv_heads
    (an attention unit: one KV head and the query heads sharing it, ``models.llama_pruning``)."""
    q_per_unit = (heads // kv_heads) * head_dim if kv_heads else 0
    q_cols = jnp.repeat(mask, q_per_unit, total_repeat_length=heads * head_dim)
    kv_cols = jnp.repeat(mask, head_dim, total_repeat_length=kv_heads * head_dim)
    return {"q": q_cols, "k": kv_cols, "v": kv_cols, "o": q_cols}


def _sq_sum(x: Array) -> Array:
    """Sum of squares over all but the last axis, in float32 (input norms for wanda)."""
    x = x.astype(jnp.float32)
    return jnp.sum(x * x, axis=tuple(range(x.ndim - 1)))


def attention_inputs(
    x: Array,
    layer: dict[str, Array],
    mask: dict[str, Array] | None,
    cos: Array,
    sin: Array,
    config: LlamaConfig,
    proj: Callable[[str, Array, Array | None], Array],
    keys: Sequence[Array | None] = (None, None, None),
) -> tuple[Array, Array, Array, Array]:
    """The attention half's inputs: normed ``h`` and masked q, k (after RoPE) and v, split into
    heads; shared by the full forward pass and the KV-cache decoder."""
    hd = config.head_dim
    heads, kv_heads = layer["q"].shape[-1] // hd, layer["k"].shape[-1] // hd
    b, t, _ = x.shape
    h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
    q, k, v = proj("q", h, keys[0]), proj("k", h, keys[1]), proj("v", h, keys[2])
    if mask is not None:
        cols = expand_unit_mask(mask["attn"].astype(q.dtype), heads, kv_heads, hd)
        q, k, v = q * cols["q"], k * cols["k"], v * cols["v"]
    q = apply_rope(q.reshape(b, t, heads, hd), cos, sin)
    k = apply_rope(k.reshape(b, t, kv_heads, hd), cos, sin)
    return h, q, k, v.reshape(b, t, kv_heads, hd)


def mlp(
    x: Array,
    layer: dict[str, Array],
    mask: dict[str, Array] | None,
    config: LlamaConfig,
    proj: Callable[[str, Array, Array | None], Array],
    keys: Sequence[Array | None] = (None, None, None),
    gate: Array | None = None,
) -> tuple[Array, Array, Array]:
    """The MLP half with its residual: ``(x + down(silu(gate) * up), normed input, activation)``,
    the masks gating gate and up; shared by the forward pass and the KV-cache decoder. ``gate``
    ``(B, ffn)`` multiplies each example's activation before ``down`` (see :func:`gate_groups`)."""
    h = rms_norm(x, layer["mlp_norm"], config.rms_norm_eps)
    g, u = proj("gate", h, keys[0]), proj("up", h, keys[1])
    if mask is not None:
        m = mask["mlp"].astype(g.dtype)
        g, u = g * m, u * m
    act = jax.nn.silu(g) * u
    down_in = act if gate is None else _gated_activation(g, u, gate)
    return x + proj("down", down_in, keys[2]), h, act


def masked_lora_linear(
    x: Array,
    w: Array,
    pair: dict[str, Array] | None,
    mask: Array,
    scale: float,
    dropout: float = 0.0,
    key: Array | None = None,
) -> Array:
    """``x @ ((W + scale * A @ B) * M)``: an element mask on the *merged* weight.

    The mask must hold after LoRA is folded in (the export zeroes ``merge(W) * M``), so unlike
    :func:`~loraprune_jax.core.lora.lora_linear` this forms ``A @ B`` (in float32, cast to
    ``W``'s dtype as ``merge_pair`` does). With LoRA dropout the LoRA path sees the dropped-out
    input: ``x @ (W * M) + scale * dropout(x) @ ((A @ B) * M)``.
    """
    if pair is None:
        return x @ (w * mask.astype(w.dtype))
    delta = scale * (pair["a"].astype(jnp.float32) @ pair["b"].astype(jnp.float32))
    if dropout > 0.0 and key is not None:
        xd = apply_dropout(x, dropout, key).reshape(-1, x.shape[-1])  # (tokens, in): see lora_linear
        y = x @ (w * mask.astype(w.dtype))
        return y + (xd @ (delta * mask.astype(jnp.float32)).astype(x.dtype)).reshape(y.shape).astype(y.dtype)
    merged = ((w.astype(jnp.float32) + delta) * mask.astype(jnp.float32)).astype(w.dtype)
    return x @ merged


def element_masks_of(mask: dict[str, Array] | None) -> dict[str, Array] | None:
    """A layer's mask dict if it holds weight-shaped masks keyed by projection (unstructured or
    N:M), ``None`` for structured ``{"attn", "mlp"}`` masks or no masks (decided at trace time)."""
    if mask is None or not any(name in mask for name in PROJECTIONS):
        return None
    if "attn" in mask or "mlp" in mask:
        raise ValueError("a layer's masks are either structured ('attn', 'mlp') or weight-shaped "
                         f"(keyed by projection), not both: got {sorted(mask)}")
    return mask


def _block(
    x: Array,
    layer: dict[str, Array],
    adapters: dict[str, Any] | None,
    mask: dict[str, Array] | None,
    cos: Array,
    sin: Array,
    config: LlamaConfig,
    scale: float,
    dropout: float,
    key: Array | None,
    collect: bool = False,
    gate: dict[str, Array] | None = None,
) -> tuple[Array, dict[str, Array]]:
    heads = layer["q"].shape[-1] // config.head_dim
    keys = list(jax.random.split(key, 7)) if key is not None else [None] * 7
    stats: dict[str, Array] = {}
    element = element_masks_of(mask)
    if element is not None:  # weight masks act inside proj; no group masks
        if gate is not None:
            raise ValueError("group gates need structured masks, not weight-shaped ones")
        mask = None

    def proj(name: str, inp: Array, k: Array | None) -> Array:
        pair = adapters.get(name) if adapters else None
        if element is not None and name in element:  # an int8 base is dequantized here
            w = dequantize(layer[name], inp.dtype)
            return masked_lora_linear(inp, w, pair, element[name], scale, dropout, k)
        return lora_linear(inp, layer[name], pair, scale, dropout, k, matmul=project)

    if heads > 0:
        h, q, k, v = attention_inputs(x, layer, mask, cos, sin, config, proj, keys[:3])
        attn = causal_attention(q, k, v)
        o_in = attn
        if gate is not None:  # one gate per attention unit: all query heads of its KV group
            units = gate["attn"].shape[-1]
            o_in = _gated_attention(q, k, v, gate["attn"], attn.shape[-1] // units)
        x = x + proj("o", o_in, keys[3])
        if collect:
            stats["attn_in"], stats["o_in"] = _sq_sum(h), _sq_sum(attn)
    elif collect:
        stats["attn_in"] = jnp.zeros((x.shape[-1],), jnp.float32)
        stats["o_in"] = jnp.zeros((0,), jnp.float32)
    if layer["gate"].shape[-1] > 0:
        x, h, act = mlp(x, layer, mask, config, proj, keys[4:],
                        gate=gate["mlp"] if gate is not None else None)
        if collect:
            stats["mlp_in"], stats["down_in"] = _sq_sum(h), _sq_sum(act)
    elif collect:
        stats["mlp_in"] = jnp.zeros((x.shape[-1],), jnp.float32)
        stats["down_in"] = jnp.zeros((0,), jnp.float32)
    return x, stats


# ----------------------------------------------------------------------------- pure API
def forward(
    base: dict[str, Any],
    lora: dict[str, Any] | None,
    masks: dict[str, Any] | None,
    tokens: Array,
    config: LlamaConfig,
    lora_cfg: LoraConfig | None = None,
    *,
    rng: Array | None = None,
    remat: bool = False,
    return_hidden: bool = False,
    return_stats: bool = False,
    gates: dict[str, Any] | None = None,
) -> Array | tuple[Array, dict[str, Any]]:
    """Logits ``(B, T, V)`` in float32 of the masked LoRA model on ``tokens`` ``(B, T)``.

    ``lora`` and ``masks`` may be ``None``. ``masks`` are either structured (per layer
    ``{"attn": (units,), "mlp": (ffn,)}``, gating the outputs of groups) or weight-shaped (per
    layer ``{"q": (in, out), ...}``, unstructured or N:M, multiplying the merged weight: see
    :func:`masked_lora_linear`). Dropout on the LoRA path is applied only when ``rng``
    is given. ``remat`` rematerialises each block in the backward pass (less memory).
    With ``return_stats`` also returns ``{"layers": ...}`` holding, per layer, the sums of squares
    over all tokens of each projection's input (``attn_in`` for q/k/v, ``o_in``, ``mlp_in`` for
    gate/up, ``down_in``), laid out like the base layers: what the wanda criterion needs.
    ``gates`` (structured masks only), laid out like the masks with a batch axis before the
    groups (per layer ``{"attn": (B, units), "mlp": (B, ffn)}``), multiply each attention unit's
    output before ``o`` and each MLP channel's activation before ``down``
    (:func:`gate_groups`); their gradients are what the ``fisher`` and ``taylor`` criteria read.
    """
    if lora is not None and lora_cfg is None:
        raise ValueError("forward() got a LoRA tree but no lora_cfg (rank/alpha/dropout)")
    scale = lora_cfg.scale if lora_cfg else 0.0
    dropout = lora_cfg.dropout if lora_cfg else 0.0
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, seq), got shape {tokens.shape}")
    dtype = base["embed"].dtype
    # The lookup reads a table whose vocabulary is whole on every device (a gather from a
    # vocabulary split over devices has no efficient partitioning).
    table = constrain(base["embed"], (None, None))
    x = constrain(jnp.take(table, tokens, axis=0).astype(dtype), _ACT)
    positions = jnp.arange(tokens.shape[1])[None, :]
    cos, sin = rope_tables(positions, config.head_dim, config.rope_theta)
    layers = base["layers"]
    lora_layers = lora["layers"] if lora is not None else None
    mask_layers = masks["layers"] if masks is not None else None
    gate_layers = gates["layers"] if gates is not None else None

    block = functools.partial(
        _block, cos=cos, sin=sin, config=config, scale=scale, dropout=dropout, collect=return_stats
    )
    if remat:
        block = jax.checkpoint(block)

    if isinstance(layers, dict):  # stacked: scan over the layer axis
        n = layers["q"].shape[0]
        layer_keys = jax.random.split(rng, n) if rng is not None else None

        def step(h: Array, xs: tuple) -> tuple[Array, dict[str, Array]]:
            layer, adapters, mask, gate, key = xs
            h, layer_stats = block(h, layer, adapters, mask, key=key, gate=gate)
            return constrain(h, _ACT), layer_stats

        x, stats = jax.lax.scan(step, x, (layers, lora_layers, mask_layers, gate_layers, layer_keys))
    else:
        n = len(layers)
        if n != config.num_layers:
            raise ValueError(f"base has {n} layers, config says {config.num_layers}")
        layer_keys = jax.random.split(rng, n) if rng is not None else [None] * n
        stats = []
        for i in range(n):
            x, layer_stats = block(
                x,
                layers[i],
                lora_layers[i] if lora_layers is not None else None,
                mask_layers[i] if mask_layers is not None else None,
                key=layer_keys[i],
                gate=gate_layers[i] if gate_layers is not None else None,
            )
            x = constrain(x, _ACT)
            stats.append(layer_stats)
    x = rms_norm(x, base["final_norm"], config.rms_norm_eps)
    out = x if return_hidden else logits_from_hidden(base, x)
    return (out, {"layers": stats}) if return_stats else out


def logits_from_hidden(base: dict[str, Any], hidden: Array) -> Array:
    """Project final hidden states to float32 logits (tied or untied head)."""
    if "lm_head" in base:
        logits = hidden @ base["lm_head"]
    else:
        logits = jnp.einsum("btd,vd->btv", hidden, base["embed"])
    return constrain(logits, ("batch", "seq", "vocab")).astype(jnp.float32)


def token_nll(
    base: dict[str, Any],
    lora: dict[str, Any] | None,
    masks: dict[str, Any] | None,
    tokens: Array,
    config: LlamaConfig,
    lora_cfg: LoraConfig | None = None,
    *,
    rng: Array | None = None,
    remat: bool = False,
    return_stats: bool = False,
    gates: dict[str, Any] | None = None,
) -> Array | tuple[Array, dict[str, Any]]:
    """Next-token negative log-likelihood ``(B, T-1)`` of ``tokens[:, 1:]`` (and input stats)."""
    out = forward(
        base, lora, masks, tokens, config, lora_cfg, rng=rng, remat=remat,
        return_stats=return_stats, gates=gates,
    )
    logits, stats = out if return_stats else (out, None)
    logits = logits[:, :-1]
    targets = jnp.asarray(tokens)[:, 1:]
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = logz - picked
    return (nll, stats) if return_stats else nll


def loss(
    base: dict[str, Any],
    lora: dict[str, Any] | None,
    masks: dict[str, Any] | None,
    batch: dict[str, Array],
    config: LlamaConfig,
    lora_cfg: LoraConfig | None = None,
    *,
    rng: Array | None = None,
    remat: bool = False,
    return_stats: bool = False,
    gates: dict[str, Any] | None = None,
) -> Array | tuple[Array, dict[str, Any]]:
    """Mean next-token NLL over ``batch["tokens"]``, weighted by ``batch["loss_mask"]`` if given.

    ``loss_mask`` has the shape of ``tokens`` and weights each *target* position (its first
    column is ignored, since the first token is never predicted). With ``return_stats`` returns
    ``(loss, input stats)`` (see :func:`forward`), ready for ``jax.value_and_grad(has_aux=True)``.
    """
    tokens = batch["tokens"]
    out = token_nll(
        base, lora, masks, tokens, config, lora_cfg, rng=rng, remat=remat,
        return_stats=return_stats, gates=gates,
    )
    nll, stats = out if return_stats else (out, None)
    weights = batch.get("loss_mask")
    if weights is None:
        value = jnp.mean(nll)
    else:
        w = jnp.asarray(weights, jnp.float32)[:, 1:]
        value = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
    return (value, stats) if return_stats else value
