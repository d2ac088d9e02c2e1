"""A VGG-style CIFAR-10 CNN (the Keras ``cifar-10-model``): pure forward over (params, lora,
masks) pytrees, LoRA for convolutions, and the prunable output-channel groups of each conv.

Every conv block is ``conv (stride 1) -> ReLU -> BatchNorm (inference: moving statistics) ->
channel mask -> max-pool``; then the NHWC feature map is flattened (channel fastest, as Keras'
``Flatten`` with ``channels_last``) into dense layers. Dropout is off (inference). Channel widths
come from the parameter shapes, so a channel-sliced tree runs unchanged; the layer structure
that has no parameters (pooling, padding, activations, BN epsilon) is the static
:class:`CnnConfig`.

Params tree (Flax layouts: conv kernels HWIO ``(kh, kw, in, out)``, dense kernels ``(in, out)``)::

    {"convs": [{"kernel": (kh, kw, in, out), "bias": (out,), "bn_gamma": (out,),
                "bn_beta": (out,), "bn_mean": (out,), "bn_var": (out,)}, ...],
     "dense": [{"kernel": (in, out), "bias": (out,)}, ...]}

LoRA tree (the paths of the adapted kernels, as for every model here)::

    {"convs": [{"kernel": {"a": (kh, kw, in, r), "b": (r, out)}}, ...],  # conv to r, then 1x1
     "dense": [{"kernel": {"a": (in, r), "b": (r, out)}}, ...]}          # only when targeted

so the merged conv kernel is ``kernel + scale * a @ b`` (matmul broadcasts over ``kh, kw``),
which :func:`loraprune_jax.core.lora.merge_pair` and
:func:`loraprune_jax.core.importance.estimate_weight_grad` already compute for 4-D ``a``.

Masks: ``{"layers": [{"channels": (out,)} per conv]}``, multiplying each conv block's output
after BN, so a zero channel contributes nothing downstream: masking equals slicing it away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from ..core.groups import Coupling, GroupKind
from ..core.lora import init_pair, lora_linear

Array = jax.Array
CONV_KEYS = ("kernel", "bias", "bn_gamma", "bn_beta", "bn_mean", "bn_var")
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


@dataclass(frozen=True)
class CnnConfig:
    """The parameter-free structure of the CNN.

    ``pools[i]``: max-pool window (= stride) after conv ``i`` (1: none); ``dense_relu[j]``:
    whether dense layer ``j`` has a ReLU (the Keras model has one even on its logits);
    ``padding``: ``"VALID"`` or ``"SAME"`` for every conv. Inputs are float pixels in
    ``[0, 255]``: the Keras model was trained on raw ``uint8`` CIFAR-10 without rescaling.
    """

    pools: tuple[int, ...] = (1, 2, 1, 2, 1, 1)
    dense_relu: tuple[bool, ...] = (True, True, True)
    bn_eps: float = 1e-3
    padding: str = "VALID"
    image_size: int = 32
    in_channels: int = 3


CIFAR10_CNN = CnnConfig()


# ----------------------------------------------------------------------------- primitives
def conv2d(x: Array, kernel: Array, padding: str = "VALID") -> Array:
    """Stride-1 convolution of NHWC ``x`` with an HWIO ``kernel``."""
    return jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def lora_conv(
    x: Array,
    kernel: Array,
    bias: Array | None,
    pair: dict[str, Array] | None,
    scale: float,
    padding: str = "VALID",
) -> Array:
    """``conv(x, kernel) + bias + scale * conv1x1(conv(x, a), b)``, never forming the merged kernel.

    ``a: (kh, kw, in, r)`` is a conv with ``r`` output channels, ``b: (r, out)`` a 1x1 conv (a
    matmul over the channel axis); together they equal a conv with ``kernel + scale * a @ b``.
    """
    y = conv2d(x, kernel, padding)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    if pair is None:
        return y
    low = conv2d(x, pair["a"], padding)
    return y + (scale * (low @ pair["b"].astype(low.dtype))).astype(y.dtype)


def batch_norm(x: Array, conv: dict[str, Array], eps: float) -> Array:
    """Inference BatchNorm over the last axis with the moving statistics (Keras' formula)."""
    inv = conv["bn_gamma"] * jax.lax.rsqrt(conv["bn_var"] + eps)
    return (x - conv["bn_mean"]) * inv + conv["bn_beta"]


def max_pool(x: Array, size: int) -> Array:
    """``size x size`` max-pool with stride ``size``, VALID (identity for ``size == 1``)."""
    if size == 1:
        return x
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, size, size, 1), "VALID"
    )


