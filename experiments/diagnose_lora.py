"""Why the LoRA-guided criterion trails the full gradient on the bundled model, measured.

    python experiments/diagnose_lora.py --out experiments/runs/diagnosis --steps 400 \
        --checkpoints 0 20 40 100 200 400 --seeds 0 1 2 --probes 16

LoRA is trained dense (no pruning; masks all ones) for ``--steps`` steps with the settings of
the paper's table on SmolLM2 (r=8, alpha 16, dropout 0.05, AdamW 1e-4 with linear decay over the
run, batch 1 x 128 of the bundled Wikipedia training articles; ``--model``, ``--data``,
``--probe-text`` and ``--seq-len`` change them). Every ``--seeds`` value draws a
different ``A`` (LoRA init key); the data order and the dropout keys are the same for all seeds,
so the seeds differ only in ``A``. At each checkpoint step the same ``--probes`` fixed held-out
windows (no dropout) give, from one backward pass each, the LoRA gradients, the true gradients of
the frozen projections and the gradients of per-example group gates, and so on the same batches:

* per projection, channel scores under ``lora`` (``|G_hat * W'|`` reduced over the other axis,
  ``W' = W + s A B``), ``vanilla`` (``|dL/dW * W'|``) and ``magnitude`` (``|W'|``), summed over
  the probes (what the moving average sees);
* their Spearman correlation per pruned layer (mean over layers), lora against vanilla and
  against magnitude;
* the block group scores (module vectors L2-normalised and summed, method.md section 2) of lora,
  vanilla and the gate Fisher, and the overlap of the groups each would prune at 20% and 50%
  (|pruned by both| / |pruned|, mean over layers; attention units at 50% only, since 20% of 3 KV
  groups is none);
* ``||s B B^T||_F / ||s A^T A||_F`` per projection (mean over layers): the weight of the term
  ``s G B^T B`` that carries each row's own gradient against the rank-r projection ``s A A^T G``.

Writes ``diagnosis.json`` and ``diagnosis.png`` under ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from loraprune_jax.config import PROJECTIONS, LoraConfig, PruneConfig, TrainConfig
from loraprune_jax.data import load_texts
from loraprune_jax.data.packing import PackedDataset, spread_windows, tokenize_join
from loraprune_jax.io import load_model
from loraprune_jax.models.llama import loss
from loraprune_jax.models.llama_params import stack_layers
from loraprune_jax.models.lora import init_lora
from loraprune_jax.core.gates import init_gates
from loraprune_jax.core.groups import normalize
from loraprune_jax.core.importance import lora_guided_importance
from loraprune_jax.core.masks import num_to_prune
from loraprune_jax.core.trees import excluded_layers
from loraprune_jax.models.llama_pruning import init_masks
from loraprune_jax.train.step import init_state, make_train_step

ATTN, MLP = ("q", "k", "v", "o"), ("gate", "up", "down")


def channel_scores(config, lora_cfg):
    """A jitted ``(base, lora, masks, tokens) -> {criterion: {module: (L, channels)}}`` from one
    backward pass (LoRA, frozen projection weights and group gates differentiated together)."""
    scale = lora_cfg.scale
    quiet = LoraConfig(rank=lora_cfg.rank, alpha=lora_cfg.alpha, dropout=0.0, targets=lora_cfg.targets)

    def fn(base, lora, masks, tokens):
        weights = {n: base["layers"][n] for n in PROJECTIONS}

        def f(lora, weights, gates):
            b = {**base, "layers": {**base["layers"], **weights}}
            return loss(b, lora, masks, {"tokens": tokens}, config, quiet, gates=gates)

        gates = init_gates(masks, tokens.shape[0])
        lg, wg, gg = jax.grad(f, argnums=(0, 1, 2))(lora, weights, gates)

        def per_layer(xs):
            layer, pairs, grads, wgrads = xs
            out = {"lora": {}, "vanilla": {}, "magnitude": {}, "bbt_over_ata": {}}
            for n in PROJECTIONS:
                a, b = pairs[n]["a"], pairs[n]["b"]
                merged = layer[n] + scale * a @ b
                other = 1 if n in ("o", "down") else 0  # reduce over inputs (q..up) or outputs (o, down)
                el = lora_guided_importance(layer[n], a, b, grads[n]["a"], grads[n]["b"], scale)
                out["lora"][n] = el.sum(axis=other)
                out["vanilla"][n] = jnp.abs(wgrads[n] * merged).sum(axis=other)
                out["magnitude"][n] = jnp.abs(merged).sum(axis=other)
                out["bbt_over_ata"][n] = jnp.linalg.norm(b @ b.T) / jnp.linalg.norm(a.T @ a)
            return out

        out = jax.lax.map(per_layer, (base["layers"], lora["layers"], lg["layers"], wg))
        out["fisher"] = {k: jnp.sum(v**2, axis=-2) for k, v in gg["layers"].items()}
        return out

    return jax.jit(fn)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / den) if den else float("nan")


def group_scores(ch: dict, layer: int, units: int, skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Block scores (method.md section 2) of one layer from channel scores, leaving out the
    modules in ``skip``."""
    def unit(v: np.ndarray) -> np.ndarray:
        return v.reshape(units, -1).sum(axis=1)

    attn = sum(np.asarray(normalize(jnp.asarray(unit(ch[n][layer])))) for n in ATTN if n not in skip)
    mlp = sum(np.asarray(normalize(jnp.asarray(ch[n][layer]))) for n in MLP if n not in skip)
    return {"attn": attn, "mlp": mlp}


