"""``loraprune-jax eval``: perplexity of a model on a text or on the bundled held-out texts
(LLM-Pruner protocol; :func:`loraprune_jax.eval.perplexity.perplexity` does the work), on one
device or sharded over a ``--mesh`` (``--distributed``: over several processes)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .checks import POSITIVE, check_output_file, number, peek
from .meshargs import add_mesh_args, base_note, is_primary, mesh_from_args, mesh_note


def _load(model: str, dtype: str | None, mesh: Any = None,
          base_dtype: str | None = None) -> tuple[Any, Any, Any, float]:
    from ..eval.loading import load_for_eval

    start = time.perf_counter()
    config, base, tokenizer = load_for_eval(model, dtype, base_dtype=base_dtype, mesh=mesh)
    return config, base, tokenizer, time.perf_counter() - start


def _eval_texts(args: argparse.Namespace) -> dict[str, str]:
    from ..data import default_heldout_texts, load_texts

    if args.text is None:
        return default_heldout_texts()
    texts = load_texts(args.text, split="heldout")  # a bare "wiki" means its held-out articles
    return {str(args.text): "\n\n".join(texts)}


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity of a model on a text (or on the default held-out texts); with ``--mesh`` the
    model is sharded over the devices and each batch of windows split, same numbers."""
    from ..data.packing import tokenize_join
    from ..eval.perplexity import perplexity

    # everything that can be wrong is found before the model loads: paths, texts, mesh
    if args.json:
        check_output_file(args.json, "--json")
    config = peek(args.model)
    texts = _eval_texts(args)
    mesh = mesh_from_args(args, config, args.batch_size)
    config, base, tokenizer, load_s = _load(args.model, args.dtype, mesh, args.base_dtype)
    print(f"model {args.model}: {config.num_params() / 1e6:.1f}M parameters, {config.dtype}{base_note(args)}, "
          f"loaded in {load_s:.1f}s{mesh_note(mesh)}", file=sys.stderr)
    results: dict[str, Any] = {}
    for name, text in texts.items():
        ids = tokenize_join([text], tokenizer)
        for seq_len in args.seq_len:
            res = perplexity(
                base, config, ids, seq_len,
                max_windows=args.max_windows, batch_size=args.batch_size,
                progress=not args.no_progress, desc=f"{name} L={seq_len}", mesh=mesh,
            )
            print(f"{name}\tseq_len={seq_len}\tppl={res.ppl:.4f}\ttokens={res.tokens}\t"
                  f"windows={res.windows}\t{res.tokens_per_second:.0f} tok/s")
            results.setdefault(name, {})[seq_len] = res
    if args.json and is_primary():
        single = len(results) == 1 and len(args.seq_len) == 1
        if single:
            res = next(iter(next(iter(results.values())).values()))
            payload = {"ppl": res.ppl, "tokens": res.tokens}
        else:
            payload = {
                name: {str(L): {"ppl": r.ppl, "tokens": r.tokens} for L, r in per_len.items()}
                for name, per_len in results.items()
            }
        from ..io.jsonfile import write_json

        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, payload)
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` on the ``loraprune-jax`` subparsers."""
    ev = subparsers.add_parser("eval", help="perplexity (LLM-Pruner protocol: non-overlapping windows)")
    ev.add_argument("--model", required=True, help="'smollm2', a HF LLaMA directory, or a .gguf file")
    ev.add_argument("--text", default=None,
                    help="a UTF-8 text file of any name (.jsonl: the 'text' field of each line), "
                         "a directory of .txt files, 'wiki', 'lee' or 'tfds:NAME[:SPLIT]' "
                         "(default: the bundled held-out texts)")
    ev.add_argument("--seq-len", type=number(int, low=2), nargs="+", default=[2048],
                    help="window length(s), at least 2")
    ev.add_argument("--max-windows", type=POSITIVE, default=None, help="evaluate at most N windows")
    ev.add_argument("--batch-size", type=POSITIVE, default=None, help="windows per compiled call")
    ev.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="parameter dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    ev.add_argument("--json", default=None, help="also write the results as JSON to this file")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_mesh_args(ev)
    ev.set_defaults(func=cmd_eval)
    return ev


__all__ = ["add_parser", "cmd_eval"]
