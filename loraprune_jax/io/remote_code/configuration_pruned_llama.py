"""A LLaMA config with per-layer widths (written by loraprune-jax for pruned models)."""

from transformers import LlamaConfig


class PrunedLlamaConfig(LlamaConfig):
    """``LlamaConfig`` plus optional per-layer ``layer_num_heads``, ``layer_num_kv_heads`` and
    ``layer_intermediate_size`` lists; the uniform fields hold the widest layer. ``head_dim`` is
    always explicit, so ``hidden_size`` need not be a multiple of the head count."""

    model_type = "llama"  # as in config.json: transformers then never asks to run this code
    # for the config alone (AutoTokenizer), and no model-type mismatch is reported

    layer_num_heads: list[int] | None = None
    layer_num_kv_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None

    def validate_architecture(self):
        """Per-layer consistency instead of LLaMA's ``hidden_size % num_attention_heads`` rule."""
        n = self.num_hidden_layers
        for name in ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_size"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} layers")
        for i in range(n):
            heads, kv_heads, _ = self.layer_widths(i)
            if (heads == 0) != (kv_heads == 0) or (kv_heads and heads % kv_heads):
                raise ValueError(f"layer {i}: {heads} query heads do not fit {kv_heads} KV heads")

    def layer_widths(self, i):
        """``(query heads, KV heads, MLP channels)`` of layer ``i``."""
        heads = self.layer_num_heads[i] if self.layer_num_heads is not None else self.num_attention_heads
        kv_heads = (
            self.layer_num_kv_heads[i] if self.layer_num_kv_heads is not None else self.num_key_value_heads
        )
        ffn = (
            self.layer_intermediate_size[i]
            if self.layer_intermediate_size is not None
            else self.intermediate_size
        )
        return int(heads), int(kv_heads), int(ffn)


__all__ = ["PrunedLlamaConfig"]
