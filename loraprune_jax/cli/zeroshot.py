"""``loraprune-jax zeroshot``: zero-shot accuracy of a model on chosen tasks, one line per task
and an optional JSON file, on one device or sharded over a ``--mesh`` (``--distributed``: over
several processes). A thin front end to lm-evaluation-harness: the harness's own task
definitions on local files, scored by our model (:func:`loraprune_jax.eval.harness_eval.harness_zeroshot`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..data.tasks import TASK_NAMES, load_task_docs
from .checks import POSITIVE, check_output_file, peek
from .meshargs import add_mesh_args, base_note, is_primary, mesh_from_args, mesh_note


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``loraprune-jax zeroshot`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "zeroshot", help="zero-shot multiple-choice accuracy (lm-evaluation-harness semantics)"
    )
    p.add_argument("--model", required=True, help="'smollm2', a HF LLaMA directory, or a .gguf file")
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                   choices=list(TASK_NAMES) + ["all"], help=f"{', '.join(TASK_NAMES)} or all")
    p.add_argument("--data-dir", default=None,
                   help="release files (e.g. DIR/arc/ARC-Easy/ARC-Easy-Test.jsonl, DIR/boolq/dev.jsonl; "
                        "default $LORAPRUNE_JAX_EVAL_DATA), or tfds' data dir with --source tfds")
    p.add_argument("--source", choices=["files", "tfds"], default="files",
                   help="release files under --data-dir, or prepared tfds datasets (array_record)")
    p.add_argument("--limit", type=POSITIVE, default=None, help="the first N documents of each task")
    p.add_argument("--batch-size", type=POSITIVE, default=None,
                   help="rows per compiled call (default: about 4096 tokens per call)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="parameter dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    p.add_argument("--samples", action="store_true",
                   help="with --json, also write per-document log-likelihoods")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_mesh_args(p)
    p.set_defaults(func=cmd_zeroshot)
    return p


def cmd_zeroshot(args: argparse.Namespace) -> int:
    """Zero-shot accuracy of a model on the chosen tasks; one line per task, optional JSON.
    With ``--mesh`` the model is sharded and each call's rows split: the same accuracies."""
    from ..eval.harness_eval import format_result, harness_zeroshot
    from ..eval.loading import load_for_eval
    from ..io.jsonfile import write_json

    tasks = list(TASK_NAMES) if "all" in args.tasks else list(dict.fromkeys(args.tasks))
    limit = getattr(args, "limit", None)
    source = getattr(args, "source", "files")
    # everything that can be wrong is found before the model loads: paths, task data, mesh
    if args.json:
        check_output_file(args.json, "--json")
    config = peek(args.model)
    for name in tasks:
        load_task_docs(name, args.data_dir, source=source, limit=1)
    mesh = mesh_from_args(args, config, args.batch_size)
    start = time.perf_counter()
    config, base, tokenizer = load_for_eval(args.model, args.dtype, base_dtype=args.base_dtype,
                                            mesh=mesh)
    print(f"model {args.model}: {config.num_params() / 1e6:.1f}M parameters, {config.dtype}{base_note(args)}, "
          f"loaded in {time.perf_counter() - start:.1f}s{mesh_note(mesh)}", file=sys.stderr)
    results = harness_zeroshot(
        base, config, tokenizer, tasks, data_dir=args.data_dir, source=source, limit=limit,
        batch_size=args.batch_size, progress=not args.no_progress,
        keep_samples=bool(getattr(args, "samples", False)), mesh=mesh,
    )
    for r in results.values():
        print(format_result(r))
    mean_acc = float(np.mean([r.acc for r in results.values()]))
    total = time.perf_counter() - start
    print(f"{'mean acc':<14} {mean_acc:.4f} over {len(results)} tasks  ({total:.1f}s in all)")
    if args.json and is_primary():
        payload = {
            "model": str(args.model),
            "dtype": config.dtype,
            "limit": limit,
            "source": source,
            "data_dir": None if args.data_dir is None else str(args.data_dir),
            "results": {k: r.to_dict(samples=bool(getattr(args, "samples", False)))
                        for k, r in results.items()},
            "mean_acc": mean_acc,
            "seconds": total,
        }
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, payload)
    return 0


__all__ = ["add_parser", "cmd_zeroshot"]
