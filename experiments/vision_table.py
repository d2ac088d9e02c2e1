"""Pruned vision models: accuracy of the bundled ViT-S/14 on a VTAB-1k-style MNIST task, and the
agreement of the bundled CIFAR-10 CNN with its dense self, at given ratios per criterion.

    python experiments/vision_table.py --out experiments/runs/vision --ratios 0.2 0.5 \
        --vit train.steps=100 --cnn train.steps=60

Each cell is an ordinary classifier run (``loraprune-jax prune model=vit-s ...``), reused when
finished under --out. The ViT rows: dense (LoRA and the head trained, nothing pruned) and each
criterion; accuracy on held-out digits. The CNN rows: agreement of the pruned model's predictions
with the dense model's on the 20 real CIFAR-10 images that ship offline, and accuracy on them.
Writes ``table.md`` under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loraprune_jax.config import ClassifierConfig, parse_overrides
from loraprune_jax.run import METRICS_FILE
from loraprune_jax.run.classifier import run_classifier


def ensure(model: str, criterion: str, ratio: float, root: Path, overrides: list[str]) -> dict:
    """The metrics of one run, running it unless finished under ``root``."""
    out = root / f"{model}-{criterion}-{ratio:g}"
    if not (out / METRICS_FILE).exists():
        updates = {**parse_overrides(overrides), "prune.criterion": criterion, "prune.ratio": ratio,
                   "model": model, "out": str(out)}
        cfg = ClassifierConfig().override(updates)
        print(f"== {model} {criterion} {ratio:g} -> {out}", file=sys.stderr, flush=True)
        run_classifier(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    return json.loads((out / METRICS_FILE).read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--criteria", nargs="+", default=["lora", "magnitude", "random"])
    ap.add_argument("--out", default="experiments/runs/vision")
    ap.add_argument("--models", nargs="+", default=["vit-s", "cifar10-cnn"])
    ap.add_argument("--vit", nargs="*", default=[], metavar="key=value", help="ViT run overrides")
    ap.add_argument("--cnn", nargs="*", default=[], metavar="key=value", help="CNN run overrides")
    args = ap.parse_args(argv)
    root = Path(args.out)
    lines = []
    if "vit-s" in args.models:
        dense = ensure("vit-s", "lora", 0.0, root, args.vit)
        lines += [f"ViT-S/14 on MNIST ({dense['test_images']} held-out digits; accuracy %)", "",
                  "| ratio | method | accuracy | params (M) | train s |", "| --- | --- | ---: | ---: | ---: |",
                  f"| 0% | dense (LoRA + head) | {100 * dense['accuracy']:.1f} | "
                  f"{dense['params'] / 1e6:.2f} | {dense['train_seconds']:.0f} |"]
        for ratio in args.ratios:
            for criterion in args.criteria:
                m = ensure("vit-s", criterion, ratio, root, args.vit)
                lines.append(f"| {ratio:.0%} | {criterion} | {100 * m['accuracy']:.1f} | "
                             f"{m['params_after'] / 1e6:.2f} | {m['train_seconds']:.0f} |")
        lines.append("")
    if "cifar10-cnn" in args.models:
        lines += ["CIFAR-10 CNN on its 20 offline images (agreement with the dense model, accuracy; %)",
                  "", "| ratio | method | agreement | accuracy | params (M) |",
                  "| --- | --- | ---: | ---: | ---: |"]
        first = True
        for ratio in args.ratios:
            for criterion in args.criteria:
                m = ensure("cifar10-cnn", criterion, ratio, root, args.cnn)
                if first:
                    lines.append(f"| 0% | dense | 100.0 | {100 * m['dense_accuracy']:.1f} | "
                                 f"{m['params'] / 1e6:.2f} |")
                    first = False
                lines.append(f"| {ratio:.0%} | {criterion} | {100 * m['agreement_with_dense']:.1f} | "
                             f"{100 * m['accuracy']:.1f} | {m['params_after'] / 1e6:.2f} |")
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
