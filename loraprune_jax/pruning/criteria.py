"""Group scores of one layer under each pruning criterion, all reduced to the same groups.

``lora`` (the paper): LoRA-estimated weight gradient times the merged weight. ``vanilla``: the
true gradient of the frozen weights times the merged weight (the full-gradient criterion whose
cost LoRAPrune avoids). ``magnitude``: the merged weight alone. ``wanda``: merged weight times
the L2 norm of its input feature over the batch. ``random``: uniform noise per group.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ..config import PROJECTIONS
from ..models import lora as _lora  # module import: models.llama imports this package
from .importance import layer_group_scores, lora_layer_scores

Array = jax.Array

# which input statistic (models.llama.forward(return_stats=True)) feeds each projection
INPUT_STAT = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in",
              "gate": "mlp_in", "up": "mlp_in", "down": "down_in"}


def merged_weight(layer: Mapping[str, Array], adapters: Mapping[str, Any] | None, name: str,
                  scale: float) -> Array:
    """``W + scale * A @ B`` in float32 (``W`` alone when the projection has no adapter)."""
    pair = adapters.get(name) if adapters else None
    return _lora.merge_pair(layer[name].astype(jnp.float32), pair, scale)


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
    """``{"attn": (n_units,), "mlp": (ffn,)}`` scores of one layer under ``criterion``."""
    n_channels = layer["gate"].shape[-1]
    if criterion == "lora":
        if not adapters or lora_grads is None:
            raise ValueError("the lora criterion needs LoRA adapters and their gradients")
        return lora_layer_scores(layer, adapters, lora_grads, scale, n_units, power)
    if criterion == "random":
        if key is None:
            raise ValueError("the random criterion needs a PRNG key")
        ka, km = jax.random.split(key)
        return {"attn": jax.random.uniform(ka, (n_units,)), "mlp": jax.random.uniform(km, (n_channels,))}

    def pw(x: Array) -> Array:
        return x if power == 1 else x**power

    elements = {}
    for name in PROJECTIONS:
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
    return layer_group_scores(elements, n_units, n_channels)
