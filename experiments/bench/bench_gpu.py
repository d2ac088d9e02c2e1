"""The train step on one accelerator at LLaMA-7B size: `lora` against `vanilla`, side by side.

    python experiments/bench/bench_gpu.py --model llama-7b --batch 2 --seq-len 512 --steps 5

Random bf16 weights of the real shapes are created on the device (no checkpoint needed), the
step is compiled for a one-device mesh exactly as `loraprune-jax prune` compiles it, and the two
criteria are timed in alternation. Reports the median step time, tokens/s, XLA's memory analysis
of each executable, and the device's peak memory after each criterion's first steps (the
allocator's high-water mark; `vanilla` runs second, so its figure is the larger of the two).
`--model tiny` runs the same code on a small config (a CPU check of the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from loraprune_jax.config import LlamaConfig, LoraConfig, PruneConfig, TrainConfig
from loraprune_jax.models.llama_params import base_shardings, layer_shapes
from loraprune_jax.models.lora import init_lora
from loraprune_jax.parallel.mesh import batch_sharding, global_array, make_mesh, replicated
from loraprune_jax.models.llama_pruning import init_masks
from loraprune_jax.train.step import init_state, make_train_step

MODELS = {
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                     num_heads=32, num_kv_heads=32, head_dim=128, rope_theta=1e4,
                     rms_norm_eps=1e-6, tie_word_embeddings=False),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                       rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4,
                 num_heads=4, num_kv_heads=4, head_dim=32, rope_theta=1e4, rms_norm_eps=1e-6,
                 tie_word_embeddings=False),
}


def random_base(config: LlamaConfig, mesh, dtype) -> dict:
    """Random stacked weights made on the devices (nothing crosses from the host)."""
    shardings = base_shardings(config, mesh, stacked=True)
    shapes = {"embed": (config.vocab_size, config.hidden_size),
              "final_norm": (config.hidden_size,),
              "lm_head": (config.hidden_size, config.vocab_size),
              "layers": {k: (config.num_layers,) + v for k, v in layer_shapes(config, 0).items()}}

    def make():
        leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
        keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
        out = [0.02 * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves)]
        return jax.tree.map(lambda x: x.astype(dtype), jax.tree.unflatten(tree, out))

    return jax.jit(make, out_shardings=shardings)()


def peak_bytes() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats.get("peak_bytes_in_use", float("nan")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-7b", choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 off CPU, float32 on CPU")
    ap.add_argument("--no-remat", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    config = LlamaConfig(**MODELS[args.model], dtype=dtype)
    mesh = make_mesh("fsdp:1")
    rep = replicated(mesh)
    lc = LoraConfig()
    tc = TrainConfig(micro_batch_size=args.batch, seq_len=args.seq_len, remat=not args.no_remat)
    print(f"{jax.devices()[0].device_kind}: {args.model} {config.num_params() / 1e9:.2f}B "
          f"params, {dtype}, batch {args.batch} x {args.seq_len}, remat={tc.remat}", flush=True)
    base = random_base(config, mesh, jnp.dtype(dtype))
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
    masks = jax.jit(lambda: init_masks(config, stacked=True), out_shardings=rep)()
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (1, args.batch, args.seq_len))
    batch = {"tokens": global_array(tokens.astype(np.int32), batch_sharding(mesh))}
    key = global_array(np.asarray(jax.random.PRNGKey(1)), rep)
    base_peak = peak_bytes()
    runs = {}
    for crit in ("lora", "vanilla"):
        step = make_train_step(config, lc, tc, PruneConfig(criterion=crit), mesh=mesh, donate=False)

        @jax.jit
        def fresh():
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), like)
            return init_state(init_lora(jax.random.PRNGKey(0), zeros, lc), masks, tc)

        state = jax.device_put(fresh(), rep)
        t0 = time.perf_counter()
        compiled = step.lower(state, base, masks, batch, key).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        out = compiled(state, base, masks, batch, key)
        jax.block_until_ready(out)
        runs[crit] = {"fn": compiled, "state": state, "times": [], "compile_s": compile_s,
                      "temp_gib": mem.temp_size_in_bytes / 2**30,
                      "args_gib": mem.argument_size_in_bytes / 2**30,
                      "loss": float(out[1]["loss"]), "peak_gib": peak_bytes() / 2**30}
        print(f"{crit}: compiled in {compile_s:.1f}s, temp {runs[crit]['temp_gib']:.2f} GiB, "
              f"args {runs[crit]['args_gib']:.2f} GiB, peak so far {runs[crit]['peak_gib']:.2f} "
              f"GiB, loss {runs[crit]['loss']:.4f}", flush=True)
    for _ in range(args.steps):  # alternate, so drifts in clocks hit both
        for r in runs.values():
            t0 = time.perf_counter()
            jax.block_until_ready(r["fn"](r["state"], base, masks, batch, key))
            r["times"].append(time.perf_counter() - t0)
    tokens_per_step = args.batch * args.seq_len
    rows = {}
    for crit, r in runs.items():
        med = statistics.median(r["times"])
        rows[crit] = {"step_s": med, "tokens_per_s": tokens_per_step / med,
                      **{k: r[k] for k in ("compile_s", "temp_gib", "args_gib", "peak_gib", "loss")}}
    lo, va = rows["lora"], rows["vanilla"]
    print("\n| criterion | step (s) | tokens/s | XLA temp (GiB) | args (GiB) | device peak (GiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for crit, r in rows.items():
        print(f"| {crit} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['temp_gib']:.2f} | "
              f"{r['args_gib']:.2f} | {r['peak_gib']:.2f} |")
    print(f"\nlora vs vanilla: step time {lo['step_s'] / va['step_s'] - 1:+.1%}, throughput "
          f"{lo['tokens_per_s'] / va['tokens_per_s'] - 1:+.1%}, XLA temp memory "
          f"{lo['temp_gib'] / va['temp_gib'] - 1:+.1%}, peak {lo['peak_gib'] / va['peak_gib'] - 1:+.1%} "
          f"(peak before the steps: {base_peak / 2**30:.2f} GiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "device": jax.devices()[0].device_kind,
                       "dtype": dtype, "batch": args.batch, "seq_len": args.seq_len,
                       "remat": tc.remat, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
