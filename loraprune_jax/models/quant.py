"""An 8-bit frozen base: the seven projections of every layer held as int8 with one float32 scale
per output channel, dequantized inside the compiled step (weight-only: activations, the LoRA
path, the norms, the embedding and the LM head stay in the compute dtype).

A quantized weight is qwix's ``QArray`` (Google's JAX quantization library): a pytree node whose
children are the int8 ``qvalue`` ``(in, out)`` and the ``scale`` ``(1, out)``, with ``.shape``
of the weight, so trees keep their paths, layers stack and scan, and shardings, checkpoints and
``jit`` see two arrays. We use qwix's array type and its numerics (``qwix.dequantize`` in the
step, ``qwix.quantize`` as the reference the tests hold our host quantizer to) but not its
model providers: they intercept flax module calls, while our forward pass is a pure function over
plain pytrees, and its LoRA provider's activation quantization gives wrong LoRA gradients.

Quantization happens on the host before placement, one block of output channels at a time, so a
checkpoint read lazily shard by shard (``io``'s lazy tensors) is never held whole in float: the
scales need each column once; :class:`Int8Slices` then quantizes exactly the slice a device holds.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from ..config import BASE_DTYPES, PROJECTIONS, check_base_dtype

QArray = qwix.QArray
QTYPE = jnp.int8
# qwix's symmetric int8 bound (buckets up to 127.5), as the reciprocal XLA multiplies by
_INV_QMAX = np.float32(1.0) / np.float32(np.iinfo(np.int8).max + 0.5)
_TINY = float(np.sqrt(np.finfo(np.float32).tiny))  # a smaller scale means an all-zero column
_CHUNK_BYTES = 32 * 2**20  # float32 bytes of one block of columns read to compute scales


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a quantized weight (a ``QArray`` node)."""
    return isinstance(x, QArray)


