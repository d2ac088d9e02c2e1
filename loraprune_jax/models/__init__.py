"""Model families on the core: the Flax LLaMA (pure forward over base, LoRA and mask pytrees, its
pruning declaration, the KV-cache decoder), and the ViT-S/14 and CIFAR-10 CNN, each declaring its
prunable groups next to its shapes."""

from .llama import forward, loss, token_nll

from .llama_params import (
    Llama,
    check_base,
    init_base,
    layer_shapes,
    param_shapes,
    stack_layers,
    unstack_layers,
)
from .llama_pruning import (
    init_element_masks,
    init_masks,
    layer_scores,
    llama_declaration,
    masked_widths,
    slice_and_merge,
)
from .lora import count_lora_params, init_lora, merge_lora

__all__ = [
    "Llama",
    "check_base",
    "count_lora_params",
    "forward",
    "init_base",
    "init_element_masks",
    "init_lora",
    "init_masks",
    "layer_scores",
    "layer_shapes",
    "llama_declaration",
    "loss",
    "masked_widths",
    "merge_lora",
    "param_shapes",
    "slice_and_merge",
    "stack_layers",
    "token_nll",
    "unstack_layers",
]
