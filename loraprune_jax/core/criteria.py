"""Pruning criteria: one registry, and one scoring path from a model's declared groups.

Every criterion is a :class:`Criterion` in :data:`REGISTRY`, defined once; the config checks, the
CLI and every model family read it. A weight criterion scores each coupled weight element by
element (:func:`element_scores`), and :func:`group_scores_of` reduces those to one score per group
of a layer's declared kinds (``core.groups``), so LLaMA, ViT, CNN and a user's own flax model are
scored by the same code, one layer at a time. A gate criterion scores groups from the gradients of
gates on their outputs (``core.gates``) inside the train step.

``lora`` (the paper): LoRA-estimated weight gradient times the merged weight. ``vanilla``: the
true gradient of the frozen weight times the merged weight (the cost LoRAPrune avoids).
``magnitude``: the merged weight. ``wanda``: merged weight times the L2 norm of its input feature
over the batch. ``random``: uniform noise per group (per element for element-wise masks).
``fisher`` / ``taylor``: squared / signed gate gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from . import gates as _gates
from .groups import Declaration, GroupKind, group_scores
from .importance import lora_guided_importance
from .lora import OURS, LoraLayout, merge_pair, pair_at
from .trees import Path, at_path

Array = jax.Array

# what a trainer can hand a criterion: the LoRA gradients, the frozen weights' gradients, the
# inputs' sums of squares per feature, a PRNG key, gate gradients
INPUTS = ("lora_grads", "weight_grads", "input_stats", "key", "gates")
_WHAT = {"lora_grads": "LoRA adapters and their gradients",
         "weight_grads": "the gradients of the frozen weights",
         "input_stats": "input activation statistics", "key": "a PRNG key"}


@dataclass(frozen=True)
class Weight:
    """What a criterion sees of one coupled weight: the weight, its LoRA pair and pair gradients
    (None without a pair), its own gradient and its input's per-feature sum of squares."""

    w: Array
    pair: tuple[Array, Array] | None
    pair_grads: tuple[Array, Array] | None
    grad: Array | None
    input_stat: Array | None
    scale: float
    power: int

    def merged(self) -> Array:
        return merge_pair(self.w.astype(jnp.float32), self.pair, self.scale)

    def pw(self, x: Array) -> Array:
        return x if self.power == 1 else x**self.power


@dataclass(frozen=True)
class Criterion:
    """One criterion: what it needs, and how it scores a weight (``element``: None when the weight
    does not vote, e.g. a bias) or a layer's groups directly (``groups``, for ``random``), or how
    one micro-batch's gate gradients become scores (``gate_statistic``, homogeneous of degree
    ``gate_power`` in the gradients, so a mean over micro-batches divides by ``accum**gate_power``).
    ``rank`` maps the moving average to what masks are ranked by; ``ema_beta`` is its default
    decay."""

    name: str
    summary: str
    needs: frozenset[str]
    element: Callable[[Weight], Array | None] | None = None
    groups: Callable[[Mapping[str, GroupKind], Array], dict[str, Array]] | None = None
    gate_statistic: Callable[[Any], Any] | None = None
    rank: Callable[[Array], Array] | None = None
    ema_beta: float = 0.9
    gate_power: int = 1

    @property
    def gated(self) -> bool:
        """Whether it scores groups through gate gradients (it has no weight scores)."""
        return self.gate_statistic is not None


def _lora(x: Weight) -> Array | None:
    if x.pair is None:
        return None  # only weights with a LoRA pair can be scored from LoRA gradients
    (a, b), (ga, gb) = x.pair, x.pair_grads
    return lora_guided_importance(x.w, a, b, ga, gb, x.scale, x.power)


def _vanilla(x: Weight) -> Array | None:
    if x.w.ndim < 2:
        return None
    if x.grad is None:
        raise ValueError("the vanilla criterion needs the gradient of every scored weight")
    return x.pw(jnp.abs(x.grad.astype(jnp.float32) * x.merged()))


def _magnitude(x: Weight) -> Array | None:
    return x.pw(jnp.abs(x.merged())) if x.w.ndim >= 2 else None


def _wanda(x: Weight) -> Array | None:
    if x.w.ndim < 2:
        return None
    if x.input_stat is None:
        raise ValueError("the wanda criterion needs the input statistics of every scored weight")
    norm = jnp.sqrt(x.input_stat.astype(jnp.float32))
    return x.pw(jnp.abs(x.merged()) * norm[:, None])


