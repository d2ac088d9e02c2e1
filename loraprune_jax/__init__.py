"""loraprune-jax: LoRAPrune (LoRA-guided structured pruning of LLaMA-family models) in JAX/Flax.

The core is pure functions over three pytrees that share one layer structure: the frozen
``base`` weights, the trainable ``lora`` adapters and the structured ``masks``.
"""

from .config import LlamaConfig, LoraConfig
from .eval.perplexity import PerplexityResult, perplexity
from .io import CheckpointError, load_hf_dir, load_model, load_smollm2, save_hf_dir
from .models.llama import (
    Llama,
    forward,
    init_base,
    loss,
    stack_layers,
    token_nll,
    unstack_layers,
)
from .models.lora import init_lora, merge_lora
from .pruning.groups import init_masks

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Llama",
    "LlamaConfig",
    "LoraConfig",
    "PerplexityResult",
    "forward",
    "init_base",
    "init_lora",
    "init_masks",
    "load_hf_dir",
    "load_model",
    "load_smollm2",
    "loss",
    "merge_lora",
    "perplexity",
    "save_hf_dir",
    "stack_layers",
    "token_nll",
    "unstack_layers",
]
