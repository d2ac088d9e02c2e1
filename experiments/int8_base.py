"""The 8-bit frozen base on the bundled SmolLM2-135M, side by side in one run: perplexity, forward
speed and LoRAPrune train-step time of the float32 base, the int8 base (weight-only, dequantized in
the step: `base_dtype=int8`) and a W8A8 forward (int8 activations, one scale per token, int8 x int8
products with an int32 accumulator, float backward; `models.quant.w8a8`), plus the raw matmul
speed of int8 against float32 on this CPU.

    .venv/bin/python experiments/int8_base.py --text wikitext:../shared/data/wikitext-2/wiki.test.raw \
        --text wiki:heldout --max-windows 64 --json experiments/runs/int8_base.json

Perplexity follows the table's protocol (evenly spaced windows of `--seq-len` tokens). Timings are
medians of `--repeats` calls after compilation, the variants interleaved, so the ratios hold on a
busy machine; absolute times do not travel between machines (Intel AMX runs int8 about 8x float32,
AMD EPYC about 1.2x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

VARIANTS = ("float32", "int8", "w8a8")


def timed(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved (after one warm-up each)."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", action="append", default=[], help="perplexity texts (data= specs)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", nargs="+", default=["1x128", "2x256"],
                    help="train-step shapes micro_batch x seq_len (grad_accum 1)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    texts = args.text or ["wiki:heldout"]

    from loraprune_jax.config import LoraConfig, PruneConfig, TrainConfig
    from loraprune_jax.data import load_texts
    from loraprune_jax.data.packing import spread_windows, tokenize_join
    from loraprune_jax.eval.perplexity import perplexity
    from loraprune_jax.io import load_model
    from loraprune_jax.models import quant
    from loraprune_jax.models.llama import forward
    from loraprune_jax.models.llama_params import stack_layers
    from loraprune_jax.models.llama_pruning import init_masks
    from loraprune_jax.models.lora import init_lora
    from loraprune_jax.train.step import init_state, make_train_step

    config, host, tok = load_model(args.model, dtype="float32", as_numpy=True)
    bases = {
        "float32": stack_layers(jax.tree.map(jnp.asarray, host)),
        "int8": stack_layers(jax.tree.map(jnp.asarray, quant.quantize_base(host))),
    }
    bases["w8a8"] = bases["int8"]
    context = {"float32": lambda: quant.w8a8(False), "int8": lambda: quant.w8a8(False),
               "w8a8": lambda: quant.w8a8(True)}
    out: dict[str, Any] = {"model": args.model, "seq_len": args.seq_len, "backend": jax.default_backend(),
                           "cpu": _cpu_name(), "ppl": {}, "forward": {}, "step": {}, "matmul": {}}

    # Each variant is traced inside its own context (quant.w8a8 is read when a function is traced,
    # and jit caches do not key on it): perplexity's shared jit cache is cleared between them.
    for spec in texts:
        ids = tokenize_join(list(load_texts(spec, split="heldout")), tok)
        win = spread_windows(ids, args.seq_len, args.max_windows).reshape(-1)
        row = {}
        for name in VARIANTS:
            with context[name]():
                jax.clear_caches()
                row[name] = perplexity(bases[name], config, win, args.seq_len, progress=False).ppl
        out["ppl"][spec] = row
        print(f"ppl {spec}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items())
              + f"; int8/float32 {row['int8'] / row['float32'] - 1:+.2%}, "
              f"w8a8/float32 {row['w8a8'] / row['float32'] - 1:+.2%}", flush=True)

    # forward throughput, 8 x seq_len tokens
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (8, args.seq_len)), jnp.int32)
    fwd = {}
    for name in VARIANTS:
        with context[name]():
            fn = jax.jit(lambda b, t: forward(b, None, None, t, config))
            fwd[name] = (lambda fn=fn, b=bases[name]: fn(b, tokens))
            jax.block_until_ready(fwd[name]())  # traced (and cached) inside the context
    t = timed(fwd, args.repeats)
    out["forward"] = {k: {"seconds": v, "tokens_per_s": tokens.size / v} for k, v in t.items()}
    print("forward 8x%d: " % args.seq_len + ", ".join(f"{k} {tokens.size / v:.0f} tok/s" for k, v in t.items()),
          flush=True)

    # LoRAPrune train step (lora criterion, LoRA on all seven projections)
    lora_cfg = LoraConfig()
    for shape in args.steps:
        mb, seq = (int(x) for x in shape.split("x"))
        tc = TrainConfig(seq_len=seq, micro_batch_size=mb, grad_accum=1)
        masks = init_masks(config, stacked=True)
        lora = init_lora(jax.random.PRNGKey(0), bases["float32"], lora_cfg)
        batch = {"tokens": jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (1, mb, seq)),
                                       jnp.int32)}
        key = jax.random.PRNGKey(0)
        steps = {}
        for name in VARIANTS:
            with context[name]():
                step = make_train_step(config, lora_cfg, tc, PruneConfig(criterion="lora"), donate=False)
                state = init_state(lora, masks, tc)
                steps[name] = (lambda s=step, st=state, b=bases[name]: s(st, b, masks, batch, key))
                jax.block_until_ready(steps[name]())  # traced (and cached) inside the context
        t = timed(steps, args.repeats)
        out["step"][shape] = t
        print(f"train step {shape}: " + ", ".join(f"{k} {v:.3f} s" for k, v in t.items())
              + f"; int8/float32 {t['int8'] / t['float32']:.2f}x, w8a8/float32 {t['w8a8'] / t['float32']:.2f}x",
              flush=True)

    # raw products: float32 x float32 against int8 x int8 -> int32, SmolLM2's and LLaMA-7B's MLP
    for m, k, n in [(128, 576, 1536), (512, 4096, 11008)]:
        rng = np.random.default_rng(2)
        xf = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        wf = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        xi, wi = xf.astype(jnp.int8), wf.astype(jnp.int8)
        f32 = jax.jit(lambda a, b: a @ b)
        i8 = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.int32))
        t = timed({"float32": lambda: f32(xf, wf), "int8": lambda: i8(xi, wi)}, args.repeats)
        flops = 2 * m * k * n
        out["matmul"][f"{m}x{k}x{n}"] = {kk: flops / v / 1e9 for kk, v in t.items()}
        print(f"matmul {m}x{k}x{n}: float32 {flops / t['float32'] / 1e9:.0f} GFLOP/s, int8 "
              f"{flops / t['int8'] / 1e9:.0f} GOP/s ({t['float32'] / t['int8']:.1f}x)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