def _random_groups(kinds: Mapping[str, GroupKind], key: Array) -> dict[str, Array]:
    keys = jax.random.split(key, max(len(kinds), 1))
    return {kind: jax.random.uniform(k, (g.size,)) for k, (kind, g) in zip(keys, kinds.items())}


REGISTRY: dict[str, Criterion] = {c.name: c for c in (
    Criterion("lora", "LoRA-estimated gradient x merged weight (the paper)",
              frozenset({"lora_grads"}), element=_lora),
    Criterion("vanilla", "true gradient of the frozen weight x merged weight",
              frozenset({"weight_grads"}), element=_vanilla),
    Criterion("magnitude", "merged weight magnitude", frozenset(), element=_magnitude),
    Criterion("random", "uniform noise per group (per weight for element masks)",
              frozenset({"key"}), groups=_random_groups),
    Criterion("wanda", "merged weight x L2 norm of its input feature",
              frozenset({"input_stats"}), element=_wanda),
    Criterion("fisher", "empirical Fisher: sum over examples of squared gate gradients",
              frozenset({"gates"}), gate_statistic=_gates.fisher_statistic, ema_beta=0.99,
              gate_power=2),
    Criterion("taylor", "first-order Taylor: signed gate gradient, ranked by magnitude",
              frozenset({"gates"}), gate_statistic=_gates.taylor_statistic, rank=jnp.abs,
              ema_beta=0.99),
)}
CRITERIA = tuple(REGISTRY)
GATE_CRITERIA = tuple(name for name, c in REGISTRY.items() if c.gated)


