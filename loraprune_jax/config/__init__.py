"""Frozen configuration dataclasses shared by the models, loaders, trainers, CLI and checkpoints:
model shapes (``config.model``) and runs (``config.run``), built from YAML files and ``key=value``
arguments (``config.parse``); bad input raises ``ConfigError`` (``config.errors``)."""

from ..core.criteria import CRITERIA, GATE_CRITERIA
from .errors import ConfigError
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
from .parse import build_run_config, flatten, parse_overrides, read_config_file, yaml_load

__all__ = ["BASE_DTYPES", "CRITERIA", "DECLARED_CRITERIA", "EMA_BETA", "GATE_CRITERIA", "GATE_EMA_BETA",
           "GRANULARITIES", "PROJECTIONS", "VISION_MODELS", "ClassifierConfig", "ConfigError", "LlamaConfig",
           "LoraConfig", "PruneConfig", "RunConfig", "TrainConfig", "build_run_config", "check_base_dtype",
           "default_dtype", "flatten", "parse_nm", "parse_overrides", "read_config_file", "yaml_load"]
