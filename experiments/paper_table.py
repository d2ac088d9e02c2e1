"""The paper's main table for any LLaMA-family model: dense and each criterion at given ratios,
with the final LoRA merged and without it, scored by perplexity and zero-shot accuracy.

    python experiments/paper_table.py --ratios 0.2 0.5 --out experiments/runs/paper \
        --ppl wikitext2=wikitext:../shared/data/wikitext-2/wiki.test.raw --seq-len 128 \
        --tasks boolq piqa winogrande arc_easy arc_challenge openbookqa --data-dir ../shared/data \
        train.steps=200

Pruning runs are ordinary `loraprune-jax prune` runs (`prune_table.ensure_runs`, reused when
finished under --out); every key=value applies to all of them (a YAML config with --config).
Each pruned model is scored twice: the export (LoRA merged, the method's result) and the same
slicing of the original weights without LoRA ("w/o LoRA"), which shows what the adapters' training
adds. Perplexity follows the LLM-Pruner protocol on each `--ppl NAME=SPEC` text (specs as for
`data=`: `wikitext:FILE`, a .txt file, `wiki:heldout`, ...; PTB needs a user-supplied file);
zero-shot accuracy (`acc`) from lm-evaluation-harness itself (its task definitions on the local
files, our model: `eval.harness_eval`) on each task, and their average.
Writes `table.md`, `table.csv` and `ppl_vs_ratio.png` under --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_table import ensure_runs  # noqa: E402

from loraprune_jax.config import build_run_config  # noqa: E402
from loraprune_jax.config import CRITERIA, default_dtype  # noqa: E402
from loraprune_jax.data import load_texts  # noqa: E402
from loraprune_jax.data.packing import spread_windows, tokenize_join  # noqa: E402
from loraprune_jax.eval.perplexity import perplexity  # noqa: E402
from loraprune_jax.eval.harness_eval import harness_zeroshot  # noqa: E402
from loraprune_jax.io import load_adapters, load_model  # noqa: E402
from loraprune_jax.models.llama_pruning import slice_and_merge  # noqa: E402


def score(base, config, tokenizer, args, ppl_ids, tasks: bool = True) -> dict[str, float]:
    """Perplexity on every text and (with ``tasks``) accuracy on every task of one model, and
    the average."""
    row: dict[str, float] = {}
    for name, ids in ppl_ids.items():
        win = spread_windows(ids, args.seq_len, args.max_windows)
        row[f"ppl {name}"] = perplexity(base, config, win.reshape(-1), args.seq_len,
                                        progress=False).ppl
    if args.tasks and tasks:
        results = harness_zeroshot(base, config, tokenizer, args.tasks, data_dir=args.data_dir,
                                   limit=args.limit, progress=False)  # lm-evaluation-harness
        for task, res in results.items():
            row[task] = res.acc
        row["average"] = float(np.mean([res.acc for res in results.values()]))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    ap.add_argument("--out", default="experiments/runs/paper")
    ap.add_argument("--ppl", action="append", default=[], metavar="NAME=SPEC",
                    help="a perplexity text (repeatable); default: wiki=wiki:heldout")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=None, help="evenly spaced windows per text")
    ap.add_argument("--tasks", nargs="*", default=[], help="zero-shot tasks (none by default)")
    ap.add_argument("--data-dir", default=None, help="zero-shot task files (../shared/data layout)")
    ap.add_argument("--limit", type=int, default=None, help="first N documents per task")
    ap.add_argument("--no-plain", action="store_true", help="skip the rows without LoRA")
    ap.add_argument("--plain-ppl-only", action="store_true",
                    help="score the rows without LoRA by perplexity only (zero-shot cells empty)")
    ap.add_argument("--config", default=None, help="a YAML run config for every pruning run")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    args = ap.parse_args(argv)
    texts = dict(item.split("=", 1) for item in (args.ppl or ["wiki=wiki:heldout"]))
    root = Path(args.out)
    overrides = list(args.overrides)
    if args.config:  # prune_table's runs take key=value only: flatten the YAML into them
        cfg_keys = build_run_config(args.config, []).to_dict()
        overrides = [f"{k}={json.dumps(v)}" for k, v in _flat(cfg_keys).items() if k != "out"] + overrides
    runs = ensure_runs(args.ratios, args.criteria, root, overrides)

    model = runs[0][3]["model"]
    dtype = json.loads((runs[0][2] / "run_config.json").read_text()).get("dtype") or default_dtype()
    config, base, tokenizer = load_model(model, dtype=dtype)
    ppl_ids = {name: tokenize_join(list(load_texts(spec, split="heldout")), tokenizer)
               for name, spec in texts.items()}
    table = [{"ratio": 0.0, "method": "dense", **score(base, config, tokenizer, args, ppl_ids)}]
    print(f"dense: {table[-1]}", file=sys.stderr, flush=True)
    for criterion, ratio, out, _ in runs:
        small_cfg, small, _ = load_model(out / "model", dtype=dtype)
        table.append({"ratio": ratio, "method": criterion,
                      **score(small, small_cfg, tokenizer, args, ppl_ids)})
        print(f"{criterion} {ratio:g}: {table[-1]}", file=sys.stderr, flush=True)
        if not args.no_plain:
            _, masks, _ = load_adapters(out / "adapters")
            plain, plain_cfg = slice_and_merge(base, None, masks, config)
            table.append({"ratio": ratio, "method": f"{criterion} w/o LoRA",
                          **score(plain, plain_cfg, tokenizer, args, ppl_ids,
                                  tasks=not args.plain_ppl_only)})
            print(f"{criterion} w/o LoRA {ratio:g}: {table[-1]}", file=sys.stderr, flush=True)

    columns = [c for c in table[0] if c not in ("ratio", "method")]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["ratio", "method", *columns], restval="")
        writer.writeheader()
        writer.writerows(table)
    lines = ["| ratio | method | " + " | ".join(columns) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in columns) + " |"]
    for row in table:
        cells = ["–" if c not in row else f"{row[c]:.2f}" if c.startswith("ppl")
                 else f"{100 * row[c]:.1f}" for c in columns]
        lines.append(f"| {row['ratio']:.0%} | {row['method']} | " + " | ".join(cells) + " |")
    (root / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(table, columns, root / "ppl_vs_ratio.png")
    return 0


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def plot(table: list[dict], columns: list[str], path: Path) -> None:
    """Perplexity against ratio, one line per method (log scale; dense at ratio 0)."""
    from matplotlib.figure import Figure

    ppl_cols = [c for c in columns if c.startswith("ppl")]
    fig = Figure(figsize=(5 * len(ppl_cols), 4))
    axes = np.atleast_1d(fig.subplots(1, len(ppl_cols)))
    dense = table[0]
    for ax, col in zip(axes, ppl_cols):
        for method in dict.fromkeys(r["method"] for r in table[1:]):
            rows = [r for r in table if r["method"] == method]
            xs = [0.0] + [r["ratio"] for r in rows]
            ax.plot(xs, [dense[col]] + [r[col] for r in rows], marker="o", label=method)
        ax.set(xlabel="pruning ratio", ylabel=col, yscale="log", title=col)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