# ----------------------------------------------------------------------------- model
def check_params(params: dict[str, Any], config: CnnConfig = CIFAR10_CNN) -> None:
    """Raise ``ValueError`` if ``params`` does not fit ``config`` or its widths do not chain."""
    convs, dense = params["convs"], params["dense"]
    if len(convs) != len(config.pools) or len(dense) != len(config.dense_relu):
        raise ValueError(
            f"params have {len(convs)} convs and {len(dense)} dense layers, config "
            f"{len(config.pools)} and {len(config.dense_relu)}"
        )
    width = config.in_channels
    for i, c in enumerate(convs):
        k = c["kernel"]
        if k.ndim != 4 or k.shape[2] != width:
            raise ValueError(f"conv {i}: kernel {k.shape} does not take {width} input channels")
        width = k.shape[3]
        bad = [name for name in CONV_KEYS[1:] if c[name].shape != (width,)]
        if bad:
            raise ValueError(f"conv {i}: {bad} are not of shape ({width},)")
    flat = width * spatial_positions(params, config)
    for j, d in enumerate(dense):
        if d["kernel"].shape[0] != flat or d["bias"].shape != d["kernel"].shape[1:]:
            raise ValueError(f"dense {j}: kernel {d['kernel'].shape} does not take {flat} inputs")
        flat = d["kernel"].shape[1]


def spatial_positions(params: dict[str, Any], config: CnnConfig = CIFAR10_CNN) -> int:
    """Spatial positions (``H * W``) of the last feature map: flattened rows per channel."""
    h = w = config.image_size
    for conv, pool in zip(params["convs"], config.pools):
        if config.padding == "VALID":
            h, w = h - conv["kernel"].shape[0] + 1, w - conv["kernel"].shape[1] + 1
        h, w = h // pool, w // pool
    return h * w


def forward(
    params: dict[str, Any],
    images_nhwc: Array,
    lora: dict[str, Any] | None = None,
    masks: dict[str, Any] | None = None,
    lora_scale: float = 1.0,
    config: CnnConfig = CIFAR10_CNN,
) -> Array:
    """Logits ``(B, classes)`` of float pixel images ``(B, H, W, 3)`` in ``[0, 255]``.

    ``lora`` (see the module docstring) adds ``lora_scale * a @ b`` to the targeted kernels
    without merging; ``masks`` zero conv output channels after BN (with a batch axis, ``(B, C)``,
    they gate each example's channels on its own).
    """
    x = jnp.asarray(images_nhwc, jnp.float32)
    lora_convs = (lora or {}).get("convs")
    lora_dense = (lora or {}).get("dense")
    for i, (conv, pool) in enumerate(zip(params["convs"], config.pools)):
        pair = (lora_convs[i] or {}).get("kernel") if lora_convs is not None else None
        x = lora_conv(x, conv["kernel"], conv["bias"], pair, lora_scale, config.padding)
        x = batch_norm(jax.nn.relu(x), conv, config.bn_eps)
        if masks is not None:  # (C,), or (B, C) per-example gates (core.gates)
            m = masks["layers"][i]["channels"].astype(x.dtype)
            x = x * (m if m.ndim == 1 else m[:, None, None, :])
        x = max_pool(x, pool)
    x = x.reshape(x.shape[0], -1)  # NHWC flatten: channel fastest, as Keras' Flatten
    for j, (dense, relu) in enumerate(zip(params["dense"], config.dense_relu)):
        pair = (lora_dense[j] or {}).get("kernel") if lora_dense is not None else None
        x = lora_linear(x, dense["kernel"], pair, lora_scale) + dense["bias"]
        if relu:
            x = jax.nn.relu(x)
    return x


