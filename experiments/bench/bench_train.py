"""Train-step cost, side by side in one process: the LoRAPrune step (LoRA gradients only, the
`lora` importance included) against a full fine-tuning step (gradients and AdamW for every
weight), and the achieved FLOP/s of each as a fraction of this machine's measured matmul peak.

    python experiments/bench/bench_train.py --batch 1 --seq-len 128 --steps 5

Same model, batch and key for both; steps timed in alternation (medians) after compilation;
memory from XLA's analysis of each compiled executable (arguments + outputs + temporaries).
FLOPs: the LoRA step does the forward pass and the activation gradients (about 2x forward; the
frozen weights need no weight gradients) plus the adapters' share; full fine-tuning also forms
every weight gradient (about 3x forward). The peak is one large `jnp.dot` in the same dtype.
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
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flops import forward_flops, lora_flops, matmul_peak  # noqa: E402

from loraprune_jax.config import LoraConfig, PruneConfig, TrainConfig  # noqa: E402
from loraprune_jax.io import load_model  # noqa: E402
from loraprune_jax.models.llama import loss  # noqa: E402
from loraprune_jax.models.llama_params import stack_layers  # noqa: E402
from loraprune_jax.models.lora import init_lora  # noqa: E402
from loraprune_jax.models.llama_pruning import init_masks  # noqa: E402
from loraprune_jax.train.step import init_state, make_train_step  # noqa: E402


def full_finetune_step(config, train_cfg):
    """One AdamW step on every base weight (what LoRA avoids), clipped like ours."""
    opt = optax.chain(optax.clip_by_global_norm(train_cfg.clip_norm), optax.adamw(train_cfg.lr))

    def step(base, opt_state, masks, batch):
        value, grads = jax.value_and_grad(loss)(base, None, masks, {"tokens": batch[0]}, config)
        updates, opt_state = opt.update(grads, opt_state, base)
        return optax.apply_updates(base, updates), opt_state, value

    return opt, jax.jit(step, donate_argnums=(0, 1))


def compiled_bytes(compiled) -> float:
    m = compiled.memory_analysis()  # donated inputs are aliased with their outputs
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    config, base, _ = load_model(args.model)
    base = stack_layers(base)
    lc = LoraConfig(dropout=0.0)
    tc = TrainConfig(micro_batch_size=args.batch, seq_len=args.seq_len)
    masks = init_masks(config, stacked=True)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (1, args.batch, args.seq_len))
    batch = jnp.asarray(tokens, jnp.int32)
    key = jax.random.PRNGKey(0)

    lora_step = make_train_step(config, lc, tc, PruneConfig(criterion="lora"))
    state = init_state(init_lora(jax.random.PRNGKey(0), base, lc), masks, tc)
    lora_c = lora_step.lower(state, base, masks, {"tokens": batch}, key).compile()
    opt, full_step = full_finetune_step(config, tc)
    opt_state = opt.init(base)
    full_c = full_step.lower(base, opt_state, masks, batch).compile()
    # Both steps donate their state, so each call takes the previous call's outputs.
    tuned = jax.tree.map(jnp.copy, base)  # full fine-tuning rewrites its own copy of the weights
    state = jax.block_until_ready(lora_c(state, base, masks, {"tokens": batch}, key))[0]
    tuned, opt_state, _ = jax.block_until_ready(full_c(tuned, opt_state, masks, batch))

    times = {"lora": [], "full": []}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state = jax.block_until_ready(lora_c(state, base, masks, {"tokens": batch}, key))[0]
        times["lora"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tuned, opt_state, _ = jax.block_until_ready(full_c(tuned, opt_state, masks, batch))
        times["full"].append(time.perf_counter() - t0)
    peak = matmul_peak(dtype=config.dtype)

    fwd = forward_flops(config, args.batch, args.seq_len)
    adapters = lora_flops(config, args.batch, args.seq_len, lc.rank)
    flops = {"lora": 2 * fwd + 3 * adapters, "full": 3 * fwd}
    mem = {"lora": compiled_bytes(lora_c), "full": compiled_bytes(full_c)}
    print(f"{args.model} on {jax.devices()[0].device_kind} ({config.dtype}), batch {args.batch} x "
          f"{args.seq_len}; matmul peak {peak / 1e9:.0f} GFLOP/s (jnp.dot 2048^3)")
    print("\n| step | median s | memory MiB | GFLOP per step | GFLOP/s | of matmul peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in ("lora", "full"):
        rate = flops[k] / med[k]
        print(f"| {k} | {med[k]:.3f} | {mem[k] / 2**20:.0f} | {flops[k] / 1e9:.1f} | "
              f"{rate / 1e9:.1f} | {rate / peak:.1%} |")
    print(f"\nLoRA step vs full fine-tuning: {med['full'] / med['lora']:.2f}x faster, memory "
          f"{mem['lora'] / mem['full'] - 1:+.1%}")


if __name__ == "__main__":
    main()
