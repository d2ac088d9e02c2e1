"""The Flax LLaMA and its LoRA adapters."""

from .llama import (
    Llama,
    check_base,
    forward,
    init_base,
    layer_shapes,
    loss,
    param_shapes,
    stack_layers,
    token_nll,
    unstack_layers,
)
from .lora import count_lora_params, init_lora, lora_linear, merge_lora

__all__ = [
    "Llama",
    "check_base",
    "count_lora_params",
    "forward",
    "init_base",
    "init_lora",
    "layer_shapes",
    "lora_linear",
    "loss",
    "merge_lora",
    "param_shapes",
    "stack_layers",
    "token_nll",
    "unstack_layers",
]
