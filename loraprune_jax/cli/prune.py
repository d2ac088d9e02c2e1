"""``loraprune-jax prune`` and ``demo``: a run's config from defaults, a YAML file and
``key=value`` arguments, the run (:mod:`loraprune_jax.run`), and a short summary of it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .checks import check_output_dir


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
    from ..config import VISION_MODELS, ClassifierConfig, RunConfig, build_run_config
    from ..run.prune import run_prune

    if args.resume:
        if args.overrides or args.config:
            raise ValueError("--resume takes the run's saved config; give no overrides")
        from ..run.rundir import saved_run_config

        if saved_run_config(args.resume).get("model") in VISION_MODELS:
            raise ValueError(f"{args.resume} is an image-classifier run, which cannot resume "
                             "(they take minutes): run it again with a new out=")
        cfg = RunConfig(out=args.resume)
    else:
        cfg = build_run_config(args.config, args.overrides)
        check_output_dir(cfg.out, "out")  # before anything loads: not there yet, and writable
    if isinstance(cfg, ClassifierConfig):
        from ..run.classifier import run_classifier

        metrics = run_classifier(cfg, log=lambda m: print(m, file=sys.stderr))
        print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
        return 0
    try:
        metrics = run_prune(cfg, resume=bool(args.resume), progress=not args.no_progress,
                            log=lambda m: print(m, file=sys.stderr))
    except KeyboardInterrupt:
        if (Path(cfg.out) / "run_config.json").is_file():
            raise KeyboardInterrupt(f"continue with: loraprune-jax prune --resume {cfg.out}") from None
        raise
    from ..parallel.distributed import is_primary

    if is_primary():
        print_summary(metrics, cfg.out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: prune the bundled SmolLM2 on the bundled Wikipedia text with defaults."""
    args.config, args.resume = None, None
    return cmd_prune(args)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``prune`` on the ``loraprune-jax`` subparsers."""
    pr = subparsers.add_parser("prune", help="LoRAPrune a model (key=value overrides, see RunConfig; "
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
    return pr


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``demo`` (``prune`` with the defaults) on the ``loraprune-jax`` subparsers."""
    demo = subparsers.add_parser("demo", help="the main job: prune the bundled SmolLM2 on bundled text")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="as for prune")
    demo.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    demo.set_defaults(func=cmd_demo)
    return demo


__all__ = ["add_demo_parser", "add_parser", "cmd_demo", "cmd_prune", "print_summary"]