def overlap(a: np.ndarray, b: np.ndarray, ratio: float) -> float | None:
    k = num_to_prune(a.shape[0], ratio)
    if k == 0:
        return None
    pa, pb = set(np.argsort(a, kind="stable")[:k]), set(np.argsort(b, kind="stable")[:k])
    return len(pa & pb) / k


def analyse(scores: dict, layers: list[int], units: int) -> dict:
    """Correlations, overlaps and the B/A ratio at one checkpoint (scores summed over probes)."""
    np_scores = {c: {n: np.asarray(v) for n, v in d.items()} for c, d in scores.items()}
    res: dict = {"spearman_vs_vanilla": {}, "spearman_vs_magnitude": {}, "bbt_over_ata": {}}
    for n in PROJECTIONS:
        res["spearman_vs_vanilla"][n] = float(np.mean(
            [spearman(np_scores["lora"][n][i], np_scores["vanilla"][n][i]) for i in layers]))
        res["spearman_vs_magnitude"][n] = float(np.mean(
            [spearman(np_scores["lora"][n][i], np_scores["magnitude"][n][i]) for i in layers]))
        res["bbt_over_ata"][n] = float(np.mean(np_scores["bbt_over_ata"][n][layers]))
    groups = {c: [group_scores(np_scores[c], i, units) for i in layers] for c in ("lora", "vanilla", "magnitude")}
    groups["fisher"] = [{k: np_scores["fisher"][k][i] for k in ("attn", "mlp")} for i in layers]
    # lora without its input-row modules (o, down): what their noise costs the block score
    groups["lora w/o o,down"] = [group_scores(np_scores["lora"], i, units, skip=("o", "down"))
                                 for i in layers]
    res["overlap_with_vanilla"] = {}
    for c in ("lora", "lora w/o o,down", "fisher", "magnitude"):
        for kind, ratios in (("mlp", (0.2, 0.5)), ("attn", (0.5,))):
            for r in ratios:
                vals = [overlap(g[kind], v[kind], r) for g, v in zip(groups[c], groups["vanilla"])]
                vals = [x for x in vals if x is not None]
                res["overlap_with_vanilla"][f"{c} {kind} {r:g}"] = float(np.mean(vals)) if vals else None
    res["mlp_group_spearman_vs_vanilla"] = {
        c: float(np.mean([spearman(g["mlp"], v["mlp"]) for g, v in zip(groups[c], groups["vanilla"])]))
        for c in ("lora", "lora w/o o,down", "fisher", "magnitude")}
    res["pruned_sets"] = {  # per layer, for seed-against-seed comparisons
        f"{c} {kind} {r:g}": [sorted(np.argsort(g[kind], kind="stable")[:num_to_prune(g[kind].shape[0], r)].tolist())
                              for g in groups[c]]
        for c in ("lora", "vanilla", "fisher") for kind, r in (("mlp", 0.2), ("mlp", 0.5), ("attn", 0.5))}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/runs/diagnosis")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[0, 20, 40, 100, 200, 400])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--probes", type=int, default=16, help="held-out 128-token windows per checkpoint")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="wiki:train", help="training texts (a data spec)")
    ap.add_argument("--probe-text", default="wiki:heldout", help="the probe windows' text")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--replot", action="store_true",
                    help="only print the tables and redraw the figure of --out/diagnosis.json")
    args = ap.parse_args(argv)
    if args.replot:
        return show(Path(args.out))
    if max(args.checkpoints) > args.steps:
        ap.error("every checkpoint must be <= --steps")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config, base, tokenizer = load_model(args.model, dtype="float32")
    base = stack_layers(base)
    lora_cfg = LoraConfig()
    train_cfg = TrainConfig(steps=max(args.steps, 1), seq_len=args.seq_len, micro_batch_size=1, lr=args.lr)
    masks = init_masks(config, stacked=True)
    data = PackedDataset.from_texts(load_texts(args.data), tokenizer, args.seq_len,
                                    eos_id=config.eos_token_id)
    probe_ids = tokenize_join(list(load_texts(args.probe_text, split="heldout")), tokenizer)
    probes = spread_windows(probe_ids, args.seq_len, args.probes)
    layers = [i for i in range(config.num_layers) if i not in excluded_layers(config.num_layers)]
    score_fn = channel_scores(config, lora_cfg)
    step_fn = make_train_step(config, lora_cfg, train_cfg, PruneConfig(criterion="lora"))
    results: dict = {"args": vars(args), "layers": layers, "seeds": {}}
    for seed in args.seeds:
        lora = init_lora(jax.random.PRNGKey(seed), base, lora_cfg)
        state = init_state(lora, masks, train_cfg)
        batches = data.iterate(1, 0, process_index=0, process_count=1)
        key = jax.random.PRNGKey(1)
        per_seed = {}
        t0 = time.perf_counter()
        for step in range(args.steps + 1):
            if step in args.checkpoints:
                total = None
                for w in probes:
                    s = score_fn(base, state["lora"], masks, jnp.asarray(w[None]))
                    total = s if total is None else jax.tree.map(jnp.add, total, s)
                total["bbt_over_ata"] = jax.tree.map(lambda x: x / len(probes), total["bbt_over_ata"])
                per_seed[step] = analyse(total, layers, config.num_kv_heads)
                r = per_seed[step]
                print(f"seed {seed} step {step} ({time.perf_counter() - t0:.0f}s): spearman vs vanilla "
                      + " ".join(f"{n} {v:.2f}" for n, v in r["spearman_vs_vanilla"].items())
                      + " | overlap " + " ".join(f"{k} {v:.2f}" for k, v in r["overlap_with_vanilla"].items()
                                                 if v is not None), file=sys.stderr, flush=True)
            if step == args.steps:
                break
            _, batch = next(batches)
            state, _ = step_fn(state, base, masks, {"tokens": jnp.asarray(batch["tokens"][None])}, key)
        results["seeds"][str(seed)] = per_seed
    results["seed_agreement"] = seed_agreement(results, args.checkpoints)
    (out / "diagnosis.json").write_text(json.dumps(results, indent=1))
    return show(out)


