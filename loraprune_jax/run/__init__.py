"""Whole runs, the top of the package below the CLI: a LoRAPrune run of a language model
(:mod:`.prune`: train, slice, export, evaluate) and of an image classifier (:mod:`.classifier`).

Every run directory has ``run_config.json`` (written first) and ``metrics.json`` (written last:
its presence marks a complete run).

What a killed language-model run (:mod:`.prune`, SIGKILL in any phase) leaves:

* killed before its directory exists whole: no ``out`` at all (at most a hidden
  ``.NAME.tmp-*`` sibling, removed by the next start): run the same command again;
* after that: ``run_config.json``, ``checkpoints/`` (complete steps only; orbax writes each into
  ``<step>.orbax-checkpoint-tmp*`` and renames it), and possibly ``model/``, ``adapters/``,
  ``training.png``, each whole (written into a temporary name and renamed into place), plus
  half-written temporaries (``.model.tmp-*``, ``.model.old-*``, ``.adapters.tmp-*``,
  ``metrics.json.tmp``, ``training.png.tmp.png``). No ``metrics.json``: the run is not done.
  ``loraprune-jax prune --resume DIR`` removes the temporaries, continues from the latest
  checkpoint (redoing slicing, evaluation and export after the last step) and ends with the
  masks, weights and metrics of the uninterrupted run.

A disk that fills up ends the run with one ``error: PATH: no space left on device while ...``
line (exit status 2) and the same state; resume once there is space."""

RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.json"

__all__ = ["METRICS_FILE", "RUN_CONFIG_FILE"]
