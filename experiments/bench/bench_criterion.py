"""Cost of the importance criterion: `lora` (LoRA gradients only) against `vanilla` (true
gradients of the frozen weights) and the gate criteria (`fisher`, `taylor`: gradients of group
gates from the same backward pass), side by side in one process, on the same model and batch.

    python experiments/bench/bench_criterion.py --batch 1 --seq-len 128 --steps 5 \
        --criteria lora vanilla fisher taylor

Reports the compiled step's memory (XLA's memory analysis of the executable: temporaries plus
arguments and outputs) and the median step time, timed in alternation so machine noise hits both.
Optionally compares forward throughput of a pruned export against the dense model (--pruned DIR).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from loraprune_jax.config import CRITERIA, LoraConfig, PruneConfig, TrainConfig
from loraprune_jax.eval.perplexity import window_nll
from loraprune_jax.io import load_model
from loraprune_jax.models.llama_params import stack_layers
from loraprune_jax.models.lora import init_lora
from loraprune_jax.models.llama_pruning import init_masks
from loraprune_jax.train.step import init_state, make_train_step
from loraprune_jax.train.hostmem import keep_freed_memory


def main() -> None:
    keep_freed_memory()  # as the CLI does (loraprune_jax.train.hostmem)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--pruned", default=None, help="an exported pruned model directory")
    ap.add_argument("--criteria", nargs="+", default=["lora", "vanilla"], choices=CRITERIA,
                    help="compiled and timed in alternation; lora must be one of them")
    args = ap.parse_args()
    if "lora" not in args.criteria:
        ap.error("--criteria must include lora (every other criterion is compared with it)")
    config, base, _ = load_model(args.model)
    base = stack_layers(base)
    lc = LoraConfig()
    tc = TrainConfig(micro_batch_size=args.batch, seq_len=args.seq_len)
    masks = init_masks(config, stacked=True)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (1, args.batch, args.seq_len))
    batch = {"tokens": jnp.asarray(tokens, jnp.int32)}
    key = jax.random.PRNGKey(0)
    runs = {}
    for crit in dict.fromkeys(args.criteria):
        step = make_train_step(config, lc, tc, PruneConfig(criterion=crit), donate=False)
        state = init_state(init_lora(jax.random.PRNGKey(0), base, lc), masks, tc)
        compiled = step.lower(state, base, masks, batch, key).compile()
        mem = compiled.memory_analysis()
        total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        runs[crit] = {"fn": compiled, "state": state, "times": [], "temp": mem.temp_size_in_bytes,
                      "total": total}
        jax.block_until_ready(compiled(state, base, masks, batch, key))  # warm
    for _ in range(args.steps):
        for crit, r in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(r["fn"](r["state"], base, masks, batch, key))
            r["times"].append(time.perf_counter() - t0)
    print(f"model {args.model}, batch {args.batch} x {args.seq_len} tokens, {jax.default_backend()}")
    print("| criterion | step s (median) | temp memory MiB | total memory MiB |")
    print("| --- | ---: | ---: | ---: |")
    for crit, r in runs.items():
        print(f"| {crit} | {statistics.median(r['times']):.3f} | {r['temp'] / 2**20:.0f} | "
              f"{r['total'] / 2**20:.0f} |")
    lo = runs["lora"]
    for crit, r in runs.items():
        if crit == "lora":
            continue
        a, b = (lo, r) if crit == "vanilla" else (r, lo)  # lora vs vanilla; the others vs lora
        name = "lora vs vanilla" if crit == "vanilla" else f"{crit} vs lora"
        print(f"{name}: temp memory {100 * (a['temp'] / b['temp'] - 1):+.1f}%, total memory "
              f"{100 * (a['total'] / b['total'] - 1):+.1f}%, step time "
              f"{100 * (statistics.median(a['times']) / statistics.median(b['times']) - 1):+.1f}%, "
              f"throughput {100 * (statistics.median(b['times']) / statistics.median(a['times']) - 1):+.1f}%")
    if args.pruned:
        pcfg, pbase, _ = load_model(args.pruned)
        win = jnp.asarray(np.random.RandomState(1).randint(0, config.vocab_size, (8, 128)), jnp.int32)
        dense, pruned = [], []
        jax.block_until_ready(window_nll(base, None, None, win, config))
        jax.block_until_ready(window_nll(pbase, None, None, win, pcfg))
        for _ in range(args.steps):
            t0 = time.perf_counter(); jax.block_until_ready(window_nll(base, None, None, win, config))
            dense.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); jax.block_until_ready(window_nll(pbase, None, None, win, pcfg))
            pruned.append(time.perf_counter() - t0)
        d, p = statistics.median(dense), statistics.median(pruned)
        print(f"forward 8x128 tokens: dense {win.size / d:.0f} tok/s, pruned {win.size / p:.0f} tok/s "
              f"({d / p:.2f}x); parameters {pcfg.num_params() / config.num_params():.3f} of dense")


if __name__ == "__main__":
    main()
