"""The ``loraprune-jax`` command line: ``eval`` (perplexity) and ``demo`` (the main job)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

DEMO_SEQ_LENS = (512,)
DEMO_MAX_WINDOWS = 32  # per text: a quick look; `eval` without --max-windows reads everything


def default_dtype() -> str:
    """float32 on CPU (bf16 matmuls are slower there under XLA), bfloat16 on GPU/TPU."""
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _load(model: str, dtype: str | None) -> tuple[Any, Any, Any, float]:
    from .io import load_model

    start = time.perf_counter()
    config, base, tokenizer = load_model(model, dtype=dtype or default_dtype())
    return config, base, tokenizer, time.perf_counter() - start


def _eval_texts(args: argparse.Namespace) -> dict[str, str]:
    from .data import default_heldout_texts, load_texts

    if args.text is None:
        return default_heldout_texts()
    texts = load_texts(args.text)
    return {str(args.text): "\n\n".join(texts)}


def _write_json(path: str, payload: dict[str, Any]) -> None:
    """Write JSON atomically (a temp file renamed into place)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out)


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity of a model on a text (or on the default held-out texts)."""
    from .data.packing import tokenize_join
    from .eval.perplexity import perplexity

    config, base, tokenizer, load_s = _load(args.model, args.dtype)
    if tokenizer is None:
        raise SystemExit(f"error: {args.model} has no tokenizer files; cannot tokenize text")
    print(f"model {args.model}: {config.num_params() / 1e6:.1f}M parameters, {config.dtype}, "
          f"loaded in {load_s:.1f}s", file=sys.stderr)
    results: dict[str, Any] = {}
    for name, text in _eval_texts(args).items():
        ids = tokenize_join([text], tokenizer)
        for seq_len in args.seq_len:
            res = perplexity(
                base, config, ids, seq_len,
                max_windows=args.max_windows, batch_size=args.batch_size,
                progress=not args.no_progress, desc=f"{name} L={seq_len}",
            )
            print(f"{name}\tseq_len={seq_len}\tppl={res.ppl:.4f}\ttokens={res.tokens}\t"
                  f"windows={res.windows}\t{res.tokens_per_second:.0f} tok/s")
            results.setdefault(name, {})[seq_len] = res
    if args.json:
        single = len(results) == 1 and len(args.seq_len) == 1
        if single:
            res = next(iter(next(iter(results.values())).values()))
            payload = {"ppl": res.ppl, "tokens": res.tokens}
        else:
            payload = {
                name: {str(L): {"ppl": r.ppl, "tokens": r.tokens} for L, r in per_len.items()}
                for name, per_len in results.items()
            }
        _write_json(args.json, payload)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: the bundled SmolLM2 on the bundled held-out texts."""
    args.model, args.text = "smollm2", None
    args.seq_len = args.seq_len or list(DEMO_SEQ_LENS)
    if args.max_windows is None:
        args.max_windows = DEMO_MAX_WINDOWS
    print(f"demo: the bundled SmolLM2-135M-Instruct on the bundled held-out texts, first "
          f"{args.max_windows} windows of each (full: loraprune-jax eval --model smollm2)",
          file=sys.stderr)
    return cmd_eval(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraprune-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-windows", type=int, default=None, help="evaluate at most N windows")
        p.add_argument("--batch-size", type=int, default=None, help="windows per compiled call")
        p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                       help="parameter dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
        p.add_argument("--json", default=None, help="also write the results as JSON to this file")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    ev = sub.add_parser("eval", help="perplexity (LLM-Pruner protocol: non-overlapping windows)")
    ev.add_argument("--model", required=True, help="'smollm2', a HF LLaMA directory, or a .gguf file")
    ev.add_argument("--text", default=None,
                    help="a .txt/.raw/.jsonl file, a directory of .txt, 'wiki', 'lee' or "
                         "'tfds:NAME[:SPLIT]' (default: the bundled held-out texts)")
    ev.add_argument("--seq-len", type=int, nargs="+", default=[2048], help="window length(s)")
    common(ev)
    ev.set_defaults(func=cmd_eval)

    demo = sub.add_parser("demo", help="evaluate the bundled SmolLM2 on the bundled held-out texts "
                          f"(default: {DEMO_MAX_WINDOWS} windows of each)")
    demo.add_argument("--seq-len", type=int, nargs="+", default=None,
                      help=f"window length(s) (default: {' '.join(map(str, DEMO_SEQ_LENS))})")
    common(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for attr in ("seq_len", "max_windows", "batch_size"):
        values = getattr(args, attr, None)
        for v in values if isinstance(values, list) else [values]:
            if v is not None and v < 1:
                raise SystemExit(f"error: --{attr.replace('_', '-')} must be positive, got {v}")
    try:
        return args.func(args)
    except (OSError, ValueError) as e:  # bad input: a file, a checkpoint, a text, a width
        if os.environ.get("LORAPRUNE_JAX_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
