"""Per-device memory of the sharded train step for LLaMA-7B ... 65B and LLaMA-3-8B, by compiling
it for simulated device meshes: `lora` (LoRA gradients only) against `vanilla` (true weight
gradients), nothing allocated.

    .venv/bin/python experiments/memory_plans.py                  # the default plan, ~5 min
    .venv/bin/python experiments/memory_plans.py --models 7b --meshes fsdp:8 --remat on off \
        --json plans.json --markdown
    # the int8 base against bf16, one device and the smallest meshes fitting 16 / 32 / 80 GiB (~8 min)
    .venv/bin/python experiments/memory_plans.py --models 7b 13b 30b 65b --criteria lora \
        --meshes none fsdp:2 fsdp:4 fsdp:8 fsdp:16 fsdp:32 fsdp:64 --base-dtypes bfloat16 int8 --fit

Every array is an abstract `jax.ShapeDtypeStruct` carrying its `NamedSharding` (the base by
`parallel.mesh.param_shardings`, stacked layers, with `--base-dtypes int8` its projections as
int8 values and float32 scales; LoRA, optimizer state, masks and key replicated;
the batch split over data x fsdp). The step of `train.step.make_train_step` is lowered and compiled
for the mesh, and XLA's memory analysis of the compiled per-device program gives argument, output,
alias and temporary bytes; total = argument + output + temp - alias (the donated train state is
aliased). On CPU (the default) the meshes are `--xla_force_host_platform_device_count=64`
simulated devices, so these are XLA *CPU* compiler plans, not TPU measurements.

XLA CPU has no bf16 matmuls: it converts bf16 dot operands to f32. With the default
while-loop-invariant code motion it hoists those converts out of the layer scan and holds an f32
copy of every local weight shard (twice the bf16 weights) for the whole step, which a TPU or GPU
would not. The script therefore disables that one pass on CPU (`--licm` keeps it); the f32
all-gathers of single layers and of the LM head remain (a CPU overestimate of roughly one layer's
and the head's weights).

`--meshes none` compiles the unsharded step for one device; with `JAX_PLATFORMS=cuda` (or tpu)
that is the accelerator's own compiler, and `--execute` then also runs one step (constant weights)
and reports the device's peak bytes in use (one process per row gives clean peaks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

GiB = 2**30
HBM = {"v5e": 16, "v4": 32, "A100/H100": 80}  # GiB per chip

MODELS: dict[str, dict[str, Any]] = {
    # LLaMA-1 shapes (vocab 32000, head_dim 128, untied head, rope 1e4) and LLaMA-3-8B (GQA).
    "7b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008),
    "13b": dict(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, intermediate_size=13824),
    "30b": dict(hidden_size=6656, num_layers=60, num_heads=52, num_kv_heads=52, intermediate_size=17920),
    "65b": dict(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=64, intermediate_size=22016),
    "llama3-8b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                      intermediate_size=14336, vocab_size=128256, rope_theta=5e5),
}
NAMES = {"7b": "LLaMA-7B", "13b": "LLaMA-13B", "30b": "LLaMA-30B", "65b": "LLaMA-65B",
         "llama3-8b": "LLaMA-3-8B"}

# Default plan: (mesh, remat) per model; every entry is compiled for each criterion.
PLAN: dict[str, list[tuple[str, bool]]] = {
    "7b": [("fsdp:8", True), ("fsdp:8", False), ("fsdp:4,tensor:2", True)],
    "llama3-8b": [("fsdp:8", True)],
    "13b": [("fsdp:8", True), ("fsdp:16", True)],
    "30b": [("fsdp:16", True), ("fsdp:32", True)],
    "65b": [("fsdp:32", True), ("fsdp:64", True)],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(PLAN), choices=list(MODELS))
    ap.add_argument("--meshes", nargs="+", default=None,
                    help="mesh specs for every model (e.g. fsdp:8 'fsdp:4,tensor:2', or none for "
                         "the unsharded one-device step); default: the per-model plan")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (the paper's 512)")
    ap.add_argument("--micro-batch", type=int, default=1,
                    help="sequences per batch shard; the global micro-batch is this times data x fsdp")
    ap.add_argument("--remat", nargs="+", default=None, choices=["on", "off"],
                    help="default: the per-model plan (7B both, the rest on)")
    ap.add_argument("--criteria", nargs="+", default=["lora", "vanilla"],
                    help="criteria to compile (e.g. lora vanilla fisher); each row's 'against' "
                         "column compares lora with vanilla and any other criterion with lora")
    ap.add_argument("--base-dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "int8"],
                    help="how the frozen base is held: bfloat16, or int8 projections (one float32 "
                         "scale per output channel; base_dtype=int8); each is compiled")
    ap.add_argument("--fit", action="store_true",
                    help="per model and base: stop at the first mesh (in the order given) whose "
                         "total fits the smallest HBM size, and list the smallest mesh fitting each")
    ap.add_argument("--licm", action="store_true",
                    help="keep XLA CPU's while-loop-invariant code motion (f32 copies of all weights)")
    ap.add_argument("--execute", action="store_true",
                    help="also run one step and report the device's peak bytes in use (GPU/TPU)")
    ap.add_argument("--json", default=None, metavar="OUT", help="write the rows as JSON")
    ap.add_argument("--markdown", action="store_true", help="print only the Markdown table and notes")
    return ap.parse_args(argv)


def plan_rows(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    rows = []
    for model in args.models:
        meshes = args.meshes or list(dict.fromkeys(m for m, _ in PLAN[model]))
        for mesh in meshes:
            if args.remat is not None:
                remats = [r == "on" for r in args.remat]
            elif args.meshes is None:
                remats = [r for m, r in PLAN[model] if m == mesh]
            else:
                remats = [True]
            rows += [(model, mesh, r) for r in remats]
    return rows


def mesh_devices(spec: str) -> int:
    if spec == "none":
        return 1
    return math.prod(int(p.split(":")[1]) for p in spec.split(","))


def setup_env(args: argparse.Namespace, rows: list[tuple[str, str, bool]]) -> None:
    """XLA flags before jax is imported: simulated devices and, on CPU, no loop-invariant hoisting."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    cpu = os.environ["JAX_PLATFORMS"].startswith("cpu")
    if cpu and "xla_force_host_platform_device_count" not in flags:
        flags += f" --xla_force_host_platform_device_count={max(64, *(mesh_devices(m) for _, m, _ in rows))}"
    if cpu and not args.licm and "xla_disable_hlo_passes" not in flags:
        flags += " --xla_disable_hlo_passes=while-loop-invariant-code-motion"
    os.environ["XLA_FLAGS"] = flags.strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = plan_rows(args)
    setup_env(args, rows)

    import jax
    import jax.numpy as jnp

    from loraprune_jax.config import PROJECTIONS, LlamaConfig, LoraConfig, PruneConfig, TrainConfig
    from loraprune_jax.models.quant import quantize_abstract
    from loraprune_jax.models.llama_params import layer_shapes
    from loraprune_jax.models.lora import init_lora
    from loraprune_jax.models.llama_params import base_shardings
    from loraprune_jax.parallel import mesh as pm
    from loraprune_jax.models.llama_pruning import init_masks
    from loraprune_jax.train.step import init_state, make_train_step

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.markdown else sys.stdout, flush=True)

    def config_for(model: str) -> LlamaConfig:
        kw = {"vocab_size": 32000, "head_dim": 128, "rope_theta": 1e4, **MODELS[model]}
        return LlamaConfig(**kw, rms_norm_eps=1e-6, tie_word_embeddings=False, dtype="bfloat16")

    def abstract_base(cfg: LlamaConfig, shardings: dict[str, Any] | None,
                      base_dtype: str | None) -> dict[str, Any]:
        dt, n = cfg.jnp_dtype, cfg.num_layers
        d, v = cfg.hidden_size, cfg.vocab_size
        sh = shardings or {"layers": {}}

        def sds(shape: tuple[int, ...], s: Any) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(shape, dt, sharding=s)

        def weight(k: str, shape: tuple[int, ...]) -> Any:
            s = sh["layers"].get(k)
            if base_dtype != "int8" or k not in PROJECTIONS:
                return sds((n, *shape), s)
            return quantize_abstract(sds((n, *shape), None), s and s.qvalue, s and s.scale)

        return {
            "embed": sds((v, d), sh.get("embed")),
            "final_norm": sds((d,), sh.get("final_norm")),
            "lm_head": sds((d, v), sh.get("lm_head")),
            "layers": {k: weight(k, s) for k, s in layer_shapes(cfg, 0).items()},
        }

    def with_sharding(tree: Any, sharding: Any) -> Any:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)

    def nbytes(tree: Any) -> int:
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

    lc = LoraConfig()
    results: list[dict[str, Any]] = []
    sanity: dict[str, str] = {}
    log(f"backend {jax.default_backend()}, {len(jax.devices())} devices; XLA_FLAGS={os.environ['XLA_FLAGS']!r}")
    fitted: set[tuple[str, str]] = set()  # (model, base) already fitting the smallest HBM (--fit)
    smallest = min(HBM.values())
    for (model, spec, remat), base_name in ((r, b) for r in rows for b in args.base_dtypes):
        if args.fit and (model, base_name) in fitted:
            continue
        base_dtype = "int8" if base_name == "int8" else None
        cfg = config_for(model)
        n_dev = mesh_devices(spec)
        mesh = None if spec == "none" else pm.make_mesh(spec, devices=jax.devices()[:n_dev])
        sizes = pm.mesh_sizes(mesh) if mesh is not None else {"data": 1, "fsdp": 1, "tensor": 1}
        shards = sizes["data"] * sizes["fsdp"]
        micro = args.micro_batch * shards
        shardings = (base_shardings(cfg, mesh, stacked=True, base_dtype=base_dtype)
                     if mesh is not None else None)
        rep = pm.replicated(mesh) if mesh is not None else None
        base = abstract_base(cfg, shardings, base_dtype)
        lora = jax.eval_shape(lambda b: init_lora(jax.random.PRNGKey(0), b, lc), base)
        masks = with_sharding(jax.eval_shape(lambda: init_masks(cfg, stacked=True)), rep)
        key = with_sharding(jax.eval_shape(lambda: jax.random.PRNGKey(0)), rep)
        batch_sh = pm.batch_sharding(mesh) if mesh is not None else None
        batch = {"tokens": jax.ShapeDtypeStruct((1, micro, args.seq_len), jnp.int32, sharding=batch_sh)}
        params = cfg.num_params()
        for crit in args.criteria:
            tc = TrainConfig(seq_len=args.seq_len, micro_batch_size=micro, grad_accum=1, remat=remat)
            state = with_sharding(jax.eval_shape(lambda l, m: init_state(l, m, tc), lora, masks), rep)
            step = make_train_step(cfg, lc, tc, PruneConfig(criterion=crit), mesh=mesh,
                                   base_dtype=base_dtype)
            t0 = time.perf_counter()
            lowered = step.lower(state, base, masks, batch, key)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            mem = compiled.memory_analysis()
            arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
            alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
            row = {
                "model": NAMES[model], "key": model, "params_b": params / 1e9, "mesh": spec,
                "base": base_name,
                "devices": n_dev, "criterion": crit, "remat": remat, "seq_len": args.seq_len,
                "micro_batch": micro, "per_shard_batch": args.micro_batch,
                "argument_gib": arg / GiB, "output_gib": out / GiB, "alias_gib": alias / GiB,
                "temp_gib": temp / GiB, "total_gib": (arg + out + temp - alias) / GiB,
                "weights_per_device_gib": nbytes(base) / n_dev / GiB,
                "state_gib": nbytes(state) / GiB, "lower_s": t1 - t0, "compile_s": t2 - t1,
                "backend": jax.default_backend(),
            }
            if args.execute:
                row["peak_gib"] = execute(jax, jnp, compiled, state, base, masks, batch, key) / GiB
            results.append(row)
            log(f"{NAMES[model]} {spec} {crit} remat={'on' if remat else 'off'}: args "
                f"{row['argument_gib']:.2f} out {row['output_gib']:.2f} alias {row['alias_gib']:.2f} temp "
                f"{row['temp_gib']:.2f} total {row['total_gib']:.2f} GiB"
                + (f", peak {row['peak_gib']:.2f} GiB" if "peak_gib" in row else "")
                + f" (lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s)")
            del compiled, lowered
        if args.fit and all(r["total_gib"] <= smallest for r in results[-len(args.criteria):]):
            fitted.add((model, base_name))
        # Sanity: the sharded weights plus the replicated train state should be the arguments.
        mine = [r for r in results if r["key"] == model and r["mesh"] == spec and r["base"] == base_name]
        if len(mine) > len(args.criteria):
            continue  # this mesh was checked already (another remat setting)
        expect = mine[0]["weights_per_device_gib"] + mine[0]["state_gib"]
        got = mine[0]["argument_gib"]
        flag = "" if abs(got / expect - 1) < 0.03 else "  <-- MISMATCH: the base is not sharded as the rules say"
        sanity.setdefault(model, f"{NAMES[model]}: {params / 1e9:.2f}B params, bf16 weights "
                                 f"{params * 2 / GiB:.2f} GiB; replicated train state (LoRA f32 + AdamW "
                                 f"mu, nu + scores) {mine[0]['state_gib']:.3f} GiB + masks;")
        sanity[model] += (f" {spec} {base_name}: weights/{n_dev} = "
                          f"{mine[0]['weights_per_device_gib']:.3f} GiB, + state = {expect:.3f}, "
                          f"compiled argument {got:.3f} GiB{flag};")

    table = markdown(results)
    print(table)
    print()
    for line in sanity.values():
        print("* " + line.rstrip(";"))
    if args.fit:
        print()
        print(fit_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": results, "xla_flags": os.environ["XLA_FLAGS"],
                       "backend": jax.default_backend(), "jax": jax.__version__}, f, indent=1)
    return 0


