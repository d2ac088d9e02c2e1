"""Lazy checkpoint tensors: one safetensors tensor read slice by slice, in our layout and dtype.

A :class:`LazyTensor` stands for a tensor of a safetensors file without reading it. Indexing it
with slices (what ``jax.make_array_from_callback`` passes for each device's shard) reads only the
rows of the file that the slice covers, in chunks of at most :data:`CHUNK_BYTES`, keeps the
selected columns and converts them to the target dtype; so a process placing a checkpoint on a
mesh reads just its own devices' shards, with bounded temporary host memory. Linear weights are
``(out, in)`` on disk and ``(in, out)`` here: an ``(in, out)`` slice is read as the ``(out, in)``
slice of the file and transposed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from loraprune_jax.io.errors import CheckpointError

CHUNK_BYTES = 32 * 2**20  # most bytes of the file held at once while reading a slice


class LazyTensor:
    """One tensor of a safetensors file, read on indexing (``x[idx]``, ``np.asarray(x)``).

    ``path``/``offset``: the file and the absolute byte offset of the tensor's data;
    ``disk_shape``/``disk_dtype``: as stored (row-major); ``transposed``: a 2-D tensor whose
    axes are swapped in our layout; ``dtype``: what reads are converted to. ``bytes_read``
    counts the file bytes read so far (reads are bounded by the slices asked for).
    """

    def __init__(self, path: str | os.PathLike[str], offset: int, disk_shape: tuple[int, ...],
                 disk_dtype: Any, transposed: bool = False, dtype: Any = None) -> None:
        self.path = Path(path)
        self.offset = int(offset)
        self.disk_shape = tuple(int(s) for s in disk_shape)
        self.disk_dtype = np.dtype(disk_dtype)
        if transposed and len(self.disk_shape) != 2:
            raise ValueError(f"{self.path}: only 2-D tensors can be transposed, got {self.disk_shape}")
        self.transposed = transposed
        self.dtype = np.dtype(self.disk_dtype if dtype is None else dtype)
        self.shape = self.disk_shape[::-1] if transposed else self.disk_shape
        self.ndim = len(self.shape)
        self.size = math.prod(self.shape)
        self.nbytes = self.size * self.dtype.itemsize
        self.bytes_read = 0

    def __repr__(self) -> str:
        t = ", transposed" if self.transposed else ""
        return f"LazyTensor({self.path.name}, shape={self.shape}, dtype={self.dtype}{t})"

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d LazyTensor")
        return self.shape[0]

    def astype(self, dtype: Any) -> LazyTensor:
        """The same tensor read as ``dtype`` (nothing is read now)."""
        return LazyTensor(self.path, self.offset, self.disk_shape, self.disk_dtype,
                          self.transposed, dtype)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError(f"{self.path}: a LazyTensor is read from its file; it cannot be viewed without a copy")
        out = self[...]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, idx: Any) -> np.ndarray:
        slices, drop = _normalize(idx, self.shape)
        out_shape = tuple(len(range(*s.indices(n))) for s, n in zip(slices, self.shape))
        out = np.empty(out_shape, self.dtype)
        if not self.ndim:  # a scalar: the one element of a 1-element view of the same bytes
            one = LazyTensor(self.path, self.offset, (1,), self.disk_dtype, False, self.dtype)
            out[...] = one[0]
            self.bytes_read += one.bytes_read
        elif out.size:
            disk = slices[::-1] if self.transposed else slices
            self._read(disk, out.T if self.transposed else out)
        return out.reshape(tuple(n for n, d in zip(out_shape, drop) if not d))

    def _read(self, disk: list[slice], out: np.ndarray) -> None:
        """Fill ``out`` (a view in disk order) with ``file[disk]``, a chunk of rows at a time."""
        rows = range(*disk[0].indices(self.disk_shape[0]))
        inner = self.disk_shape[1:]
        row_bytes = max(1, math.prod(inner)) * self.disk_dtype.itemsize
        span = max(1, CHUNK_BYTES // row_bytes)  # file rows per read
        per_read = max(1, (span - 1) // rows.step + 1)  # selected rows per read
        rest = tuple(disk[1:])
        with open(self.path, "rb") as f:
            for j in range(0, len(rows), per_read):
                chosen = rows[j:j + per_read]
                first, last = chosen[0], chosen[-1]
                n = last - first + 1
                start = self.offset + first * row_bytes
                buf = os.pread(f.fileno(), n * row_bytes, start)
                self.bytes_read += len(buf)
                if len(buf) != n * row_bytes:
                    raise CheckpointError(self.path, f"truncated safetensors file: wanted "
                                          f"{n * row_bytes} bytes at {start}, got {len(buf)}")
                block = np.frombuffer(buf, self.disk_dtype).reshape((n,) + inner)
                out[j:j + len(chosen)] = block[(slice(None, None, rows.step),) + rest].astype(self.dtype)
                del buf, block


def _normalize(idx: Any, shape: tuple[int, ...]) -> tuple[list[slice], list[bool]]:
    """``idx`` (slices, ints, ``...``, a partial tuple) as one slice per axis with a positive
    step, and which axes an integer index drops."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if sum(i is Ellipsis for i in items) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if Ellipsis in items:
        k = items.index(Ellipsis)
        items[k:k + 1] = [slice(None)] * (len(shape) - len(items) + 1)
    if len(items) > len(shape):
        raise IndexError(f"too many indices for a tensor of shape {shape}: {idx!r}")
    items += [slice(None)] * (len(shape) - len(items))
    slices, drop = [], []
    for item, n in zip(items, shape):
        if isinstance(item, slice):
            start, stop, step = item.indices(n)
            if step < 0:
                raise IndexError(f"LazyTensor supports only positive slice steps, got {item!r}")
            slices.append(slice(start, max(start, stop), step))
            drop.append(False)
        elif isinstance(item, (int, np.integer)):
            i = int(item) + n if int(item) < 0 else int(item)
            if not 0 <= i < n:
                raise IndexError(f"index {int(item)} is out of bounds for an axis of size {n}")
            slices.append(slice(i, i + 1, 1))
            drop.append(True)
        else:
            raise IndexError(f"LazyTensor takes slices, integers and '...', got {item!r}")
    return slices, drop


def materialize(tree: Any) -> Any:
    """``tree`` with every :class:`LazyTensor` read into a numpy array, one tensor at a time
    (for host code that needs whole arrays); other leaves are returned as they are."""
    return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, LazyTensor) else x, tree)


__all__ = ["CHUNK_BYTES", "LazyTensor", "materialize"]
