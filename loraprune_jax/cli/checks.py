"""The command line's validation pass: argument types, output paths and the model's own limits,
checked before any model is loaded, each failure one line (exit 2).

argparse's messages become one line too (:class:`Parser`), and options may come between a
command's ``key=value`` arguments (:class:`CommandParser`: ``prune a=1 --no-progress b=2``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``loraprune-jax prune: error: ...``)
    naming where to look for help, exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


class CommandParser(Parser):
    """A command's parser: options and positionals may be intermixed (argparse's
    ``parse_intermixed_args``), which ``add_subparsers`` does not do on its own."""

    _intermixing = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._intermixing:  # the intermixed parse calls back in: plain parsing from here
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def number(kind: Callable[[str], Any], *, low: float | None = None, high: float | None = None,
           low_open: bool = False, what: str = "") -> Callable[[str], Any]:
    """An argparse type: ``kind`` (int or float) of the text, finite and within the bounds, else
    argparse's one-line error saying what is accepted."""
    lo = "" if low is None else (f"> {low:g}" if low_open else f">= {low:g}")
    hi = "" if high is None else f"<= {high:g}"
    accepted = what or " and ".join(x for x in (lo, hi) if x) or "finite"
    name = {int: "a whole number", float: "a number"}.get(kind, kind.__name__)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name} ({accepted})") from None
        bad = not math.isfinite(value)
        bad |= low is not None and (value <= low if low_open else value < low)
        bad |= high is not None and value > high
        if bad:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {accepted}")
        return value

    return parse


POSITIVE = number(int, low=1, what=">= 1")


def check_output_file(path: str | os.PathLike[str], flag: str) -> Path:
    """A file the command will write at the end (``--json``): not a directory, and its
    directory exists or can be made in a writable place. Checked before any work, so a bad target
    loses no results."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file name")
    _check_creatable(target.parent, f"{flag} {path}")
    return target


def check_output_dir(path: str | os.PathLike[str], key: str) -> Path:
    """A directory a run will create (``out=``): it does not exist yet, and its parent exists or
    can be made in a writable place."""
    target = Path(path).expanduser()
    if target.exists():
        raise ValueError(f"{key}={path}: already exists; choose another {key}= (or --resume it)")
    _check_creatable(target.parent, f"{key}={path}")
    return target


def _check_creatable(directory: Path, what: str) -> None:
    """``directory`` exists or can be made: its nearest existing ancestor is a writable directory."""
    probe = directory.absolute()
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: mkdir would fail
            raise ValueError(f"{what}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: cannot write in {probe} (permission denied)")


def peek(model: str) -> Any:
    """The model's config, read without its weights; a missing model, or one without the
    tokenizer every command needs to read text, is one line before anything loads."""
    from ..io import peek_model

    config, has_tokenizer = peek_model(model)
    if not has_tokenizer:
        raise ValueError(f"--model {model}: has no tokenizer files (tokenizer.json, "
                         "tokenizer_config.json, ...); this command needs one to read text")
    return config


__all__ = ["POSITIVE", "CommandParser", "Parser", "check_output_dir", "check_output_file",
           "number", "peek"]
