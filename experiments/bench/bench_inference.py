"""Inference speed, side by side in one process: the dense model against models pruned to 20%
and 50% (sliced and merged: a smaller dense model), each against its FLOP ratio (the ideal);
and a model whose LoRA is left unmerged (masks applied, adapters as extra matmuls) against the
same model merged (the paper: unmerged costs about +54%).

    python experiments/bench/bench_inference.py --batch 8 --seq-len 128 --rounds 5

The pruned models keep the groups of random scores under the default schedule's allocation
(uniform per layer, first 10% and last layer excluded), which gives exactly the widths of a real
run; speed does not depend on which groups are kept. The forward pass is the jitted perplexity
function (`window_nll`), timed in alternation across variants, medians after compilation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flops import forward_flops, lora_flops  # noqa: E402

from loraprune_jax.config import LoraConfig  # noqa: E402
from loraprune_jax.eval.perplexity import window_nll  # noqa: E402
from loraprune_jax.io import load_model  # noqa: E402
from loraprune_jax.models.llama_params import stack_layers  # noqa: E402
from loraprune_jax.models.lora import init_lora  # noqa: E402
from loraprune_jax.models.llama_pruning import init_masks  # noqa: E402
from loraprune_jax.core.masks import update_masks  # noqa: E402
from loraprune_jax.core.trees import excluded_layers  # noqa: E402
from loraprune_jax.models.llama_pruning import slice_and_merge  # noqa: E402
from loraprune_jax.train.hostmem import keep_freed_memory


def pruned(base, config, ratio: float, seed: int = 0):
    """A model sliced to ``ratio`` with random group scores (uniform allocation)."""
    masks = init_masks(config)
    rng = np.random.RandomState(seed)
    scores = {"layers": [{k: rng.rand(*np.shape(v)) for k, v in layer.items()}
                         for layer in masks["layers"]]}
    masks = update_masks(masks, scores, ratio, excluded=excluded_layers(config.num_layers))
    return slice_and_merge(base, None, masks, config)


def main() -> None:
    keep_freed_memory()  # as the CLI does (loraprune_jax.train.hostmem)
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    args = ap.parse_args()
    config, base, _ = load_model(args.model)
    lc = LoraConfig()
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, config.vocab_size,
                                                          (args.batch, args.seq_len)), jnp.int32)
    variants = {"dense": (stack_layers(base), config, None, None, None)}
    for r in args.ratios:
        small, small_cfg = pruned(base, config, r)
        variants[f"pruned {r:.0%}"] = (small, small_cfg, None, None, None)
    # LoRA at inference: the trained adapters unmerged (masks all ones, B non-zero) vs merged.
    lora = init_lora(jax.random.PRNGKey(0), base, lc)
    lora = jax.tree.map(lambda x: x + 0.01, lora)
    masks = init_masks(config)
    merged, _ = slice_and_merge(base, lora, None, config, lc)
    variants["LoRA unmerged"] = (stack_layers(base), config, stack_layers(lora),
                                 init_masks(config, stacked=True), lc)
    variants["LoRA merged"] = (stack_layers(merged), config, None, None, None)
    del masks

    times = {k: [] for k in variants}
    for v in variants.values():
        jax.block_until_ready(window_nll(v[0], v[2], v[3], tokens, v[1], v[4]))  # compile
    for _ in range(args.rounds):
        for name, v in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(window_nll(v[0], v[2], v[3], tokens, v[1], v[4]))
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(t) for k, t in times.items()}
    n = tokens.size
    dense_flops = forward_flops(config, args.batch, args.seq_len)
    print(f"{args.model} on {jax.devices()[0].device_kind} ({config.dtype}), forward of "
          f"{args.batch} x {args.seq_len} tokens, median of {args.rounds} alternating rounds")
    print("\n| model | params (M) | tokens/s | speed-up vs dense | FLOP ratio (ideal) | of ideal |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, v in variants.items():
        cfg = v[1]
        fl = forward_flops(cfg, args.batch, args.seq_len)
        if v[2] is not None:
            fl += lora_flops(cfg, args.batch, args.seq_len, lc.rank)
        speed = med["dense"] / med[name]
        ideal = dense_flops / fl
        print(f"| {name} | {cfg.num_params() / 1e6:.1f} | {n / med[name]:.0f} | {speed:.2f}x | "
              f"{ideal:.2f}x | {speed / ideal:.0%} |")
    extra = med["LoRA unmerged"] / med["LoRA merged"] - 1
    print(f"\nunmerged LoRA costs {extra:+.1%} inference time against merged (the paper: +54%)")


if __name__ == "__main__":
    main()
