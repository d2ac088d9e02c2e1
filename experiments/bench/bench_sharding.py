"""The train step of the bundled SmolLM2-135M on one CPU device against the same step sharded over
8 simulated CPU devices, side by side in one process.

    .venv/bin/python experiments/bench/bench_sharding.py                      # fsdp:8 and data:8, ~5 min
    .venv/bin/python experiments/bench/bench_sharding.py --meshes fsdp:8 data:2,fsdp:4 --rounds 5

Variants: `make_train_step(..., mesh=None)` on one device, and the step compiled for each mesh
(base placed by `parallel.mesh.shard_base`, LoRA / optimizer state / masks replicated, the batch
a global array split over data x fsdp). Same weights, LoRA init, batch (8 x 128 random tokens,
float32) and key for every variant. After compilation and --warmup steps, the variants' steps are
timed in alternation (--rounds rounds), so machine noise hits all of them; medians are reported,
with each variant's ratio to one device. The first step's loss of every variant must equal the
one-device loss to 1e-5 (asserted).

The 8 devices are simulated (`--xla_force_host_platform_device_count=8`) and share the same CPU
cores, so the ratio measures the cost of partitioning (collectives, resharding, smaller kernels),
not a speedup.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

N_DEVICES = 8
LOSS_TOL = 1e-5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--meshes", nargs="+", default=["fsdp:8", "data:8"],
                    help="mesh specs over the 8 simulated devices (SmolLM2: tensor must be 1 or 3)")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch (a multiple of data x fsdp)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--criterion", default="lora")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant after compiling")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (one step of each variant)")
    args = ap.parse_args(argv)

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={N_DEVICES}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from loraprune_jax.config import LoraConfig, PruneConfig, TrainConfig
    from loraprune_jax.io import load_model
    from loraprune_jax.models.llama_params import stack_layers
    from loraprune_jax.models.lora import init_lora
    from loraprune_jax.models.llama_params import shard_base
    from loraprune_jax.parallel import mesh as pm
    from loraprune_jax.models.llama_pruning import init_masks
    from loraprune_jax.train.step import init_state, make_train_step

    devices = jax.devices()
    if len(devices) < N_DEVICES:
        sys.exit(f"need {N_DEVICES} devices, have {len(devices)} (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
    t0 = time.perf_counter()
    config, base, _ = load_model(args.model, dtype="float32")
    host_base = jax.tree.map(np.asarray, base)  # numpy leaves, list layout
    del base
    print(f"model {args.model} ({config.num_params() / 1e6:.0f}M params, {config.num_heads} heads / "
          f"{config.num_kv_heads} KV heads, float32) loaded in {time.perf_counter() - t0:.1f} s; "
          f"{jax.default_backend()} with {len(devices)} simulated devices on {os.cpu_count()} cores",
          flush=True)

    lc = LoraConfig()
    tc = TrainConfig(seq_len=args.seq_len, micro_batch_size=args.batch, grad_accum=1)
    pc = PruneConfig(criterion=args.criterion)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (1, args.batch, args.seq_len))
    tokens = tokens.astype(np.int32)
    key = jax.random.PRNGKey(0)
    one_device_base = jax.device_put(stack_layers(jax.tree.map(jnp.asarray, host_base)), devices[0])
    lora0 = jax.device_get(init_lora(jax.random.PRNGKey(0), one_device_base, lc))
    masks0 = jax.device_get(init_masks(config, stacked=True))

    variants: dict[str, dict[str, Any]] = {}
    for spec in ["1 device", *args.meshes]:
        if spec == "1 device":
            mesh = None
            put = lambda x: jax.device_put(x, devices[0])  # noqa: E731
            base = one_device_base
            batch = {"tokens": put(tokens)}
            k = put(key)
        else:
            mesh = pm.make_mesh(spec, devices=devices[:N_DEVICES])
            pm.check_batch(args.batch, mesh)
            rep = pm.replicated(mesh)
            put = lambda x, rep=rep: jax.device_put(x, rep)  # noqa: E731
            base = shard_base(host_base, config, mesh)
            batch = {"tokens": pm.global_array(tokens, pm.batch_sharding(mesh))}
            k = put(key)
        state = put(init_state(lora0, masks0, tc))
        masks = put(masks0)
        step = make_train_step(config, lc, tc, pc, mesh=mesh)
        t0 = time.perf_counter()
        compiled = step.lower(state, base, masks, batch, k).compile()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        state, metrics = compiled(state, base, masks, batch, k)  # the first step (state donated)
        first = {m: float(v) for m, v in metrics.items()}
        first_s = time.perf_counter() - t0
        for _ in range(args.warmup - 1):
            state, metrics = compiled(state, base, masks, batch, k)
        jax.block_until_ready(state)
        variants[spec] = {"fn": compiled, "state": state, "base": base, "masks": masks,
                          "batch": batch, "key": k, "first": first, "compile_s": compile_s,
                          "first_s": first_s, "times": []}
        print(f"{spec}: compiled in {compile_s:.1f} s, first step {first_s:.2f} s, loss "
              f"{first['loss']:.7f}, grad norm {first['grad_norm']:.6f}", flush=True)

    for _ in range(args.rounds):
        for v in variants.values():
            t0 = time.perf_counter()
            v["state"], metrics = v["fn"](v["state"], v["base"], v["masks"], v["batch"], v["key"])
            jax.block_until_ready((v["state"], metrics))
            v["times"].append(time.perf_counter() - t0)

    ref = variants["1 device"]
    ref_time = statistics.median(ref["times"])
    ntok = args.batch * args.seq_len
    print()
    print(f"{args.model}, criterion {args.criterion}, batch {args.batch} x {args.seq_len} tokens, float32, "
          f"{args.warmup} warm-up steps, median of {args.rounds} interleaved rounds")
    print("| variant | devices | compile s | step s (median) | min - max | tokens/s | vs 1 device "
          "| first-step loss | loss - 1 device |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    worst = 0.0
    for spec, v in variants.items():
        med = statistics.median(v["times"])
        diff = v["first"]["loss"] - ref["first"]["loss"]
        worst = max(worst, abs(diff))
        ndev = 1 if spec == "1 device" else N_DEVICES
        print(f"| {spec} | {ndev} | {v['compile_s']:.1f} | {med:.3f} | {min(v['times']):.2f} - "
              f"{max(v['times']):.2f} | {ntok / med:.0f} | "
              f"{med / ref_time:.2f}x | {v['first']['loss']:.7f} | {diff:+.1e} |")
    print(f"\nThe {N_DEVICES} devices are simulated on the same {os.cpu_count()} CPU cores: the ratio to one "
          "device measures partitioning overhead (collectives, resharding, smaller per-device kernels), "
          "not a speedup.")
    assert worst <= LOSS_TOL, f"first-step losses differ from one device by {worst:.2e} > {LOSS_TOL}"
    print(f"First-step losses agree with one device to {worst:.1e} (<= {LOSS_TOL}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
