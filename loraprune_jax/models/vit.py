"""Vision Transformer (DINOv2 style): pure forward functions over (params, lora, masks) pytrees.

The same three-tree design as :mod:`loraprune_jax.models.llama`: frozen weights, LoRA pairs
``{"a": (in, r), "b": (r, out)}`` and structured masks are separate pytrees whose layer paths line
up. Every width (heads, MLP channels) is read from the parameter shapes, so a pruned tree whose
layers differ in width runs as it is, and a masked model equals the physically sliced one.

Params tree (kernels in Flax layout ``(in, out)``, list of per-layer dicts)::

    {"patch": {"kernel": (p, p, C, D) HWIO, "bias": (D,)}, "cls": (1, 1, D),
     "pos": (1, 1 + N, D), "final_norm": {"scale": (D,), "bias": (D,)},
     "layers": [{"norm1_scale", "norm1_bias", "q", "q_bias", "k", "k_bias", "v", "v_bias",
                 "o", "o_bias", "ls1", "norm2_scale", "norm2_bias", "fc1", "fc1_bias",
                 "fc2", "fc2_bias", "ls2"}, ...]}

Blocks are pre-norm: ``x + ls1 * o(attn(norm1(x)))`` then ``x + ls2 * fc2(gelu(fc1(norm2(x))))``,
with exact (erf) GELU and biased projections, as in HF ``Dinov2Model``. Masks
``{"layers": [{"attn": (heads,), "mlp": (ffn,)}, ...]}`` scale each head's attention output
(before ``o``) and each fc1 channel after the GELU.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..core.groups import Coupling, GroupKind
from ..core.lora import init_pair, lora_linear

Array = jax.Array

HEAD_DIM = 64  # ViT-S/B/L all use 64-wide heads
LN_EPS = 1e-6  # DINOv2's LayerNorm eps
LORA_TARGETS = ("q", "k", "v", "o", "fc1", "fc2")
LAYER_KEYS = (
    "norm1_scale", "norm1_bias", "q", "q_bias", "k", "k_bias", "v", "v_bias", "o", "o_bias",
    "ls1", "norm2_scale", "norm2_bias", "fc1", "fc1_bias", "fc2", "fc2_bias", "ls2",
)  # fmt: skip


# ----------------------------------------------------------------------------- primitives
def layer_norm(x: Array, scale: Array, bias: Array, eps: float = LN_EPS) -> Array:
    """LayerNorm over the last axis, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def patch_embed(images: Array, kernel: Array, bias: Array) -> Array:
    """Non-overlapping ``p x p`` patches of NHWC ``images`` -> ``(B, N, D)`` tokens, row-major.

    Equal to a stride-``p`` convolution with the HWIO ``kernel``, written as one matmul.
    """
    p, _, c, d = kernel.shape
    b, h, w, ci = images.shape
    if ci != c or h % p or w % p:
        raise ValueError(f"images {images.shape} do not tile into {p}x{p}x{c} patches")
    x = images.astype(kernel.dtype).reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)
    return x @ kernel.reshape(p * p * c, d) + bias


