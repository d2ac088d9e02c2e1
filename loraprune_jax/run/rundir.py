"""The run directory of :func:`~loraprune_jax.run.prune.run_prune` through kills and full disks.

It appears whole, with its ``run_config.json`` (:func:`create_run_dir`); a resume reads that file
back with a clear error when it is damaged (:func:`read_run_config`) and first deletes what a
killed process left half-written (:func:`remove_leftovers`); a disk that fills up while the run
writes becomes one :class:`~loraprune_jax.train.diskfull.DiskFullError` that says how to go on
(:func:`disk_full_hint`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..io.errors import CheckpointError
from ..io.export import remove_partial_exports
from ..io.jsonfile import partial_json, write_json
from ..train.diskfull import DiskFullError, no_space_left
from . import METRICS_FILE, RUN_CONFIG_FILE

PLOT_FILE = "training.png"  # plot_history writes it through PLOT_FILE + ".tmp.png"


def saved_run_config(out: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in run directory ``out``'s ``run_config.json``: FileNotFoundError when
    there is none, :class:`~loraprune_jax.io.CheckpointError` naming the file when it is not
    JSON or not an object."""
    path = Path(out) / RUN_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out} is not a run directory (no {RUN_CONFIG_FILE}) to resume")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"not valid JSON ({e}); the run cannot be resumed") from e
    if not isinstance(data, dict):
        raise CheckpointError(path, f"expected a JSON object of config keys, got a "
                                    f"{type(data).__name__}; the run cannot be resumed")
    return data


def read_run_config(out: str | os.PathLike[str]) -> RunConfig:
    """The :class:`RunConfig` saved in run directory ``out`` (errors as :func:`saved_run_config`;
    unknown keys or bad values too)."""
    data = saved_run_config(out)
    try:
        return RunConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise CheckpointError(Path(out) / RUN_CONFIG_FILE,
                              f"not a language-model run config: {e}") from e


def create_run_dir(out: Path, config: dict[str, Any]) -> None:
    """Create ``out`` holding ``run_config.json`` in one rename of a hidden sibling, so a killed
    start leaves no ``out`` (run again) or one to resume; stale siblings of earlier killed
    starts go first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with disk_full_hint(tmp, "creating the run directory", "free some space and run again"):
            write_json(tmp / RUN_CONFIG_FILE, config)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(out: Path) -> list[str]:
    """Delete what a killed run left half-written in ``out`` (temporary files and directories
    of the export, the plot and the JSON files; orbax cleans up its own) and name it."""
    removed = [p.name for name in ("model", "adapters") for p in remove_partial_exports(out / name)]
    for path in (partial_json(out / METRICS_FILE), partial_json(out / RUN_CONFIG_FILE),
                 out / (PLOT_FILE + ".tmp.png")):
        if path.exists():
            path.unlink()
            removed.append(path.name)
    return removed


@contextlib.contextmanager
def disk_full_hint(path: Path, doing: str, then: str) -> Iterator[None]:
    """A full disk while ``doing`` (writing ``path``) as one :class:`DiskFullError` that says
    what to do ``then``."""
    try:
        yield
    except Exception as e:
        if not no_space_left(e):
            raise
        if isinstance(e, DiskFullError):
            path, doing = Path(e.filename), e.doing
        raise DiskFullError(path, doing, then) from e


__all__ = ["PLOT_FILE", "create_run_dir", "disk_full_hint", "read_run_config", "remove_leftovers",
           "saved_run_config"]
