"""The ``loraprune-jax`` command line: ``prune``, ``eval`` (perplexity), ``zeroshot``
(lm-evaluation-harness tasks), ``generate`` (text, KV cache) and ``demo`` (the main job)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence


def _load(model: str, dtype: str | None) -> tuple[Any, Any, Any, float]:
    from .io import load_model
    from .config import default_dtype

    start = time.perf_counter()
    config, base, tokenizer = load_model(model, dtype=dtype or default_dtype())
    return config, base, tokenizer, time.perf_counter() - start


def _eval_texts(args: argparse.Namespace) -> dict[str, str]:
    from .data import default_heldout_texts, load_texts

    if args.text is None:
        return default_heldout_texts()
    texts = load_texts(args.text, split="heldout")  # a bare "wiki" means its held-out articles
    return {str(args.text): "\n\n".join(texts)}


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
        from .io.jsonfile import write_json

        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, payload)
    return 0


def yaml_load(text: Any) -> Any:
    """``yaml.safe_load`` without YAML 1.1's base-60 integers, so ``2:4`` (an N:M pattern) stays
    the string ``"2:4"`` instead of becoming 124."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def int_or_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
        value = loader.construct_scalar(node)
        if ":" in value:
            return value
        return yaml.SafeLoader.construct_yaml_int(loader, node)

    Loader.add_constructor("tag:yaml.org,2002:int", int_or_text)
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs, values parsed as YAML scalars/lists (``0.2``, ``true``, ``[q, v]``,
    ``2:4``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = yaml_load(value) if value.strip() else ""
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested YAML mapping -> dotted keys."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + str(key)] = value
    return out


def build_run_config(config_file: str | None, overrides: Sequence[str]) -> Any:
    """RunConfig from defaults, then a YAML file, then ``key=value`` overrides (a
    ClassifierConfig when ``model`` is one of the bundled image classifiers)."""
    from .config import VISION_MODELS, ClassifierConfig, RunConfig

    updates: dict[str, Any] = {}
    if config_file:
        with open(config_file, encoding="utf-8") as f:
            loaded = yaml_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a mapping of config keys")
        updates.update(flatten(loaded))
    updates.update(parse_overrides(overrides))
    if updates.get("model") in VISION_MODELS:  # an image classifier: its own config
        cfg = ClassifierConfig().override(updates)
        if not cfg.out:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            cfg = cfg.override({"out": f"runs/{cfg.model}-{cfg.prune.criterion}-{cfg.prune.ratio:g}-{stamp}"})
        return cfg
    cfg = RunConfig().override(updates)
    if not cfg.out:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = Path(str(cfg.model)).name or "model"
        p = cfg.prune
        what = {"structured": f"{p.ratio:g}", "unstructured": f"unstructured-{p.ratio:g}",
                "nm": "nm" + p.nm.replace(":", "-")}[p.granularity]
        cfg = cfg.override({"out": f"runs/{name}-{p.criterion}-{what}-{stamp}"})
    return cfg


def print_summary(metrics: dict[str, Any], out: str) -> None:
    """A short human summary of a finished run."""
    granularity = metrics.get("granularity", "structured")
    how = "" if granularity == "structured" else f" ({granularity})"
    print(f"\npruned {metrics['model']} with criterion {metrics['criterion']}{how} to ratio "
          f"{metrics['ratio']:g} in {metrics['steps']} steps")
    nonzero = "" if granularity == "structured" else "nonzero "
    print(f"{nonzero}parameters: {metrics['params_before'] / 1e6:.1f}M -> "
          f"{metrics['params_after'] / 1e6:.1f}M ({100 * metrics['params_kept_fraction']:.1f}% kept)")
    for spec, before in metrics["ppl_before"].items():
        print(f"perplexity {spec} (L={metrics['eval']['seq_len']}): {before:.2f} -> "
              f"{metrics['ppl_after'][spec]:.2f}")
    layers = metrics["layers"]
    if granularity == "structured":
        print("heads per layer:   " + " ".join(map(str, layers["heads"])))
        print("FFN per layer:     " + " ".join(map(str, layers["ffn"])))
    else:
        sp = metrics["sparsity"]
        print(f"sparsity: {sp['pruned_layers']['sparsity']:.4f} of the pruned layers' weights, "
              f"{sp['overall']:.4f} of all masked weights, {sp['model']:.4f} of the model")
        print("per projection:    " + " ".join(
            f"{k}={v:.3f}" for k, v in sp["pruned_layers"]["projections"].items()))
    print(f"output: {out}/ (model/, adapters/, metrics.json, training.png)")


def cmd_prune(args: argparse.Namespace) -> int:
    """LoRAPrune end to end (``--resume DIR`` continues an interrupted run)."""
    from .config import VISION_MODELS, ClassifierConfig, RunConfig
    from .train.loop import run_prune

    if args.resume:
        if args.overrides or args.config:
            raise ValueError("--resume takes the run's saved config; give no overrides")
        saved = Path(args.resume) / "run_config.json"
        if saved.exists() and json.loads(saved.read_text()).get("model") in VISION_MODELS:
            raise ValueError(f"{args.resume} is an image-classifier run, which cannot resume "
                             "(they take minutes): run it again with a new out=")
        cfg = RunConfig(out=args.resume)
    else:
        cfg = build_run_config(args.config, args.overrides)
    if isinstance(cfg, ClassifierConfig):
        from .train.classifier import run_classifier

        metrics = run_classifier(cfg, log=lambda m: print(m, file=sys.stderr))
        print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
        return 0
    metrics = run_prune(cfg, resume=bool(args.resume), progress=not args.no_progress,
                        log=lambda m: print(m, file=sys.stderr))
    from .parallel.distributed import is_primary

    if is_primary():
        print_summary(metrics, cfg.out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: prune the bundled SmolLM2 on the bundled Wikipedia text with defaults."""
    args.config, args.resume = None, None
    return cmd_prune(args)


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

    pr = sub.add_parser("prune", help="LoRAPrune a model (key=value overrides, see RunConfig; "
                                      "model=vit-s or model=cifar10-cnn: see ClassifierConfig)")
    pr.add_argument("overrides", nargs="*", metavar="key=value",
                    help="e.g. prune.ratio=0.2 prune.criterion=vanilla train.steps=100 out=DIR")
    pr.add_argument("--config", default=None, help="a YAML file of config keys (nested or dotted)")
    pr.add_argument("--resume", default=None, metavar="DIR", help="continue an interrupted run")
    pr.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    pr.add_argument("--distributed", action="store_true",
                    help="one of several processes (TPU pod workers, GPU hosts): connect them with "
                         "jax.distributed.initialize() first (automatic when "
                         "JAX_COORDINATOR_ADDRESS is set)")
    pr.set_defaults(func=cmd_prune)

    from .eval import generate, zeroshot

    zeroshot.add_parser(sub)  # loraprune-jax zeroshot --model ... --tasks ...
    generate.add_parser(sub)  # loraprune-jax generate --model ... --prompt ...

    demo = sub.add_parser("demo", help="the main job: prune the bundled SmolLM2 on bundled text")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="as for prune")
    demo.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    demo.set_defaults(func=cmd_demo)
    return parser


def _env_wants_distributed() -> bool:
    from .parallel.distributed import wants_distributed

    return wants_distributed()


def main(argv: Sequence[str] | None = None) -> int:
    from .train.hostmem import keep_freed_memory

    keep_freed_memory()  # before any JAX thread allocates; LORAPRUNE_JAX_SYSTEM_MALLOC=1: not
    args = build_parser().parse_args(argv)
    for attr in ("seq_len", "max_windows", "batch_size"):
        values = getattr(args, attr, None)
        for v in values if isinstance(values, list) else [values]:
            if v is not None and v < 1:
                raise SystemExit(f"error: --{attr.replace('_', '-')} must be positive, got {v}")
    try:
        if getattr(args, "distributed", False) or _env_wants_distributed():
            from .parallel.distributed import initialize

            initialize()
        return args.func(args)
    except (OSError, ValueError) as e:  # bad input: a file, a checkpoint, a text, a width
        if os.environ.get("LORAPRUNE_JAX_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
