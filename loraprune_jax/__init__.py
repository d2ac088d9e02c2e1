"""loraprune-jax: LoRAPrune (structured pruning guided by LoRA gradients) in JAX/Flax.

``loraprune_jax.core`` holds pure functions over any model's pytrees (group declarations, the
criteria registry, masks, the schedule, slicing) and imports only jax, numpy, optax and flax.
On it sit the model families (``models``: LLaMA, a ViT, a CNN), checkpoint I/O (``io``), data,
training, evaluation and the CLI. Importing this package loads the core, the configs and the
models only; the I/O and evaluation names below are imported on first use, so transformers,
gguf, TensorFlow Datasets and the rest load only where a user needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import LlamaConfig, LoraConfig, PruneConfig, RunConfig, TrainConfig
from .core import (
    Coupling,
    GroupKind,
    LoraLayout,
    OneShotSchedule,
    PruneSchedule,
    apply_masks,
    declared_masks,
    declared_scores,
    ema_update,
    estimate_weight_grad,
    excluded_layers,
    lora_guided_importance,
    slice_declared,
    update_masks,
)
from .models import (
    Llama,
    forward,
    init_base,
    init_lora,
    init_masks,
    loss,
    merge_lora,
    slice_and_merge,
    stack_layers,
    token_nll,
    unstack_layers,
)

__version__ = "0.1.0"

# name -> module that defines it, imported on first access (PEP 562)
_LAZY = {
    "CheckpointError": "io.errors",
    "load_hf_dir": "io",
    "load_model": "io",
    "load_smollm2": "io",
    "save_hf_dir": "io",
    "export_hf": "io.export",
    "PerplexityResult": "eval.perplexity",
    "perplexity": "eval.perplexity",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointError", "Coupling", "GroupKind", "Llama", "LlamaConfig", "LoraConfig", "LoraLayout",
    "OneShotSchedule", "PerplexityResult", "PruneConfig", "PruneSchedule", "RunConfig",
    "TrainConfig", "apply_masks", "declared_masks", "declared_scores", "ema_update",
    "estimate_weight_grad", "excluded_layers", "export_hf", "forward", "init_base", "init_lora",
    "init_masks", "load_hf_dir", "load_model", "load_smollm2", "loss", "lora_guided_importance",
    "merge_lora", "perplexity", "save_hf_dir", "slice_and_merge", "slice_declared",
    "stack_layers", "token_nll", "unstack_layers", "update_masks",
]
