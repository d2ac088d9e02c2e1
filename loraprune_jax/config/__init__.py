"""Frozen configuration dataclasses shared by the models, loaders, trainers, CLI and checkpoints:
model shapes (``config.model``) and runs (``config.run``)."""

from ..core.criteria import CRITERIA, GATE_CRITERIA
from .model import PROJECTIONS, LlamaConfig, LoraConfig, default_dtype
from .run import (
    DECLARED_CRITERIA,
    EMA_BETA,
    GATE_EMA_BETA,
    GRANULARITIES,
    VISION_MODELS,
    ClassifierConfig,
    PruneConfig,
    RunConfig,
    TrainConfig,
    parse_nm,
)

__all__ = ["CRITERIA", "DECLARED_CRITERIA", "EMA_BETA", "GATE_CRITERIA", "GATE_EMA_BETA",
           "GRANULARITIES", "PROJECTIONS", "VISION_MODELS", "ClassifierConfig", "LlamaConfig",
           "LoraConfig", "PruneConfig", "RunConfig", "TrainConfig", "default_dtype", "parse_nm"]