def show(out: Path) -> int:
    """Print the tables and draw the figure of the ``diagnosis.json`` under ``out``."""
    results = json.loads((out / "diagnosis.json").read_text())
    checkpoints = results["args"]["checkpoints"]
    print(report(results, checkpoints))
    plot(results, checkpoints, out / "diagnosis.png")
    return 0


def seed_agreement(results: dict, checkpoints: list[int]) -> dict:
    """Per checkpoint and pruning set: mean overlap of the lora masks of every pair of seeds, and
    of each seed's with vanilla's (mean over layers)."""
    seeds = list(results["seeds"])
    out: dict = {}
    for step in checkpoints:
        row = {}
        for what in ("mlp 0.2", "mlp 0.5", "attn 0.5"):
            sets = [results["seeds"][s][step]["pruned_sets"][f"lora {what}"] for s in seeds]
            van = results["seeds"][seeds[0]][step]["pruned_sets"][f"vanilla {what}"]

            def ov(x, y):
                return float(np.mean([len(set(a) & set(b)) / max(len(a), 1) for a, b in zip(x, y)]))

            pairs = [ov(sets[i], sets[j]) for i in range(len(sets)) for j in range(i + 1, len(sets))]
            row[what] = {"seed_vs_seed": float(np.mean(pairs)) if pairs else None,
                         "seed_vs_vanilla": [ov(s, van) for s in sets]}
        out[step] = row
    return out


