"""Pytree plumbing shared by the core: paths into nested dicts and lists, layer lists, arrays
rebuilt like a template, and the layers a ratio applies to.

A *path* is a tuple of dict keys and list indices (``("layers", 3, "q")``, or
``("fc1", "kernel")`` in a flax.nnx state turned into a pure dict), so any model's parameter tree
can be addressed without renaming it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Path = tuple[Any, ...]

_MISSING = object()


def at_path(tree: Any, path: Path, default: Any = _MISSING) -> Any:
    """The node at ``path`` of a parameter, LoRA or score tree; ``default`` when given and the path
    does not exist (or ends at ``None``)."""
    node = tree
    for key in path:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            if default is _MISSING:
                raise KeyError(f"no {path} in the tree (failed at {key!r})") from None
            return default
        if node is None and default is not _MISSING:
            return default
    return node


def set_at_path(tree: Any, path: Path, value: Any) -> None:
    """Replace the node at ``path`` in place (the containers must be fresh copies)."""
    at_path(tree, path[:-1])[path[-1]] = value


def fresh(tree: Any) -> Any:
    """New dicts and lists (in their order) over the same leaves, so :func:`set_at_path` leaves
    the input untouched."""
    if isinstance(tree, dict):
        return {k: fresh(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [fresh(v) for v in tree]
    return tree


def unstack(tree: Any) -> Any:
    """``tree`` with a stacked ``{"layers": {name: (L, ...)}}`` turned into a list of per-layer
    dicts (a list layout is returned as it is)."""
    layers = tree["layers"]
    if not isinstance(layers, dict):
        return tree
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**tree, "layers": [jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)]}


def like(template: Any, value: np.ndarray) -> Any:
    """``value`` as the same kind of array as ``template``: dtype, shape, and for jax arrays the
    sharding and committed-ness, so a jitted function taking it does not recompile."""
    value = np.asarray(value, dtype=template.dtype).reshape(template.shape)
    if isinstance(template, jax.Array):
        if getattr(template, "committed", True):
            # per process on multi-host meshes: each process fills its addressable shards
            return jax.make_array_from_callback(value.shape, template.sharding, lambda i: value[i])
        return jnp.asarray(value)
    return value


def active_layers(num_layers: int, excluded: Iterable[int]) -> list[int]:
    """The layers not in ``excluded`` (negative indices count from the end); an out-of-range
    index raises ``ValueError``."""
    skip = set()
    for i in excluded:
        j = int(i) + num_layers if int(i) < 0 else int(i)
        if not 0 <= j < num_layers:
            raise ValueError(f"excluded layer {i} is out of range for {num_layers} layers")
        skip.add(j)
    return [i for i in range(num_layers) if i not in skip]


def excluded_layers(num_layers: int, first_fraction: float = 0.1, last: bool = True) -> tuple[int, ...]:
    """Layers never pruned by default (method.md): index ``< int(first_fraction * L)``, and the
    last one when ``last``."""
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    if not 0.0 <= first_fraction <= 1.0:
        raise ValueError(f"first_fraction must be in [0, 1], got {first_fraction}")
    out = set(range(int(first_fraction * num_layers)))
    if last and num_layers > 0:
        out.add(num_layers - 1)
    return tuple(sorted(out))


def count_params(tree: Any) -> int:
    """Number of parameters in a tree (a tied weight held once is counted once)."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))