def execute(jax: Any, jnp: Any, compiled: Any, state: Any, base: Any, masks: Any, batch: Any,
            key: Any) -> int:
    """Run the compiled step once and return the device's peak bytes in use.

    Every leaf is a constant built on the device one at a time (weights 0.02, masks 1, the rest 0),
    so building the inputs adds no temporaries to the peak; memory does not depend on values.
    """
    def make(tree: Any, value: float) -> Any:
        def one(x: Any) -> Any:
            fill = value if jnp.issubdtype(x.dtype, jnp.floating) else 0
            return jax.jit(lambda: jnp.full(x.shape, fill, x.dtype), out_shardings=x.sharding)()
        return jax.tree.map(one, tree)

    inputs = (make(state, 0.0), make(base, 0.02), make(masks, 1.0), make(batch, 0.0), make(key, 0.0))
    jax.block_until_ready(compiled(*inputs))
    stats = jax.devices()[0].memory_stats() or {}  # None on CPU
    return int(stats.get("peak_bytes_in_use", 0))


def fit_table(rows: list[dict[str, Any]]) -> str:
    """Per model, criterion and base: one device's total, and the fewest devices (of the meshes
    compiled) whose per-device total fits each HBM size."""
    lines = ["| model | criterion | base | one device GiB | "
             + " | ".join(f"fits {v} GiB ({k})" for k, v in sorted(HBM.items(), key=lambda kv: kv[1]))
             + " |", "| --- | --- | --- | ---: |" + " --- |" * len(HBM)]
    keys = dict.fromkeys((r["model"], r["criterion"], r["base"]) for r in rows)
    for model, crit, base in keys:
        mine = sorted((r for r in rows if (r["model"], r["criterion"], r["base"]) == (model, crit, base)),
                      key=lambda r: r["devices"])
        one = next((f"{r['total_gib']:.2f}" for r in mine if r["devices"] == 1), "-")
        cells = []
        for _, size in sorted(HBM.items(), key=lambda kv: kv[1]):
            fit = next((r for r in mine if r["total_gib"] <= size), None)
            where = "one device" if fit and fit["devices"] == 1 else fit and fit["mesh"]
            cells.append(f"{where} ({fit['total_gib']:.2f})" if fit else "none compiled")
        lines.append(f"| {model} | {crit} | {base} | {one} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]]) -> str:
    peak = any("peak_gib" in r for r in rows)
    head = ("| model | params (B) | mesh | devices | base | criterion | remat | seq x global batch | args GiB "
            "| out GiB | alias GiB | temp GiB | total GiB/device | against | fits (v5e 16, v4 32, 80 GiB) "
            "| compile s |")
    lines = [head + (" peak GiB |" if peak else ""),
             "| --- | ---: | --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"
             + (" ---: |" if peak else "")]
    for r in rows:
        ratio = ""
        if r["criterion"] != "vanilla":  # lora against vanilla, every other criterion against lora
            ref = "vanilla" if r["criterion"] == "lora" else "lora"
            same = [v for v in rows if v["criterion"] == ref and
                    all(v[k] == r[k] for k in ("key", "mesh", "base", "remat", "seq_len", "micro_batch"))]
            if same:
                ratio = f"{100 * (r['total_gib'] / same[0]['total_gib'] - 1):+.1f}% vs {ref}"
        fits = "+".join(k for k, v in sorted(HBM.items(), key=lambda kv: kv[1]) if r["total_gib"] <= v) or "no"
        lines.append(
            f"| {r['model']} | {r['params_b']:.2f} | {r['mesh']} | {r['devices']} | {r['base']} | {r['criterion']} | "
            f"{'on' if r['remat'] else 'off'} | {r['seq_len']} x {r['micro_batch']} | "
            f"{r['argument_gib']:.2f} | {r['output_gib']:.2f} | {r['alias_gib']:.2f} | {r['temp_gib']:.2f} | "
            f"**{r['total_gib']:.2f}** | {ratio} | {fits} | {r['compile_s']:.1f} |"
            + ((f" {r['peak_gib']:.2f} |" if r.get("peak_gib") else " n/a |") if peak else "")
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
