"""Model configs: the shape and numerics of a LLaMA-family decoder (``LlamaConfig``), its LoRA
adapters (``LoraConfig``), and the default parameter dtype."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp

from .errors import ConfigError, show

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a LLaMA-family decoder.

    Widths may differ per layer (a pruned model): ``layer_num_heads``,
    ``layer_num_kv_heads`` and ``layer_intermediate_size`` override the uniform
    values when given, one entry per layer.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6  # HF LlamaConfig default
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    layer_num_heads: tuple[int, ...] | None = None
    layer_num_kv_heads: tuple[int, ...] | None = None
    layer_intermediate_size: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads "
                    f"{self.num_heads}; give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for name in ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_size"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(int(v) for v in value)
                object.__setattr__(self, name, value)
                if len(value) != self.num_layers:
                    raise ValueError(f"{name} has {len(value)} entries for {self.num_layers} layers")
        for i in range(self.num_layers):
            h, kv = self.heads(i), self.kv_heads(i)
            if kv > 0 and h % kv:
                raise ValueError(f"layer {i}: {h} query heads are not a multiple of {kv} KV heads")
            if (h == 0) != (kv == 0):
                raise ValueError(f"layer {i}: {h} query heads with {kv} KV heads")

    # Per-layer widths -----------------------------------------------------------------
    def heads(self, layer: int) -> int:
        return self.layer_num_heads[layer] if self.layer_num_heads else self.num_heads

    def kv_heads(self, layer: int) -> int:
        return self.layer_num_kv_heads[layer] if self.layer_num_kv_heads else self.num_kv_heads

    def ffn(self, layer: int) -> int:
        if self.layer_intermediate_size:
            return self.layer_intermediate_size[layer]
        return self.intermediate_size

    @property
    def is_uniform(self) -> bool:
        """True when every layer has the same widths (layers can be stacked and scanned)."""
        return all(
            (self.heads(i), self.kv_heads(i), self.ffn(i))
            == (self.heads(0), self.kv_heads(0), self.ffn(0))
            for i in range(self.num_layers)
        )

    @property
    def jnp_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    def with_widths(
        self,
        heads: tuple[int, ...],
        kv_heads: tuple[int, ...],
        ffn: tuple[int, ...],
    ) -> LlamaConfig:
        """The same model with new per-layer widths (collapsed to uniform when they agree)."""
        uniform = len(set(heads)) == len(set(kv_heads)) == len(set(ffn)) == 1
        if uniform:
            return dataclasses.replace(
                self,
                num_heads=heads[0],
                num_kv_heads=kv_heads[0],
                intermediate_size=ffn[0],
                layer_num_heads=None,
                layer_num_kv_heads=None,
                layer_intermediate_size=None,
            )
        return dataclasses.replace(
            self,
            num_heads=max(heads),
            num_kv_heads=max(kv_heads),
            intermediate_size=max(ffn),
            layer_num_heads=tuple(heads),
            layer_num_kv_heads=tuple(kv_heads),
            layer_intermediate_size=tuple(ffn),
        )

    def num_params(self) -> int:
        """Parameter count of the dense model this config describes."""
        d, hd = self.hidden_size, self.head_dim
        total = self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d
        for i in range(self.num_layers):
            h, kv, f = self.heads(i), self.kv_heads(i), self.ffn(i)
            total += 2 * d  # norms
            total += d * h * hd * 2 + d * kv * hd * 2  # q, o, k, v
            total += 3 * d * f
        return total

    # HF interop ------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], dtype: str | None = None) -> LlamaConfig:
        """Build from a HF ``config.json`` dict (LLaMA-family keys)."""
        archs = cfg.get("architectures") or []
        if cfg.get("model_type") not in (None, "llama") and not any("Llama" in a for a in archs):
            raise ValueError(f"not a LLaMA-family config: model_type={cfg.get('model_type')!r}")
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None:
            rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        rope_scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_type not in ("default", None):
            raise NotImplementedError(f"rope scaling {rope_type!r} is not supported yet")
        if dtype is None:
            torch_dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
            dtype = torch_dtype if torch_dtype in _DTYPES else "float32"
        n_heads = int(cfg["num_attention_heads"])
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        config = cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=n_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=cfg.get("head_dim"),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            dtype=dtype,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
            layer_num_heads=cfg.get("layer_num_heads"),
            layer_num_kv_heads=cfg.get("layer_num_kv_heads"),
            layer_intermediate_size=cfg.get("layer_intermediate_size"),
        )
        if config.layer_num_heads or config.layer_num_kv_heads or config.layer_intermediate_size:
            # the per-layer lists count (an export's uniform fields may only satisfy transformers)
            n = range(config.num_layers)
            config = config.with_widths(tuple(config.heads(i) for i in n),
                                        tuple(config.kv_heads(i) for i in n),
                                        tuple(config.ffn(i) for i in n))
        return config

    def to_hf_dict(self) -> dict[str, Any]:
        """A HF ``LlamaConfig``-compatible dict (plus per-layer widths when not uniform)."""
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "dtype": self.dtype,
            "torch_dtype": self.dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if not self.is_uniform:
            out["layer_num_heads"] = list(self.layer_num_heads or [self.num_heads] * self.num_layers)
            out["layer_num_kv_heads"] = list(
                self.layer_num_kv_heads or [self.num_kv_heads] * self.num_layers
            )
            out["layer_intermediate_size"] = list(
                self.layer_intermediate_size or [self.intermediate_size] * self.num_layers
            )
        return out

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LlamaConfig:
        return cls(**json.loads(text))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters: which projections, rank, alpha, dropout."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if bad:
            raise ConfigError(f"lora.targets: unknown LoRA targets {show(bad)}; choose from "
                              f"{', '.join(PROJECTIONS)}")
        if self.rank <= 0:
            raise ConfigError(f"lora.rank: LoRA rank must be positive, got {self.rank}")
        if not math.isfinite(self.alpha):
            raise ConfigError(f"lora.alpha must be a finite number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# what a frozen base's projections may be stored as besides the compute dtype (models.quant)
BASE_DTYPES = ("int8",)


def check_base_dtype(base_dtype: str | None) -> None:
    """Raise ``ConfigError`` (a ``ValueError``) naming the accepted values of ``base_dtype``."""
    if base_dtype is not None and base_dtype not in BASE_DTYPES:
        raise ConfigError(f"base_dtype must be one of {', '.join(BASE_DTYPES)} or unset (the "
                          f"compute dtype), got {show(base_dtype)}")


def default_dtype() -> str:
    """The parameter dtype when none is configured: float32 on CPU (bfloat16 matmuls are slower
    there under XLA), bfloat16 on GPU/TPU."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
