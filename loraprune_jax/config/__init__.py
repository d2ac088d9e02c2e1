"""Frozen configuration dataclasses shared by the models, loaders, trainers, CLI and checkpoints:
model shapes (``config.model``) and runs (``config.run``)."""

from ..core.criteria import CRITERIA, GATE_CRITERIA
from .model import BASE_DTYPES, PROJECTIONS, LlamaConfig, LoraConfig, check_base_dtype, default_dtype
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

__all__ = ["BASE_DTYPES", "CRITERIA", "DECLARED_CRITERIA", "EMA_BETA", "GATE_CRITERIA", "GATE_EMA_BETA",
           "GRANULARITIES", "PROJECTIONS", "VISION_MODELS", "ClassifierConfig", "LlamaConfig",
           "LoraConfig", "PruneConfig", "RunConfig", "TrainConfig", "check_base_dtype", "default_dtype", "parse_nm"]