def attention(q: Array, k: Array, v: Array) -> Array:
    """Bidirectional softmax attention over ``(B, T, heads, hd)`` tensors (float32 softmax)."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores * (1.0 / math.sqrt(q.shape[-1])), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def widths(params: dict[str, Any], layer_index: int, head_dim: int = HEAD_DIM) -> tuple[int, int]:
    """``(heads, ffn)`` of one layer, read from the q and fc1 kernel shapes."""
    layer = params["layers"][layer_index]
    return layer["q"].shape[-1] // head_dim, layer["fc1"].shape[-1]


# ----------------------------------------------------------------------------- one block
def _block(
    x: Array,
    layer: dict[str, Array],
    adapters: dict[str, Any] | None,
    mask: dict[str, Array] | None,
    scale: float,
    dropout: float,
    key: Array | None,
    head_dim: int,
    eps: float,
) -> Array:
    keys = list(jax.random.split(key, 6)) if key is not None else [None] * 6

    def proj(name: str, inp: Array, k: Array | None) -> Array:
        pair = adapters.get(name) if adapters else None
        return lora_linear(inp, layer[name], pair, scale, dropout, k) + layer[f"{name}_bias"]

    b, t, _ = x.shape
    heads = layer["q"].shape[-1] // head_dim
    h = layer_norm(x, layer["norm1_scale"], layer["norm1_bias"], eps)
    q, k, v = (proj(n, h, keys[i]).reshape(b, t, heads, head_dim) for i, n in enumerate("qkv"))
    ctx = attention(q, k, v)
    if mask is not None:  # (heads,), or (B, heads) per-example gates (core.gates)
        m = mask["attn"].astype(ctx.dtype)
        ctx = ctx * (m[:, None] if m.ndim == 1 else m[:, None, :, None])
    x = x + layer["ls1"] * proj("o", ctx.reshape(b, t, heads * head_dim), keys[3])

    h = layer_norm(x, layer["norm2_scale"], layer["norm2_bias"], eps)
    act = jax.nn.gelu(proj("fc1", h, keys[4]), approximate=False)
    if mask is not None:
        m = mask["mlp"].astype(act.dtype)
        act = act * (m if m.ndim == 1 else m[:, None, :])
    return x + layer["ls2"] * proj("fc2", act, keys[5])


# ----------------------------------------------------------------------------- pure API
def forward(
    params: dict[str, Any],
    images: Array,
    lora: dict[str, Any] | None = None,
    masks: dict[str, Any] | None = None,
    lora_scale: float = 1.0,
    *,
    lora_dropout: float = 0.0,
    rng: Array | None = None,
    head_dim: int = HEAD_DIM,
    eps: float = LN_EPS,
) -> Array:
    """Hidden states ``(B, 1 + N, D)`` after the final LayerNorm for NHWC ``images``.

    ``images`` are ``(B, H, W, C)`` already normalised (see ``data.images.to_model_input``) and
    must give as many patches as ``params["pos"]`` has positions. ``lora`` and ``masks`` may be
    ``None``; LoRA dropout applies only when ``rng`` is given. Token 0 is the class token. Masks
    multiply each head's output and each MLP activation, so they are the groups' gates; with a
    batch axis (``(B, heads)``, ``(B, ffn)``) they gate each example on its own.
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC (B, H, W, C), got shape {images.shape}")
    x = patch_embed(images, params["patch"]["kernel"], params["patch"]["bias"])
    b, n, d = x.shape
    if params["pos"].shape[-2] != n + 1:
        raise ValueError(
            f"{n} patches, but the position table has {params['pos'].shape[-2] - 1}: "
            "resize the images to the size the model was loaded for"
        )
    cls = jnp.broadcast_to(params["cls"].astype(x.dtype), (b, 1, d))
    x = jnp.concatenate([cls, x], axis=1) + params["pos"].astype(x.dtype)

    layers = params["layers"]
    lora_layers = lora["layers"] if lora is not None else [None] * len(layers)
    mask_layers = masks["layers"] if masks is not None else [None] * len(layers)
    keys = jax.random.split(rng, len(layers)) if rng is not None else [None] * len(layers)
    for layer, adapters, mask, key in zip(layers, lora_layers, mask_layers, keys):
        x = _block(x, layer, adapters, mask, lora_scale, lora_dropout, key, head_dim, eps)
    return layer_norm(x, params["final_norm"]["scale"], params["final_norm"]["bias"], eps)


def features(
    params: dict[str, Any],
    images: Array,
    lora: dict[str, Any] | None = None,
    masks: dict[str, Any] | None = None,
    lora_scale: float = 1.0,
    **kw: Any,
) -> Array:
    """The class-token features ``(B, D)`` (what a linear probe or classification head reads)."""
    return forward(params, images, lora, masks, lora_scale, **kw)[:, 0]


