"""Group scores of one layer under each pruning criterion, all reduced to the same groups.

``lora`` (the paper): LoRA-estimated weight gradient times the merged weight. ``vanilla``: the
true gradient of the frozen weights times the merged weight (the full-gradient criterion whose
cost LoRAPrune avoids). ``magnitude``: the merged weight alone. ``wanda``: merged weight times
the L2 norm of its input feature over the batch. ``random``: uniform noise per group (per
element for the element-wise masks). :func:`element_scores` gives the per-weight scores that
:func:`layer_scores` reduces to groups.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from ..config import DECLARED_CRITERIA, GATE_CRITERIA, PROJECTIONS
from ..models import lora as _lora  # module import: models.llama imports this package
from .groups import at_path, group_scores
from .importance import layer_group_scores, lora_guided_importance

Array = jax.Array

# which input statistic (models.llama.forward(return_stats=True)) feeds each projection
INPUT_STAT = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in",
              "gate": "mlp_in", "up": "mlp_in", "down": "down_in"}


def merged_weight(layer: Mapping[str, Array], adapters: Mapping[str, Any] | None, name: str,
                  scale: float) -> Array:
    """``W + scale * A @ B`` in float32 (``W`` alone when the projection has no adapter)."""
    pair = adapters.get(name) if adapters else None
    return _lora.merge_pair(layer[name].astype(jnp.float32), pair, scale)


def element_scores(
    criterion: str,
    layer: Mapping[str, Array],
    adapters: Mapping[str, Any] | None,
    *,
    scale: float,
    power: int = 1,
    lora_grads: Mapping[str, Any] | None = None,
    weight_grads: Mapping[str, Array] | None = None,
    input_stats: Mapping[str, Array] | None = None,
    key: Array | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Array]:
    """``{name: (in, out)}`` float32 element scores of one layer's projections under ``criterion``.

    ``names`` picks the projections (default: all seven; for ``lora``, those with adapters, the
    only ones it can score). :func:`layer_scores` reduces these to groups; the element-wise and
    N:M masks (``pruning.sparsity``) rank them directly. ``random`` draws uniform noise per
    element from ``key``.
    """
    if criterion in GATE_CRITERIA:
        raise ValueError(f"the {criterion} criterion scores whole groups through gates on their "
                         "outputs inside the train step (pruning.gates); it has no weight scores")
    if criterion == "lora":
        if not adapters or lora_grads is None:
            raise ValueError("the lora criterion needs LoRA adapters and their gradients")
        names = tuple(adapters) if names is None else tuple(names)
        missing = [name for name in names if name not in adapters]
        if missing:
            raise ValueError(f"the lora criterion cannot score {missing}: they have no adapters")
        return {
            name: lora_guided_importance(
                layer[name], adapters[name]["a"], adapters[name]["b"],
                lora_grads[name]["a"], lora_grads[name]["b"], scale, power,
            )
            for name in names
        }
    names = PROJECTIONS if names is None else tuple(names)
    if criterion == "random":
        if key is None:
            raise ValueError("the random criterion needs a PRNG key")
        keys = jax.random.split(key, len(names))
        return {name: jax.random.uniform(k, layer[name].shape) for name, k in zip(names, keys)}

    def pw(x: Array) -> Array:
        return x if power == 1 else x**power

    elements = {}
    for name in names:
        w = merged_weight(layer, adapters, name, scale)
        if criterion == "vanilla":
            if weight_grads is None:
                raise ValueError("the vanilla criterion needs the gradients of the frozen weights")
            elements[name] = pw(jnp.abs(weight_grads[name].astype(jnp.float32) * w))
        elif criterion == "magnitude":
            elements[name] = pw(jnp.abs(w))
        elif criterion == "wanda":
            if input_stats is None:
                raise ValueError("the wanda criterion needs input activation statistics")
            norm = jnp.sqrt(input_stats[INPUT_STAT[name]].astype(jnp.float32))
            elements[name] = pw(jnp.abs(w) * norm[:, None])
        else:
            raise ValueError(f"unknown criterion {criterion!r}")
    return elements


def layer_scores(
    criterion: str,
    layer: Mapping[str, Array],
    adapters: Mapping[str, Any] | None,
    n_units: int,
    *,
    scale: float,
    power: int = 1,
    lora_grads: Mapping[str, Any] | None = None,
    weight_grads: Mapping[str, Array] | None = None,
    input_stats: Mapping[str, Array] | None = None,
    key: Array | None = None,
) -> dict[str, Array]:
    """``{"attn": (n_units,), "mlp": (ffn,)}`` scores of one layer under ``criterion``: its
    :func:`element_scores` reduced to groups (``random``: uniform noise per group)."""
    n_channels = layer["gate"].shape[-1]
    if criterion == "random":
        if key is None:
            raise ValueError("the random criterion needs a PRNG key")
        ka, km = jax.random.split(key)
        return {"attn": jax.random.uniform(ka, (n_units,)), "mlp": jax.random.uniform(km, (n_channels,))}
    elements = element_scores(
        criterion, layer, adapters, scale=scale, power=power, lora_grads=lora_grads,
        weight_grads=weight_grads, input_stats=input_stats,
    )
    return layer_group_scores(elements, n_units, n_channels)


# Any declared model (ViT, CNN, ...) ---------------------------------------------------------


def declared_scores(
    criterion: str,
    params: Any,
    lora: Any,
    declaration: Sequence[Mapping[str, Any]],
    *,
    scale: float,
    power: int = 1,
    lora_grads: Any = None,
    key: Array | None = None,
) -> dict[str, Any]:
    """``{"layers": [{kind: (size,)}, ...]}`` group scores of a model declared by
    ``pruning.groups`` couplings, under ``criterion``.

    ``lora`` scores each coupled weight that has a LoRA pair at its path by the estimated
    gradient times the merged weight; ``magnitude`` scores every coupled kernel (2-D or more;
    biases and norm statistics do not vote) by its merged magnitude; ``random`` draws one uniform
    number per group. The element scores go through ``groups.group_scores``, so every family is
    reduced exactly as LLaMA is.
    """
    if criterion not in DECLARED_CRITERIA:
        raise ValueError(f"criterion {criterion!r} is not available for declared models; "
                         f"choose from {', '.join(DECLARED_CRITERIA)}")
    if criterion in GATE_CRITERIA:
        raise ValueError(f"the {criterion} criterion scores groups from the gradients of their "
                         "gates in the train step (pruning.gates), not from weights")
    if criterion == "lora" and (lora is None or lora_grads is None):
        raise ValueError("the lora criterion needs LoRA adapters and their gradients")
    if criterion == "random" and key is None:
        raise ValueError("the random criterion needs a PRNG key")
    cache: dict[tuple, Array] = {}

    def element(path: tuple) -> Array | None:
        if path not in cache:
            w = at_path(params, path)
            pair = at_path(lora, path, None) if lora is not None else None
            if criterion == "lora" and pair is not None:
                g = at_path(lora_grads, path)
                cache[path] = lora_guided_importance(w, pair["a"], pair["b"], g["a"], g["b"], scale, power)
            elif criterion == "magnitude" and w.ndim >= 2:
                s = jnp.abs(_lora.merge_pair(w.astype(jnp.float32), pair, scale))
                cache[path] = s if power == 1 else s**power
            else:
                cache[path] = None
        return cache[path]

    layers = []
    for i, kinds in enumerate(declaration):
        if criterion == "random":
            keys = jax.random.split(jax.random.fold_in(key, i), max(len(kinds), 1))
            layers.append({kind: jax.random.uniform(k, (g.size,)) for k, (kind, g) in zip(keys, kinds.items())})
            continue
        scores = {c.path: element(c.path) for g in kinds.values() for c in g.couplings}
        layers.append(group_scores({p: s for p, s in scores.items() if s is not None}, kinds))
    return {"layers": layers}
