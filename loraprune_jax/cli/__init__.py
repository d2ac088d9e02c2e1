"""The ``loraprune-jax`` command line: ``prune``, ``eval`` (perplexity), ``zeroshot``
(lm-evaluation-harness tasks), ``generate`` (text, KV cache) and ``demo`` (the main job)."""

# One module per command: argument parsing, validation and printing; the work is done below, in
# run/ and eval/. Bad input (OSError, ValueError) is reported as one line, with exit status 2.

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from . import generate, perplexity, prune, zeroshot


def build_parser() -> argparse.ArgumentParser:
    """The ``loraprune-jax`` parser with every command registered."""
    parser = argparse.ArgumentParser(prog="loraprune-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    perplexity.add_parser(sub)  # loraprune-jax eval --model ... --text ...
    prune.add_parser(sub)  # loraprune-jax prune key=value ...
    zeroshot.add_parser(sub)  # loraprune-jax zeroshot --model ... --tasks ...
    generate.add_parser(sub)  # loraprune-jax generate --model ... --prompt ...
    prune.add_demo_parser(sub)  # loraprune-jax demo
    return parser


def _env_wants_distributed() -> bool:
    from ..parallel.distributed import wants_distributed

    return wants_distributed()


def main(argv: Sequence[str] | None = None) -> int:
    from ..train.hostmem import keep_freed_memory

    keep_freed_memory()  # before any JAX thread allocates; LORAPRUNE_JAX_SYSTEM_MALLOC=1: not
    args = build_parser().parse_args(argv)
    for attr in ("seq_len", "max_windows", "batch_size"):
        values = getattr(args, attr, None)
        for v in values if isinstance(values, list) else [values]:
            if v is not None and v < 1:
                raise SystemExit(f"error: --{attr.replace('_', '-')} must be positive, got {v}")
    try:
        if getattr(args, "distributed", False) or _env_wants_distributed():
            from ..parallel.distributed import initialize

            initialize()
        return args.func(args)
    except (OSError, ValueError) as e:  # bad input: a file, a checkpoint, a text, a width
        if os.environ.get("LORAPRUNE_JAX_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
