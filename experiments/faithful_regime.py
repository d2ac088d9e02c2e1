"""What it takes for the LoRA-guided criterion to match the full gradient: the first mask update
later (``prune.warmup``), a longer budget (``train.steps``), a larger learning rate.

    python experiments/faithful_regime.py --out experiments/runs/faithful \
        --settings 0.3:100 0.5:100 0.1:400 0.5:400 --criteria lora vanilla wanda --ratios 0.2 0.5 \
        --eval wikitext:../shared/data/wikitext-2/wiki.test.raw

A setting is ``WARMUP:STEPS`` or ``WARMUP:STEPS:LR`` (default lr 1e-4). Every run is an ordinary
``loraprune-jax prune`` run under ``--out/w<warmup>-s<steps>[-lr<lr>]/<criterion>-<ratio>``
(reused when finished) with the SmolLM2 settings of the paper's table (batch 1 x 128, masks
rewritten every 10 steps, cool-down 10%) and any extra ``key=value``; its perplexity after
slicing and merging is measured on ``--eval`` (64 evenly spaced 128-token windows, as the paper's
table). Prints a Markdown table (one row per setting and ratio, one column per criterion) and
writes it to ``--out/table.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_table import ensure_runs  # noqa: E402

from loraprune_jax.config import CRITERIA  # noqa: E402

BASE = ["model=smollm2", "data=wiki:train", "train.seq_len=128", "train.micro_batch_size=1",
        "prune.prune_every=10", "eval_max_windows=64"]


def parse_setting(text: str) -> tuple[float, int, float]:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"a setting is WARMUP:STEPS[:LR], got {text!r}")
    try:
        warmup, steps = float(parts[0]), int(parts[1])
        lr = float(parts[2]) if len(parts) == 3 else 1e-4
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad setting {text!r}: {e}") from None
    return warmup, steps, lr


def setting_name(warmup: float, steps: int, lr: float) -> str:
    return f"w{warmup:g}-s{steps}" + ("" if lr == 1e-4 else f"-lr{lr:g}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/runs/faithful")
    ap.add_argument("--settings", type=parse_setting, nargs="+", default=[parse_setting("0.1:100")])
    ap.add_argument("--criteria", nargs="+", default=["lora", "vanilla", "wanda"], choices=CRITERIA)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--eval", default="wikitext:../shared/data/wikitext-2/wiki.test.raw",
                    help="the perplexity text (a data spec)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    args = ap.parse_args(argv)
    root = Path(args.out)
    rows = []
    for warmup, steps, lr in args.settings:
        name = setting_name(warmup, steps, lr)
        overrides = [*BASE, f"eval_texts=[{json.dumps(args.eval)}]", f"prune.warmup={warmup}",
                     f"train.steps={steps}", f"train.lr={lr}", *args.overrides]
        runs = ensure_runs(args.ratios, args.criteria, root / name, overrides)
        for ratio in args.ratios:
            cells = {c: m["ppl_after"][args.eval] for c, r, _, m in runs if r == ratio}
            rows.append({"setting": name, "warmup": warmup, "steps": steps, "lr": lr,
                         "ratio": ratio, **cells})
    lines = ["| warmup | steps | lr | ratio | " + " | ".join(args.criteria) + " | best |",
             "| ---: | ---: | ---: | ---: |" + " ---: |" * len(args.criteria) + " --- |"]
    for row in rows:
        best = min(args.criteria, key=lambda c: row[c])
        lines.append(f"| {row['warmup']:g} | {row['steps']} | {row['lr']:g} | {row['ratio']:.0%} | "
                     + " | ".join(f"{row[c]:.2f}" for c in args.criteria) + f" | {best} |")
    table = "\n".join(lines)
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.md").write_text(table + "\n")
    (root / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
