"""Structured groups, declared per model family: which slices of which weights each group owns.

A *group kind* of a layer (LLaMA: attention units and MLP channels; a ViT: heads and MLP
channels; a CNN: a convolution's output channels) has ``size`` groups, and every weight it
couples is named by a :class:`Coupling`: a path into the model's parameter tree, the axis along
which the groups lie and how many consecutive entries each group owns there. A model family
declares its groups as one ``{kind: GroupKind}`` dict per mask layer; scoring
(``core.criteria``), masks (:func:`declared_masks`, ``core.masks``) and slicing (``core.slicing``)
work from that declaration alone, so LLaMA, ViT, CNN and a user's own model share one mechanism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from .trees import Path, at_path

Array = jax.Array
EPS = 1e-8


@dataclass(frozen=True)
class Coupling:
    """One weight coupled to a group kind: ``width`` consecutive entries per group along ``axis``
    of the array at ``path`` (a tuple of dict keys and list indices into the parameter tree)."""

    path: Path
    axis: int
    width: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.path, tuple) or not self.path:
            raise ValueError(f"a coupling's path must be a non-empty tuple, got {self.path!r}")
        if self.width < 1:
            raise ValueError(f"coupling {self.path}: width must be >= 1, got {self.width}")


@dataclass(frozen=True)
class GroupKind:
    """``size`` prunable groups and the weights they couple (scored ones first by convention)."""

    size: int
    couplings: tuple[Coupling, ...]

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"a group kind's size must be >= 0, got {self.size}")


Declaration = Sequence[Mapping[str, GroupKind]]  # one {kind: GroupKind} per mask layer


def declared_masks(declaration: Declaration, dtype: Any = jnp.float32) -> dict[str, Any]:
    """All-ones masks for a declaration: ``{"layers": [{kind: (size,)}, ...]}`` (layers may hold
    different kinds)."""
    return {"layers": [{kind: jnp.ones((g.size,), dtype) for kind, g in layer.items()}
                       for layer in declaration]}


def normalize(v: Array) -> Array:
    """Divide a module's group-score vector by its L2 norm (+1e-8)."""
    return v / (jnp.linalg.norm(v) + EPS)


def group_scores(element_scores: Mapping[Path, Array], kinds: Mapping[str, GroupKind]) -> dict[str, Array]:
    """One score per group of each kind, from element scores keyed by coupling path.

    Each coupled weight that has element scores is summed over every axis but its coupling axis,
    then over each group's consecutive entries, and L2-normalised; a kind's score is the sum of
    these vectors over its couplings (method.md section 3). Couplings without element scores
    (biases, norm statistics) do not vote; a kind with none gets zeros.
    """
    out = {}
    for kind, spec in kinds.items():
        vectors = []
        for c in spec.couplings:
            s = element_scores.get(c.path)
            if s is None:
                continue
            axis = c.axis % s.ndim
            per = jnp.sum(s, axis=tuple(a for a in range(s.ndim) if a != axis))
            if per.shape[0] != spec.size * c.width:
                raise ValueError(f"{kind!r} coupling {c.path}: axis {c.axis} has {per.shape[0]} "
                                 f"entries, expected {spec.size} groups x {c.width}")
            vectors.append(normalize(per.reshape(spec.size, c.width).sum(axis=-1)))
        out[kind] = sum(vectors[1:], vectors[0]) if vectors else jnp.zeros((spec.size,), jnp.float32)
    return out


def expand_mask(mask: Array, width: int) -> Array:
    """A group mask ``(..., n)`` as a mask over the ``n * width`` entries the groups own along a
    coupling's axis (``width`` consecutive entries per group)."""
    return jnp.repeat(mask, width, axis=-1, total_repeat_length=mask.shape[-1] * width)


def check_declaration(params: Any, declaration: Declaration) -> None:
    """Raise ``ValueError`` naming the first coupling whose path is missing from ``params`` or
    whose axis does not hold ``size x width`` entries."""
    for i, kinds in enumerate(declaration):
        for kind, g in kinds.items():
            for c in g.couplings:
                try:
                    w = at_path(params, c.path)
                except KeyError:
                    raise ValueError(f"layer {i} {kind!r}: no parameter at {c.path}") from None
                n = w.shape[c.axis % w.ndim] if w.ndim else 0
                if n != g.size * c.width:
                    raise ValueError(f"layer {i} {kind!r}: {c.path} has {n} entries on axis "
                                     f"{c.axis}, the declaration {g.size} groups x {c.width}")
