"""Whole runs, the top of the package below the CLI: a LoRAPrune run of a language model
(:mod:`.prune`: train, slice, export, evaluate) and of an image classifier (:mod:`.classifier`).

Every run directory has ``run_config.json`` (written first) and ``metrics.json`` (written last:
its presence marks a complete run)."""

RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.json"

__all__ = ["METRICS_FILE", "RUN_CONFIG_FILE"]
