"""lm-evaluation-harness on the bundled SmolLM2-135M, side by side in one process: the harness's
own PyTorch ``hf`` model against our ``loraprune-jax`` model on the same offline tasks (the
harness's YAMLs on the release files of ``../shared/data``), first ``--limit`` documents each.

    PYTHONPATH=. python experiments/bench/bench_harness.py --tasks piqa arc_easy --limit 100 \
        --data-dir ../shared/data --json harness-bench.json

Each model is timed from construction to results (a new user's run: our first run includes every
XLA compilation, no persistent cache). For ours the compilations are counted and timed with
``jax.monitoring`` (backend compile events, with tracing and lowering). The accuracies of both
must be identical; the per-request log-likelihoods are compared too (largest difference).

Measured (2 shared CPU cores, load average about 3.5, float32, piqa + arc_easy, 599 requests;
the two runs of a line in one process): before the packed scoring hf 265.9 s, ours 53.8 s
(36 compilations, 5.3 s compiling); after hf 203.7 s, ours 72.0 s (35, 9.3 s); identical
accuracies, largest log-likelihood difference 9e-4. The machine's load swings more than the
change: old against new ``score_tokens`` alternated in one process took 76.4 / 84.1 s (cold /
warm) against 44.5 / 61.7 s.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict

import jax

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

EVENTS = {
    "/jax/core/compile/backend_compile_duration": "compile",
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
}
_stats: dict[str, list[float]] = defaultdict(list)


def _listen(event: str, duration: float, **_: object) -> None:
    if event in EVENTS:
        _stats[EVENTS[event]].append(duration)


def run(model: str, model_args: str, tasks: list[str], manager, limit: int, batch_size):
    """``simple_evaluate`` of one model: ``(wall seconds, its output with samples)``."""
    import lm_eval

    _stats.clear()
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks,
                                  task_manager=manager, limit=limit, batch_size=batch_size,
                                  device="cpu", log_samples=True)
    wall = time.perf_counter() - t0
    return wall, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["piqa", "arc_easy"])
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--hf-batch-size", default="16")
    p.add_argument("--jax-batch-size", default=None, help="rows per call (default: ours)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()

    import loraprune_jax.eval.harness  # noqa: F401 - registers loraprune-jax
    from loraprune_jax.eval.harness_tasks import offline_tasks
    from loraprune_jax.io import smollm2_cache_path

    jax.monitoring.register_event_duration_secs_listener(_listen)
    manager = offline_tasks(a.tasks, a.data_dir, tempfile.mkdtemp(prefix="bench_harness_"))
    hf_dir = smollm2_cache_path()
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        from loraprune_jax.io import load_model

        load_model("smollm2")  # writes the HF conversion
    report: dict[str, dict] = {}
    runs = [("loraprune-jax", "pretrained=smollm2,dtype=float32", a.jax_batch_size)]
    if not a.skip_hf:
        runs.insert(0, ("hf", f"pretrained={hf_dir},dtype=float32", a.hf_batch_size))
    samples = {}
    for model, args, bs in runs:
        wall, out = run(model, args, a.tasks, manager, a.limit, bs)
        n_req = sum(len(s["resps"]) for t in a.tasks for s in out["samples"][t])
        entry = {"wall_s": round(wall, 2), "requests": n_req, "batch_size": bs,
                 "results": {t: {k: out["results"][t].get(k)
                                 for k in ("acc,none", "acc_norm,none")} for t in a.tasks}}
        if model != "hf":
            entry.update(compilations=len(_stats["compile"]),
                         compile_s=round(sum(_stats["compile"]), 2),
                         trace_lower_s=round(sum(_stats["trace"]) + sum(_stats["lower"]), 2))
        report[model] = entry
        samples[model] = {t: sorted(out["samples"][t], key=lambda s: s["doc_id"]) for t in a.tasks}
        print(json.dumps({model: entry}, indent=1), flush=True)
    if "hf" in report:
        ours, hf = report["loraprune-jax"], report["hf"]
        same = ours["results"] == hf["results"]
        diff = max(abs(float(x[0][0]) - float(y[0][0]))
                   for t in a.tasks for s, r in zip(samples["hf"][t], samples["loraprune-jax"][t])
                   for x, y in zip(s["resps"], r["resps"]))
        report["comparison"] = {"identical_accuracies": same, "max_abs_ll_diff": diff,
                                "time_ratio_ours_over_hf": round(ours["wall_s"] / hf["wall_s"], 3)}
        print(json.dumps(report["comparison"], indent=1))
    report["meta"] = {"tasks": a.tasks, "limit": a.limit, "jax": jax.__version__,
                      "device": str(jax.devices()[0]), "cpus": os.cpu_count()}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