# ----------------------------------------------------------------------------- LoRA, masks, groups
def init_vit_lora(
    key: Array,
    params: dict[str, Any],
    rank: int = 8,
    targets: tuple[str, ...] = LORA_TARGETS,
    dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """LoRA pairs for ``targets`` of every layer: ``A`` He-uniform (bound ``1/sqrt(in)``), ``B``
    zero, as :func:`~loraprune_jax.models.lora.init_lora` does for LLaMA (whose ``LoraConfig``
    accepts only LLaMA projection names, hence this ViT twin)."""
    bad = set(targets) - set(LORA_TARGETS)
    if bad:
        raise ValueError(f"unknown ViT LoRA targets {sorted(bad)}; choose from {LORA_TARGETS}")
    layers = params["layers"]
    keys = jax.random.split(key, max(len(layers) * len(targets), 1))
    out = []
    for i, layer in enumerate(layers):
        pairs = {}
        for j, name in enumerate(targets):
            pairs[name] = init_pair(keys[i * len(targets) + j], layer[name].shape, rank, dtype)
        out.append(pairs)
    return {"layers": out}


def groups(params: dict[str, Any], layer_index: int, head_dim: int = HEAD_DIM) -> dict[str, GroupKind]:
    """Prunable groups of layer ``layer_index``: each head owns ``head_dim`` q/k/v columns (and
    bias entries) and ``head_dim`` o rows; each MLP channel one fc1 column, fc1 bias entry and
    fc2 row. Weights come before biases (the scored couplings first)."""
    heads, ffn = widths(params, layer_index, head_dim)

    def at(name: str, axis: int, width: int = 1) -> Coupling:
        return Coupling(("layers", layer_index, name), axis, width)

    attn = (at("q", 1, head_dim), at("k", 1, head_dim), at("v", 1, head_dim), at("o", 0, head_dim),
            at("q_bias", 0, head_dim), at("k_bias", 0, head_dim), at("v_bias", 0, head_dim))  # fmt: skip
    mlp = (at("fc1", 1), at("fc2", 0), at("fc1_bias", 0))
    return {"attn": GroupKind(heads, attn), "mlp": GroupKind(ffn, mlp)}


def declaration(params: dict[str, Any], head_dim: int = HEAD_DIM) -> list[dict[str, GroupKind]]:
    """Every layer's :func:`groups` (one mask layer per transformer block)."""
    return [groups(params, i, head_dim) for i in range(len(params["layers"]))]


# ----------------------------------------------------------------------------- random init, nnx
def init_vit(
    key: Array | int = 0,
    *,
    dim: int = 384,
    depth: int = 12,
    heads: int = 6,
    ffn: int = 1536,
    patch: int = 14,
    image_size: int = 224,
    channels: int = 3,
    head_dim: int = HEAD_DIM,
    std: float = 0.02,
    dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """A random params tree (tests, shape planning); norms and layer scales are not trivial."""
    key = jax.random.PRNGKey(key) if isinstance(key, int) else key
    hd, n = heads * head_dim, (image_size // patch) ** 2
    shapes = {
        "norm1_scale": (dim,), "norm1_bias": (dim,), "q": (dim, hd), "q_bias": (hd,),
        "k": (dim, hd), "k_bias": (hd,), "v": (dim, hd), "v_bias": (hd,), "o": (hd, dim),
        "o_bias": (dim,), "ls1": (dim,), "norm2_scale": (dim,), "norm2_bias": (dim,),
        "fc1": (dim, ffn), "fc1_bias": (ffn,), "fc2": (ffn, dim), "fc2_bias": (dim,), "ls2": (dim,),
    }  # fmt: skip
    top = [(patch, patch, channels, dim), (dim,), (1, 1, dim), (1, 1 + n, dim), (dim,), (dim,)]
    sizes = [math.prod(s) for s in top] + [math.prod(s) for s in shapes.values()] * depth
    # one draw for the whole tree, cut up on the host: no compiled op per leaf shape
    flat = std * np.asarray(jax.random.normal(key, (sum(sizes),), jnp.float32))
    offsets = iter(np.cumsum([0, *sizes]).tolist())
    start = next(offsets)

    def rnd(shape: tuple[int, ...], mean: float = 0.0) -> Array:
        nonlocal start
        stop = next(offsets)
        out = jnp.asarray((mean + flat[start:stop].reshape(shape)).astype(jnp.dtype(dtype)))
        start = stop
        return out

    ones = ("norm1_scale", "norm2_scale", "ls1", "ls2")
    return {
        "patch": {"kernel": rnd((patch, patch, channels, dim)), "bias": rnd((dim,))},
        "cls": rnd((1, 1, dim)),
        "pos": rnd((1, 1 + n, dim)),
        "final_norm": {"scale": rnd((dim,), 1.0), "bias": rnd((dim,))},
        "layers": [
            {k: rnd(s, 1.0 if k in ones else 0.0) for k, s in shapes.items()} for _ in range(depth)
        ],
    }


def _to_nnx(tree: Any) -> Any:
    if isinstance(tree, dict):
        return nnx.Dict({k: _to_nnx(v) for k, v in tree.items()})
    if isinstance(tree, (list, tuple)):
        return nnx.List([_to_nnx(v) for v in tree])
    return nnx.Param(jnp.asarray(tree))


def _from_nnx(tree: Any) -> Any:
    if isinstance(tree, nnx.Variable):
        return tree[...]
    if isinstance(tree, nnx.List):
        return [_from_nnx(v) for v in tree]
    return {k: _from_nnx(v) for k, v in tree.items()}


class ViT(nnx.Module):
    """A thin nnx wrapper whose call is the pure :func:`forward`; ``params()`` gives the tree back."""

    def __init__(self, params: dict[str, Any], *, head_dim: int = HEAD_DIM, eps: float = LN_EPS):
        self.head_dim, self.eps = head_dim, eps
        self.weights = _to_nnx(params)

    def params(self) -> dict[str, Any]:
        """The plain params tree (list layout) used by the pure functions."""
        return _from_nnx(self.weights)

    def __call__(
        self,
        images: Array,
        lora: dict[str, Any] | None = None,
        masks: dict[str, Any] | None = None,
        lora_scale: float = 1.0,
    ) -> Array:
        return forward(self.params(), images, lora, masks, lora_scale, head_dim=self.head_dim, eps=self.eps)


__all__ = [
    "HEAD_DIM",
    "LN_EPS",
    "LORA_TARGETS",
    "ViT",
    "attention",
    "declaration",
    "features",
    "forward",
    "groups",
    "init_vit",
    "init_vit_lora",
    "layer_norm",
    "patch_embed",
    "widths",
]
