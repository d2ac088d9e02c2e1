"""Structured groups, declared per model family: which slices of which weights each group owns.

A *group kind* of a layer (LLaMA: attention units and MLP channels; a ViT: heads and MLP
channels; a CNN: a convolution's output channels) has ``size`` groups, and every weight it
couples is named by a :class:`Coupling`: a path into the model's parameter tree, the axis along
which the groups lie and how many consecutive entries each group owns there. A model family
declares its groups as one ``{kind: GroupKind}`` dict per mask layer; scoring
(:func:`group_scores`), masks (:func:`declared_masks`) and slicing (``pruning.slicing``) work from
that declaration alone, so LLaMA, ViT and CNN share one mechanism.

For LLaMA an attention *unit* is one KV head together with the query heads that share it: for
multi-head attention (``kv_heads == heads``) that is exactly one head, for grouped-query
attention one KV group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from ..config import LlamaConfig

Array = jax.Array
Path = tuple[Any, ...]

ATTN_OUT = ("q", "k", "v")  # projections whose output columns an attention unit owns
ATTN_IN = ("o",)  # projections whose input rows an attention unit owns
MLP_OUT = ("gate", "up")
MLP_IN = ("down",)
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


_MISSING = object()


def at_path(tree: Any, path: Path, default: Any = _MISSING) -> Any:
    """The node at ``path`` (dict keys and list indices) of a parameter, LoRA or score tree;
    ``default`` when given and the path does not exist."""
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


def declared_masks(declaration: Declaration, dtype: Any = jnp.float32) -> dict[str, Any]:
    """All-ones masks for a declaration: ``{"layers": [{kind: (size,)}, ...]}``."""
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


# LLaMA's declaration ---------------------------------------------------------------------
def llama_layer_groups(heads: int, kv_heads: int, head_dim: int, ffn: int,
                       prefix: Path = ()) -> dict[str, GroupKind]:
    """One LLaMA layer's groups: KV units own q columns (and o rows) of their ``heads/kv_heads``
    query heads and the k/v columns of their KV head; MLP channels own a gate/up column and a
    down row. ``prefix`` is the layer's path in the tree (``()`` for a lone layer dict)."""
    g = heads // kv_heads if kv_heads else 0
    q_width = max(g * head_dim, 1)

    def at(name: str, axis: int, width: int = 1) -> Coupling:
        return Coupling((*prefix, name), axis, width)

    return {
        "attn": GroupKind(kv_heads, (at("q", 1, q_width), at("k", 1, head_dim),
                                     at("v", 1, head_dim), at("o", 0, q_width))),
        "mlp": GroupKind(ffn, (at("gate", 1), at("up", 1), at("down", 0))),
    }


def llama_groups(config: LlamaConfig, layer: int) -> dict[str, GroupKind]:
    """The groups of LLaMA layer ``layer`` with paths into a list-layout base tree."""
    return llama_layer_groups(config.heads(layer), config.kv_heads(layer), config.head_dim,
                              config.ffn(layer), prefix=("layers", layer))


def llama_declaration(config: LlamaConfig) -> list[dict[str, GroupKind]]:
    """Every layer's groups (list layout)."""
    return [llama_groups(config, i) for i in range(config.num_layers)]


def num_units(config: LlamaConfig, layer: int) -> int:
    """Attention units of a layer: KV heads (equal to heads for MHA)."""
    return config.kv_heads(layer)


def init_masks(config: LlamaConfig, stacked: bool = False, dtype: Any = jnp.float32) -> dict[str, Any]:
    """All-ones LLaMA masks: ``{"layers": [{"attn": (units,), "mlp": (ffn,)}, ...]}``.

    With ``stacked=True`` (uniform widths only) the layer vectors are stacked on a leading axis,
    matching a stacked base tree.
    """
    masks = declared_masks(llama_declaration(config), dtype)
    if stacked:
        if not config.is_uniform:
            raise ValueError("stacked masks need uniform layer widths")
        return {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *masks["layers"])}
    return masks


def expand_unit_mask(mask: Array, heads: int, kv_heads: int, head_dim: int) -> dict[str, Array]:
    """Column masks for q, k and v (and row mask for o) from a per-unit mask of length kv_heads."""
    q_per_unit = (heads // kv_heads) * head_dim if kv_heads else 0
    q_cols = jnp.repeat(mask, q_per_unit, total_repeat_length=heads * head_dim)
    kv_cols = jnp.repeat(mask, head_dim, total_repeat_length=kv_heads * head_dim)
    return {"q": q_cols, "k": kv_cols, "v": kv_cols, "o": q_cols}