# ----------------------------------------------------------------------------- host side
def _scales(w: Any) -> np.ndarray:
    """``(1, out)`` float32: each output column's largest magnitude over 127.5 (qwix's absmax
    calibration), read a block of columns at a time."""
    rows, cols = w.shape
    block = max(1, _CHUNK_BYTES // max(4 * rows, 1))
    out = np.empty((1, cols), np.float32)
    for c0 in range(0, cols, block):
        part = np.asarray(w[:, c0:c0 + block], np.float32)
        out[0, c0:c0 + block] = np.max(np.abs(part), axis=0, initial=0.0) * _INV_QMAX
    return np.where(out < _TINY, np.float32(1.0), out)


def _quantize_with(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 of ``x`` at ``scale`` as qwix computes it under XLA CPU (times the reciprocal scale,
    rounded half to even, saturating at the int8 range): bit for bit, which the tests check."""
    q = np.round(np.asarray(x, np.float32) * (np.float32(1.0) / scale))
    return np.clip(q, -128, 127).astype(np.int8)


class Int8Slices:
    """The int8 values of a weight ``(in, out)`` computed on demand, slice by slice, from a
    float source (a numpy array or an ``io`` lazy tensor) and its column scales: what
    ``jax.make_array_from_callback`` reads when placing a quantized base on a mesh."""

    def __init__(self, source: Any, scale: np.ndarray) -> None:
        self.source, self.scale = source, scale
        self.shape = tuple(source.shape)
        self.dtype = np.dtype(np.int8)
        self.ndim = len(self.shape)
        self.size = math.prod(self.shape)

    def __getitem__(self, idx: Any) -> np.ndarray:
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis for i in idx) or len(idx) > 2:
            return np.asarray(self)[idx]
        idx = idx + (slice(None),) * (2 - len(idx))
        cols = idx[1] if isinstance(idx[1], slice) else slice(idx[1], idx[1] + 1)
        q = _quantize_with(self.source[idx[0], cols], self.scale[:, cols])
        return q[..., 0] if not isinstance(idx[1], slice) else q

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        q = self[:, :]
        return q if dtype is None else q.astype(dtype)


def quantize_host(w: Any, lazy: bool = False) -> QArray:
    """A ``QArray`` of numpy children for a float weight ``(in, out)`` on the host (numpy or a
    lazy tensor): per-output-channel scales, values saturating at the int8 range. With ``lazy``
    the values stay an :class:`Int8Slices` that quantizes only what is read."""
    if len(w.shape) != 2:
        raise ValueError(f"quantize_host expects an (in, out) weight, got shape {tuple(w.shape)}")
    scale = _scales(w)
    values = Int8Slices(w, scale)
    return QArray(values if lazy else np.asarray(values), scale, None, QTYPE)


def quantize_base(base: dict[str, Any], names: Iterable[str] = PROJECTIONS,
                  lazy: bool = False) -> dict[str, Any]:
    """A host base tree (list layout) with the projections ``names`` of every layer quantized
    (:func:`quantize_host`); embeddings, norms and the LM head are left as they are."""
    names = tuple(names)
    layers = base["layers"]
    if isinstance(layers, dict):
        raise ValueError("quantize_base takes the list layout (quantize before stacking)")
    out_layers = [{k: quantize_host(v, lazy) if k in names and not is_quantized(v) else v
                   for k, v in layer.items()} for layer in layers]
    return {**base, "layers": out_layers}


def dequantize_host(w: Any, dtype: Any = np.float32) -> Any:
    """A float numpy array of a quantized weight (anything else is returned as it is)."""
    if not is_quantized(w):
        return w
    values = np.asarray(w.qvalue, np.float32) * np.asarray(w.scale, np.float32)
    return values.astype(dtype)


def dequantize_base_host(base: dict[str, Any], dtype: Any = np.float32) -> dict[str, Any]:
    """A host base tree with every quantized weight dequantized to ``dtype`` (for slicing,
    merging and the export, which write the dequantized weights)."""
    return jax.tree.map(lambda x: dequantize_host(x, dtype), base, is_leaf=is_quantized)


# ----------------------------------------------------------------------------- in the step
def quantize(w: jax.Array) -> QArray:
    """qwix's int8 quantization of a weight on device, one scale per output channel (the last
    axis; a leading layer axis of a stacked weight keeps its own scales too)."""
    axes = list(range(w.ndim))
    del axes[-2]  # the input axis is reduced; every other axis keeps its own scale
    return qwix.quantize(jnp.asarray(w, jnp.float32), QTYPE, channelwise_axes=axes)


def dequantize(w: Any, dtype: Any = None) -> Any:
    """The float weight (``dtype``: default the scale's, float32) of a quantized one; any other
    array is returned as it is. Inside ``jit`` XLA fuses this into the matmul that reads it."""
    if not is_quantized(w):
        return w
    value = qwix.dequantize(w)
    return value if dtype is None else value.astype(dtype)


# ----------------------------------------------------------------------------- W8A8 (experimental)
_W8A8: contextvars.ContextVar[bool] = contextvars.ContextVar("loraprune_jax_w8a8", default=False)


@contextmanager
def w8a8(enabled: bool = True) -> Iterator[None]:
    """While tracing inside this context, :func:`project` multiplies int8 weights by int8
    activations (one scale per token) with an int32 accumulator, and its gradient is the float
    one (straight through): an experiment measured in ``experiments/int8_base.py``."""
    token = _W8A8.set(enabled)
    try:
        yield
    finally:
        _W8A8.reset(token)


@jax.custom_vjp
def _w8a8_matmul(x: jax.Array, w: QArray) -> jax.Array:
    xq = qwix.quantize(x, QTYPE, channelwise_axes=list(range(x.ndim - 1)))
    return qwix.dot(xq, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _w8a8_fwd(x: jax.Array, w: QArray) -> tuple[jax.Array, QArray]:
    return _w8a8_matmul(x, w), w


def _w8a8_bwd(w: QArray, g: jax.Array) -> tuple[jax.Array, Any]:
    # the float backward: d x = g W^T with the dequantized W; the frozen weight gets none
    zero = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0)
                        if jnp.issubdtype(a.dtype, jnp.integer) else jnp.zeros_like(a), w)
    return g @ dequantize(w, g.dtype).T, zero


_w8a8_matmul.defvjp(_w8a8_fwd, _w8a8_bwd)


def project(x: jax.Array, w: Any) -> jax.Array:
    """``x @ w`` for a float or int8 weight: the int8 one dequantized to ``x``'s dtype (inside
    :func:`w8a8`, int8 x int8 instead)."""
    if not is_quantized(w):
        return x @ w
    if _W8A8.get():
        return _w8a8_matmul(x, w)
    return x @ dequantize(w, x.dtype)


def dequantize_layer(layer: dict[str, Any], dtype: Any = None) -> dict[str, Any]:
    """One layer dict with its quantized projections dequantized (criteria read float ``W``)."""
    return {k: dequantize(v, dtype) for k, v in layer.items()}


def quantize_abstract(w: jax.ShapeDtypeStruct, sharding: Any = None,
                      scale_sharding: Any = None) -> QArray:
    """The ``QArray`` of ``ShapeDtypeStruct`` s of an int8 weight shaped like ``w``, for
    compiling memory plans without allocating."""
    scale_shape = tuple(w.shape[:-2]) + (1, w.shape[-1])
    return QArray(jax.ShapeDtypeStruct(w.shape, np.int8, sharding=sharding),
                  jax.ShapeDtypeStruct(scale_shape, np.float32, sharding=scale_sharding),
                  None, QTYPE)


__all__ = [
    "BASE_DTYPES", "Int8Slices", "QArray", "QTYPE", "check_base_dtype", "dequantize",
    "dequantize_base_host", "dequantize_host", "dequantize_layer", "is_quantized", "project",
    "quantize", "quantize_abstract", "quantize_base", "quantize_host", "w8a8",
]
