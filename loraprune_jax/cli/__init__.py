"""The ``loraprune-jax`` command line: ``prune``, ``eval`` (perplexity), ``zeroshot``
(lm-evaluation-harness tasks), ``generate`` (text, KV cache) and ``demo`` (the main job)."""

# One module per command: argument parsing, validation and printing; the work is done below, in
# run/ and eval/. Bad input (OSError, ValueError, argparse errors) is reported as one line, with
# exit status 2, checked before any model is loaded where it can be (checks.py); Ctrl-C is one
# line and exit status 130.

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from . import generate, perplexity, prune, zeroshot
from .checks import CommandParser, Parser


def build_parser() -> argparse.ArgumentParser:
    """The ``loraprune-jax`` parser with every command registered (errors on one line; a
    command's options may come between its ``key=value`` arguments)."""
    parser = Parser(prog="loraprune-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    perplexity.add_parser(sub)  # loraprune-jax eval --model ... --text ...
    prune.add_parser(sub)  # loraprune-jax prune key=value ...
    zeroshot.add_parser(sub)  # loraprune-jax zeroshot --model ... --tasks ...
    generate.add_parser(sub)  # loraprune-jax generate --model ... --prompt ...
    prune.add_demo_parser(sub)  # loraprune-jax demo
    return parser


def _env_wants_distributed() -> bool:
    from ..parallel.distributed import wants_distributed

    return wants_distributed()


def describe_error(e: BaseException) -> str:
    """One line for a bad input: an ``OSError`` names its file and the reason without errno
    decoration (``out/x: No space left on device``)."""
    if isinstance(e, OSError) and e.strerror and type(e).__str__ is OSError.__str__:
        names = [str(f) for f in (e.filename, e.filename2) if f is not None]
        return f"{' -> '.join(names)}: {e.strerror}" if names else e.strerror
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; 0 on success, 2 on bad input (one line on stderr), 130 on Ctrl-C."""
    from ..train.hostmem import keep_freed_memory

    keep_freed_memory()  # before any JAX thread allocates; LORAPRUNE_JAX_SYSTEM_MALLOC=1: not
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "distributed", False) or _env_wants_distributed():
            from ..parallel.distributed import initialize

            initialize()
        return args.func(args)
    except (OSError, ValueError) as e:  # bad input: a file, a checkpoint, a text, a width
        if os.environ.get("LORAPRUNE_JAX_DEBUG"):
            raise
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # the commands add how to continue, where there is a way
        print(f"interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130


__all__ = ["build_parser", "describe_error", "main"]
