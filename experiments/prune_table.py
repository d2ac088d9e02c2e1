"""Prune one model with every criterion at several ratios (same steps, same data) and tabulate.

    python experiments/prune_table.py --ratios 0.2 0.5 --out experiments/runs/table \
        train.steps=100 eval_max_windows=32

Each run is a normal `loraprune-jax prune` run (its own output directory under --out); the
table (Markdown, to stdout and --out/table.md) gives held-out perplexity before (dense) and after
pruning, and the fraction of parameters kept. Runs already finished under --out are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loraprune_jax.config import CRITERIA, RunConfig, build_run_config
from loraprune_jax.run import METRICS_FILE, RUN_CONFIG_FILE
from loraprune_jax.run.prune import run_prune


def ensure_runs(
    ratios: list[float], criteria: list[str], root: Path, overrides: list[str]
) -> list[tuple[str, float, Path, dict]]:
    """``(criterion, ratio, run directory, metrics)`` of every run, pruning those not finished
    under ``root`` (``root/<criterion>-<ratio>``) with the same ``key=value`` overrides; a run
    that was interrupted (its ``run_config.json`` written, no metrics yet) is resumed."""
    out_rows = []
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    for ratio in ratios:
        for criterion in criteria:
            out = root / f"{criterion}-{ratio:g}"
            if (out / RUN_CONFIG_FILE).exists() and not (out / METRICS_FILE).exists():
                log(f"== {criterion} {ratio:g}: resuming {out}")
                run_prune(RunConfig(out=str(out)), resume=True, progress=False, log=log)
            elif not (out / METRICS_FILE).exists():
                cfg = build_run_config(None, [*overrides, f"prune.ratio={ratio}",
                                              f"prune.criterion={criterion}", f"out={out}"])
                log(f"== {criterion} {ratio:g} -> {out}")
                run_prune(cfg, progress=False, log=log)
            out_rows.append((criterion, ratio, out, json.loads((out / METRICS_FILE).read_text())))
    return out_rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    ap.add_argument("--out", default="experiments/runs/table")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    args = ap.parse_args(argv)
    rows = [m for *_, m in ensure_runs(args.ratios, args.criteria, Path(args.out), args.overrides)]
    root = Path(args.out)
    texts = list(rows[0]["ppl_before"])
    lines = [
        "| ratio | criterion | " + " | ".join(f"ppl {t}" for t in texts) + " | params kept | train s |",
        "| --- | --- | " + " | ".join("---:" for _ in texts) + " | ---: | ---: |",
        "| 0 | dense | " + " | ".join(f"{rows[0]['ppl_before'][t]:.2f}" for t in texts) + " | 100% | |",
    ]
    for m in rows:
        lines.append(
            f"| {m['ratio']:g} | {m['criterion']} | "
            + " | ".join(f"{m['ppl_after'][t]:.2f}" for t in texts)
            + f" | {100 * m['params_kept_fraction']:.1f}% | {m['train_seconds_this_session']:.0f} |"
        )
    table = "\n".join(lines)
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