def report(results: dict, checkpoints: list[int]) -> str:
    """Markdown tables: seed 0's correlations and overlaps, the B/A ratio, and seed agreement."""
    r0 = results["seeds"][next(iter(results["seeds"]))]  # keys are strings (JSON)
    lines = ["| step | " + " | ".join(f"{n} vs vanilla" for n in PROJECTIONS) + " | o vs magnitude | down vs magnitude |",
             "| ---: |" + " ---: |" * (len(PROJECTIONS) + 2)]
    for s in checkpoints:
        r = r0[str(s)]
        lines.append(f"| {s} | " + " | ".join(f"{r['spearman_vs_vanilla'][n]:.2f}" for n in PROJECTIONS)
                     + f" | {r['spearman_vs_magnitude']['o']:.2f} | {r['spearman_vs_magnitude']['down']:.2f} |")
    lines += ["", "| step | " + " | ".join(f"{n} BB^T/A^TA" for n in PROJECTIONS) + " |",
              "| ---: |" + " ---: |" * len(PROJECTIONS)]
    for s in checkpoints:
        lines.append(f"| {s} | " + " | ".join(f"{r0[str(s)]['bbt_over_ata'][n]:.3f}" for n in PROJECTIONS) + " |")
    keys = list(r0[str(checkpoints[0])]["overlap_with_vanilla"])
    names = " / ".join(r0[str(checkpoints[0])]["mlp_group_spearman_vs_vanilla"])
    lines += ["", "| step | " + " | ".join(keys) + f" | MLP group spearman vs vanilla: {names} |",
              "| ---: |" + " ---: |" * (len(keys) + 1)]
    for s in checkpoints:
        ov, sp = r0[str(s)]["overlap_with_vanilla"], r0[str(s)]["mlp_group_spearman_vs_vanilla"]
        lines.append(f"| {s} | " + " | ".join("–" if ov[k] is None else f"{ov[k]:.2f}" for k in keys)
                     + " | " + " / ".join(f"{v:.2f}" for v in sp.values()) + " |")
    lines += ["", "| step | pruned set | lora seed vs seed | each lora seed vs vanilla |", "| ---: | --- | ---: | --- |"]
    for s in checkpoints:
        for what, v in results["seed_agreement"][str(s)].items():
            vs = " / ".join(f"{x:.2f}" for x in v["seed_vs_vanilla"])
            sv = "–" if v["seed_vs_seed"] is None else f"{v['seed_vs_seed']:.2f}"
            lines.append(f"| {s} | {what} | {sv} | {vs} |")
    return "\n".join(lines)


def plot(results: dict, checkpoints: list[int], path: Path) -> None:
    from matplotlib.figure import Figure

    r0 = results["seeds"][next(iter(results["seeds"]))]  # keys are strings (JSON)
    fig = Figure(figsize=(20, 4.2))
    ax1, ax2, ax3, ax4 = fig.subplots(1, 4)
    for n in PROJECTIONS:
        style = "--" if n in ("o", "down") else "-"
        ax1.plot(checkpoints, [r0[str(s)]["spearman_vs_vanilla"][n] for s in checkpoints], marker="o",
                 ls=style, label=n)
        ax2.plot(checkpoints, [r0[str(s)]["bbt_over_ata"][n] for s in checkpoints], marker="o",
                 ls=style, label=n)
    ax1.set(xlabel="LoRA step", ylabel="Spearman, lora vs vanilla channel scores", ylim=(-0.1, 1),
            title="per projection (mean over pruned layers)")
    ax2.set(xlabel="LoRA step", ylabel="||s B B^T|| / ||s A^T A||",
            title=f"weight of the term that knows each row (lr {results['args']['lr']:g})")
    for key, style in (("lora mlp 0.5", "-"), ("lora mlp 0.2", ":"), ("lora attn 0.5", "--"),
                       ("fisher mlp 0.5", "-"), ("fisher mlp 0.2", ":"), ("fisher attn 0.5", "--")):
        ax3.plot(checkpoints, [r0[str(s)]["overlap_with_vanilla"][key] for s in checkpoints], ls=style,
                 marker="o", color="tab:red" if key.startswith("fisher") else "tab:blue", label=key)
    ax3.set(xlabel="LoRA step", ylabel="overlap with vanilla's pruned set", ylim=(0, 1),
            title="groups pruned at 20% / 50% (seed 0)")
    agree = results["seed_agreement"]
    for what, style in (("mlp 0.2", ":"), ("mlp 0.5", "-"), ("attn 0.5", "--")):
        if agree[str(checkpoints[0])][what]["seed_vs_seed"] is not None:
            ax4.plot(checkpoints, [agree[str(s)][what]["seed_vs_seed"] for s in checkpoints], ls=style,
                     marker="o", color="tab:green", label=f"{what}: lora seed vs seed")
        ax4.plot(checkpoints, [np.mean(agree[str(s)][what]["seed_vs_vanilla"]) for s in checkpoints],
                 ls=style, marker="s", color="tab:blue", label=f"{what}: lora seed vs vanilla")
    ax4.set(xlabel="LoRA step", ylabel="pruned set overlap", ylim=(0, 1),
            title=f"lora masks of {len(results['seeds'])} seeds of A")
    for ax in (ax1, ax2, ax3, ax4):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
