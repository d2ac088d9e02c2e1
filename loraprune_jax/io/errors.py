"""Errors raised while reading or writing checkpoints."""

from __future__ import annotations

import os


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, malformed or does not match its config.

    The message always starts with the offending file (or directory) so that a user
    staring at a traceback knows which file to fix or re-download. ``path`` holds it too.
    """

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.path = os.fspath(path)
        self.reason = message
        super().__init__(f"{self.path}: {message}")

    def __reduce__(self):  # keep pickling (multiprocessing, pytest-xdist) working
        return (type(self), (self.path, self.reason))