# ----------------------------------------------------------------------------- LoRA and masks
def init_cnn_lora(
    key: Array,
    params: dict[str, Any],
    rank: int,
    alpha: float,
    targets: Sequence[str] = ("convs",),
    dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """LoRA pairs for every layer of the targeted lists (``"convs"``, ``"dense"``).

    ``A`` is Kaiming-uniform (``a = sqrt(5)``, bound ``1 / sqrt(fan_in)`` with
    ``fan_in = kh * kw * in`` for convs, as PyTorch's ``Conv2d``), ``B`` zero, so the adapted
    model starts equal to the base. ``alpha`` does not enter the initialisation; pass
    ``lora_scale = alpha / rank`` to :func:`forward`.
    """
    del alpha  # the scale alpha / rank is applied in the forward pass
    out: dict[str, Any] = {}
    for target in targets:
        if target not in ("convs", "dense"):
            raise ValueError(f"unknown LoRA target {target!r}: use 'convs' and/or 'dense'")
        layers = params[target]
        keys = jax.random.split(jax.random.fold_in(key, ("convs", "dense").index(target)), len(layers))
        pairs = []
        for k, layer in zip(keys, layers):
            pairs.append({"kernel": init_pair(k, layer["kernel"].shape, rank, dtype)})
        out[target] = pairs
    return out


def init_cnn_masks(params: dict[str, Any], dtype: Any = jnp.float32) -> dict[str, Any]:
    """All-ones channel masks ``{"layers": [{"channels": (out,)} per conv]}``."""
    return {"layers": [{"channels": jnp.ones((c["bias"].shape[0],), dtype)} for c in params["convs"]]}


def cnn_declaration(params: dict[str, Any]) -> list[dict[str, GroupKind]]:
    """Every conv's groups as ``[{"channels": GroupKind}, ...]``, the mask layers' layout."""
    return [{"channels": groups(params, i)} for i in range(len(params["convs"]))]


# ----------------------------------------------------------------------------- prunable groups
def groups(params: dict[str, Any], i: int) -> GroupKind:
    """The output channels of conv ``i`` as prunable groups, with every array they couple to.

    Conv ``i``'s kernel (axis 3), bias and BN vectors (axis 0), and the next layer's inputs:
    the next conv's kernel (axis 2) or, for the last conv, the first dense kernel's rows. Those
    rows are contiguous per channel only when the last feature map is 1x1 (the NHWC flatten is
    channel fastest); otherwise ``NotImplementedError``.
    """
    convs = params["convs"]
    if not 0 <= i < len(convs):
        raise IndexError(f"conv {i} out of range: the model has {len(convs)} convs")
    out = convs[i]["kernel"].shape[3]
    couplings = [Coupling(("convs", i, "kernel"), 3)]
    couplings += [Coupling(("convs", i, name), 0) for name in CONV_KEYS[1:]]
    if i + 1 < len(convs):
        couplings.append(Coupling(("convs", i + 1, "kernel"), 2))
    else:
        rows = params["dense"][0]["kernel"].shape[0]
        if rows != out:
            raise NotImplementedError(
                f"conv {i} feeds a {rows // out}-position feature map into the first dense layer: "
                "its NHWC flatten interleaves the channels (channel fastest), so a channel's rows "
                "are strided, not a contiguous group; only a 1x1 last feature map is supported"
            )
        couplings.append(Coupling(("dense", 0, "kernel"), 0))
    return GroupKind(size=out, couplings=tuple(couplings))


__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_CNN",
    "CnnConfig",
    "batch_norm",
    "check_params",
    "cnn_declaration",
    "conv2d",
    "forward",
    "groups",
    "init_cnn_lora",
    "init_cnn_masks",
    "lora_conv",
    "max_pool",
    "merge_cnn_lora",
    "spatial_positions",
]
