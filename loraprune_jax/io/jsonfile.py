"""Atomic JSON files: a run's config and metrics are either absent or whole, never half written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def partial_json(path: str | os.PathLike[str]) -> Path:
    """The temporary file :func:`write_json` writes ``path`` through; a kill can leave it."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as indented, key-sorted JSON atomically (a temp file renamed into place;
    removed again when writing fails, e.g. on a full disk)."""
    tmp = partial_json(path)
    try:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