def get_criterion(name: str) -> Criterion:
    """The registered criterion ``name``; ``ValueError`` listing the choices otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown criterion {name!r}; choose from {', '.join(CRITERIA)}") from None


def criteria_given(inputs: Sequence[str]) -> tuple[str, ...]:
    """The criteria a trainer providing ``inputs`` (names from :data:`INPUTS`) can run."""
    return tuple(name for name, c in REGISTRY.items() if c.needs <= set(inputs))


def is_gate_criterion(name: str) -> bool:
    """Whether ``name`` scores groups through gate gradients (``fisher``, ``taylor``)."""
    return get_criterion(name).gated


def gate_statistic(name: str, gate_grads: Any) -> Any:
    """One micro-batch's contribution to a gate criterion's new scores, shaped like the masks."""
    c = get_criterion(name)
    if not c.gated:
        raise ValueError(f"{name!r} is not a gate criterion; choose from {', '.join(GATE_CRITERIA)}")
    return c.gate_statistic(gate_grads)


def ranking_scores(name: str, scores: Any) -> Any:
    """The scores masks are ranked by (``taylor`` ranks its signed average by magnitude)."""
    rank = get_criterion(name).rank
    return scores if rank is None else jax.tree.map(rank, scores)


# Scoring -------------------------------------------------------------------------------------
def _scorer(name: str, given: Mapping[str, Any]) -> Criterion:
    c = get_criterion(name)
    if c.gated:
        raise ValueError(f"the {name} criterion scores whole groups through gates on their outputs "
                         "inside the train step (core.gates); it has no weight scores")
    missing = [_WHAT[n] for n in sorted(c.needs) if given.get(n) is None]
    if missing:
        raise ValueError(f"the {name} criterion needs {' and '.join(missing)}")
    return c


def _weight(params: Any, lora: Any, path: Path, *, lora_grads: Any, weight_grads: Any,
            input_stats: Mapping[Path, Array] | None, scale: float, power: int,
            layout: LoraLayout) -> Weight:
    pair = pair_at(lora, path, layout)
    return Weight(
        w=at_path(params, path), pair=pair,
        pair_grads=pair_at(lora_grads, path, layout) if pair is not None else None,
        grad=at_path(weight_grads, path, None) if weight_grads is not None else None,
        input_stat=input_stats.get(path) if input_stats is not None else None,
        scale=scale, power=power)


def element_scores(
    criterion: str,
    params: Any,
    lora: Any,
    paths: Sequence[Path],
    *,
    scale: float,
    power: int = 1,
    lora_grads: Any = None,
    weight_grads: Any = None,
    input_stats: Mapping[Path, Array] | None = None,
    key: Array | None = None,
    layout: LoraLayout = OURS,
) -> dict[Path, Array]:
    """``{path: float32 scores shaped like the weight}`` for the weights at ``paths`` (the
    element-wise and N:M masks rank these directly). Every path must be scorable: for ``lora``
    each needs a LoRA pair. ``lora_grads`` mirrors ``lora``, ``weight_grads`` mirrors ``params``;
    ``input_stats`` maps a weight's path to its input's per-feature sum of squares."""
    c = _scorer(criterion, {"lora_grads": lora_grads if lora is not None else None,
                            "weight_grads": weight_grads, "input_stats": input_stats, "key": key})
    if c.groups is not None:  # random: noise per element
        keys = jax.random.split(key, len(paths))
        return {p: jax.random.uniform(k, at_path(params, p).shape) for p, k in zip(paths, keys)}
    out = {}
    for path in paths:
        s = c.element(_weight(params, lora, path, lora_grads=lora_grads, weight_grads=weight_grads,
                              input_stats=input_stats, scale=scale, power=power, layout=layout))
        if s is None:
            raise ValueError(f"the {criterion} criterion cannot score {path}"
                             + (": it has no LoRA pair" if criterion == "lora" else ""))
        out[path] = s
    return out


def group_scores_of(
    criterion: str,
    kinds: Mapping[str, GroupKind],
    params: Any,
    lora: Any,
    *,
    scale: float,
    power: int = 1,
    lora_grads: Any = None,
    weight_grads: Any = None,
    input_stats: Mapping[Path, Array] | None = None,
    key: Array | None = None,
    layout: LoraLayout = OURS,
) -> dict[str, Array]:
    """``{kind: (size,)}`` scores of one layer's groups under ``criterion``.

    Each coupled weight the criterion can score (``lora``: those with a pair; the others: kernels
    of two or more axes, so biases and norms do not vote) is scored element-wise, then reduced by
    :func:`~loraprune_jax.core.groups.group_scores`: summed to its groups and L2-normalised, the
    kinds' vectors summed over couplings (method.md section 3). Only this layer's element scores
    exist at a time.
    """
    c = _scorer(criterion, {"lora_grads": lora_grads if lora is not None else None,
                            "weight_grads": weight_grads, "input_stats": input_stats, "key": key})
    if c.groups is not None:
        return c.groups(kinds, key)
    if criterion == "lora" and not any(pair_at(lora, cp.path, layout) is not None
                                       for g in kinds.values() for cp in g.couplings):
        raise ValueError("the lora criterion needs LoRA adapters on the layer's coupled weights")
    cache: dict[Path, Array | None] = {}
    for g in kinds.values():
        for cp in g.couplings:
            if cp.path not in cache:
                cache[cp.path] = c.element(_weight(
                    params, lora, cp.path, lora_grads=lora_grads, weight_grads=weight_grads,
                    input_stats=input_stats, scale=scale, power=power, layout=layout))
    return group_scores({p: s for p, s in cache.items() if s is not None}, kinds)


def declared_scores(
    criterion: str,
    params: Any,
    lora: Any,
    declaration: Declaration,
    *,
    scale: float,
    power: int = 1,
    lora_grads: Any = None,
    weight_grads: Any = None,
    input_stats: Mapping[Path, Array] | None = None,
    key: Array | None = None,
    layout: LoraLayout = OURS,
) -> dict[str, Any]:
    """``{"layers": [{kind: (size,)}, ...]}``: :func:`group_scores_of` for every layer of a
    declaration whose coupling paths point into ``params`` (layer ``i`` draws ``random`` noise
    from ``fold_in(key, i)``)."""
    return {"layers": [
        group_scores_of(criterion, kinds, params, lora, scale=scale, power=power,
                        lora_grads=lora_grads, weight_grads=weight_grads, input_stats=input_stats,
                        key=jax.random.fold_in(key, i) if key is not None else None, layout=layout)
        for i, kinds in enumerate(declaration)]}


__all__ = ["CRITERIA", "GATE_CRITERIA", "INPUTS", "REGISTRY", "Criterion", "Weight",
           "criteria_given", "declared_scores", "element_scores", "gate_statistic",
           "get_criterion", "group_scores_of", "is_gate_criterion", "ranking_scores"]
