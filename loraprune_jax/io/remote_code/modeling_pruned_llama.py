"""A LLaMA whose layers have their own head counts and MLP widths (written by loraprune-jax).

``PrunedLlamaForCausalLM`` is ``LlamaForCausalLM`` with each layer's attention and MLP rebuilt at
that layer's widths. A layer left with no heads (or no MLP channels) keeps empty projections
and its sub-block adds zero to the residual stream, as in the pruned JAX model.
"""

import warnings

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

from .configuration_pruned_llama import PrunedLlamaConfig


class PrunedLlamaAttention(LlamaAttention):
    """LLaMA attention with ``num_heads`` query heads sharing ``num_kv_heads`` KV heads."""

    def __init__(self, config, layer_idx, num_heads, num_kv_heads):
        super().__init__(config, layer_idx)
        hd, d, bias = self.head_dim, config.hidden_size, config.attention_bias
        self.num_heads = num_heads
        self.num_key_value_heads = num_kv_heads
        self.num_key_value_groups = num_heads // num_kv_heads if num_kv_heads else 1
        self.q_proj = nn.Linear(d, num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(num_heads * hd, d, bias=bias)

    def forward(self, hidden_states, *args, **kwargs):
        if self.num_heads > 0:
            return super().forward(hidden_states, *args, **kwargs)
        # No heads left: contribute zero. A cache still gets one all-zero placeholder KV head for
        # this layer, so that its sequence length (which it reads from layer 0 by default) stays
        # right during generation; nothing ever attends to it.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            b, t = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros((b, 1, t, self.head_dim))
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class PrunedLlamaMLP(LlamaMLP):
    """LLaMA SwiGLU MLP with ``intermediate_size`` channels (zero channels: outputs zero)."""

    def __init__(self, config, intermediate_size):
        super().__init__(config)
        d, bias = config.hidden_size, config.mlp_bias
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(d, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(d, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, d, bias=bias)

    def forward(self, x):
        if self.intermediate_size == 0:
            return torch.zeros_like(x)
        return super().forward(x)


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` with per-layer widths from a :class:`PrunedLlamaConfig`."""

    config_class = PrunedLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        with warnings.catch_warnings():  # empty projections of fully pruned blocks
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            for i, layer in enumerate(self.model.layers):
                heads, kv_heads, ffn = config.layer_widths(i)
                layer.self_attn = PrunedLlamaAttention(config, i, heads, kv_heads)
                layer.mlp = PrunedLlamaMLP(config, ffn)
        self.post_init()


__all__ = ["PrunedLlamaForCausalLM"]
