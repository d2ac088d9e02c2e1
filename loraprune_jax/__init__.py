"""loraprune-jax: LoRAPrune (LoRA-guided structured pruning of LLaMA-family models) in JAX/Flax.

The core is pure functions over three pytrees that share one layer structure: the frozen
``base`` weights, the trainable ``lora`` adapters and the structured ``masks``.
"""

from .config import LlamaConfig, LoraConfig, PruneConfig, RunConfig, TrainConfig
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
from .pruning.importance import (
    block_scores,
    ema_update,
    estimate_weight_grad,
    layer_group_scores,
    lora_guided_importance,
    reduce_to_groups,
)
from .pruning.masks import excluded_layers, update_masks
from .pruning.schedule import OneShotSchedule, PruneSchedule
from .pruning.slicing import slice_and_merge
from .io.export import export_hf

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "OneShotSchedule",
    "PruneConfig",
    "PruneSchedule",
    "RunConfig",
    "TrainConfig",
    "block_scores",
    "ema_update",
    "estimate_weight_grad",
    "excluded_layers",
    "export_hf",
    "layer_group_scores",
    "lora_guided_importance",
    "reduce_to_groups",
    "slice_and_merge",
    "update_masks",
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
