"""A whole LoRAPrune run: load, evaluate, train with progressive masks, checkpoint, slice, export.

Compiled phases run :func:`make_train_step`; mask rewrites happen between steps on small
vectors (never recompiling). With ``prune.granularity`` ``unstructured`` or ``nm`` the masks are
weight-shaped, follow the same schedule, and the end merges LoRA and zeroes the masked weights
instead of slicing (the model keeps its shape; ``model/masks.safetensors`` holds the masks).
Everything a run needs to continue lives in its orbax checkpoints (LoRA, optimizer state, masks,
scores, step, data position, history, config), so a killed run resumed with ``resume=True`` ends
exactly where the uninterrupted run would.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..config import PROJECTIONS, RunConfig, default_dtype
from ..data import load_texts
from ..data.packing import PackedDataset, tokenize_join, windows
from ..eval.perplexity import perplexity
from ..io import export_hf, load_model, save_adapters
from ..io.jsonfile import write_json
from ..models.llama import unstack_layers
from ..models.lora import init_lora, merge_lora
from ..parallel import distributed
from ..parallel.mesh import (
    ShardingError,
    auto_mesh_spec,
    batch_sharding,
    check_batch,
    describe,
    global_array,
    host_tree,
    make_mesh,
    mesh_sizes,
    replicated,
    shard_base,
)
from ..pruning.gates import ranking_scores
from ..pruning.groups import init_masks
from ..pruning.masks import (
    excluded_layers,
    mask_stats,
    masked_widths,
    num_to_prune,
    update_masks,
)
from ..pruning.schedule import OneShotSchedule, PruneSchedule
from ..pruning.slicing import count_params, slice_and_merge
from ..pruning.sparsity import (
    apply_element_masks,
    check_nm,
    init_element_masks,
    nm_fraction,
    sparsity_stats,
    update_element_masks,
    update_nm_masks,
)
from .checkpoint import RunCheckpointer
from .step import init_state, make_train_step

RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.json"


def make_schedule(cfg: RunConfig) -> PruneSchedule | OneShotSchedule:
    """The mask schedule of a run (cubic by default, one-shot on request)."""
    p, steps = cfg.prune, cfg.train.steps
    if p.one_shot:
        return PruneSchedule.one_shot(p.ratio, p.calibration_steps, steps)
    return PruneSchedule(steps, p.ratio, p.init_ratio, p.warmup, p.cooldown, p.prune_every)


def spread_windows(ids: np.ndarray, seq_len: int, max_windows: int | None) -> np.ndarray:
    """Non-overlapping windows; when capped, ``max_windows`` of them evenly spaced over the text
    (the first ones alone can all fall in one untypical document, such as a list article)."""
    all_windows = windows(ids, seq_len)
    n = all_windows.shape[0]
    if max_windows is None or max_windows >= n:
        return all_windows
    return all_windows[np.linspace(0, n - 1, max_windows).round().astype(int)]


class PreparedRun:
    """Everything loaded, validated and placed on the mesh before the output directory is
    created."""

    def __init__(self, cfg: RunConfig, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        t = cfg.train
        spec = auto_mesh_spec(t.micro_batch_size) if cfg.mesh == "auto" else cfg.mesh
        self.mesh = make_mesh(spec)
        check_batch(t.micro_batch_size, self.mesh)
        if cfg.mesh == "auto" and self.mesh.size < jax.device_count():
            log(f"mesh auto: {describe(self.mesh)}, {self.mesh.size} of {jax.device_count()} "
                f"devices (train.micro_batch_size={t.micro_batch_size} splits over no more)")
        t0 = time.perf_counter()
        self.config, host, self.tokenizer = load_model(
            cfg.model, dtype=cfg.dtype or default_dtype(), as_numpy=True
        )
        if self.tokenizer is None:
            raise ValueError(f"model {cfg.model} has no tokenizer files; cannot tokenize the data")
        self.excluded = excluded_layers(
            self.config.num_layers, cfg.prune.exclude_first, cfg.prune.exclude_last
        )
        self.masked = tuple(p for p in PROJECTIONS if p in cfg.lora.targets)  # element masks
        if cfg.prune.granularity == "nm":
            check_nm(self.config, self.masked, *cfg.prune.nm_pattern, excluded=self.excluded)
        self._check_final_widths()
        self.host_base = host  # list layout, numpy: sliced on the host at the end
        self.base = shard_base(host, self.config, self.mesh)  # stacked when widths are uniform
        log(f"loaded {cfg.model}: {self.config.num_params() / 1e6:.1f}M parameters "
            f"({self.config.dtype}) in {time.perf_counter() - t0:.1f}s on mesh "
            f"{describe(self.mesh)} ({jax.process_count()} process(es))")
        self.schedule = make_schedule(cfg)  # validates steps/calibration before anything runs
        self.batch_sharding = batch_sharding(self.mesh)
        self.data = ShardedData(cfg, self.tokenizer, self.config.eos_token_id, self.batch_sharding)
        if jax.process_count() > 1:  # every process says which shards it reads
            print(f"process {jax.process_index()}: data shards {self.data.local_shards} of "
                  f"{self.data.num_shards}", file=sys.stderr, flush=True)
        self.eval_windows = {}
        for spec in cfg.eval_texts:
            ids = tokenize_join(list(load_texts(spec, split="heldout")), self.tokenizer)
            if len(ids) < cfg.eval_seq_len:
                raise ValueError(
                    f"evaluation text {spec!r} has {len(ids)} tokens, fewer than one window of "
                    f"{cfg.eval_seq_len}"
                )
            self.eval_windows[spec] = spread_windows(ids, cfg.eval_seq_len, cfg.eval_max_windows)

    def _check_final_widths(self) -> None:
        """With a tensor axis, the sliced model must still split over it: check the widths the
        final ratio leaves now, not after training."""
        tensor = mesh_sizes(self.mesh)["tensor"]
        if tensor == 1 or self.cfg.prune.element_wise:  # weight masks never change widths
            return
        p = self.cfg.prune
        if p.allocation != "uniform":
            raise ShardingError(
                f"allocation={p.allocation} leaves per-layer widths that the tensor axis "
                f"({tensor}) may not divide after slicing; use prune.allocation=uniform or a mesh "
                "without a tensor axis (e.g. mesh=fsdp:-1)"
            )
        c = self.config
        for i in range(c.num_layers):
            if i in self.excluded:
                continue
            units = c.kv_heads(i) - num_to_prune(c.kv_heads(i), p.ratio)
            heads = units * (c.heads(i) // c.kv_heads(i))
            ffn = c.ffn(i) - num_to_prune(c.ffn(i), p.ratio)
            for what, n in (("KV heads", units), ("query heads", heads), ("MLP channels", ffn)):
                if n % tensor:
                    raise ShardingError(
                        f"at prune.ratio={p.ratio} layer {i} keeps {n} {what}, which the tensor "
                        f"axis ({tensor}) does not divide, so the pruned model could not be "
                        "evaluated on this mesh; choose a ratio whose kept counts it divides or "
                        "a mesh without a tensor axis (e.g. mesh=fsdp:-1)"
                    )

    def evaluate(self, base: Any, config: Any, progress: bool, tag: str) -> dict[str, Any]:
        out = {}
        for spec, win in self.eval_windows.items():
            res = perplexity(base, config, win.reshape(-1), self.cfg.eval_seq_len,
                             progress=progress, desc=f"ppl {tag} {spec}", mesh=self.mesh)
            out[spec] = {"ppl": res.ppl, "tokens": res.tokens,
                         "tokens_per_second": res.tokens_per_second}
        return out


def init_run_masks(cfg: RunConfig, config: Any, stacked: bool) -> dict[str, Any]:
    """All-ones masks of a run: group vectors, or weight-shaped for the LoRA-targeted projections
    when ``prune.granularity`` is ``unstructured`` or ``nm``."""
    if cfg.prune.element_wise:
        names = tuple(p for p in PROJECTIONS if p in cfg.lora.targets)
        return init_element_masks(config, names, stacked=stacked)
    return init_masks(config, stacked=stacked)


def update_run_masks(masks: Any, scores: Any, cfg: RunConfig, ratio: float,
                     excluded: tuple[int, ...]) -> Any:
    """The masks after one scheduled update to ``ratio`` under the run's granularity. N:M takes
    the schedule's progress ``ratio / prune.ratio`` as the share of blocks to give the pattern."""
    p = cfg.prune
    if p.granularity == "unstructured":
        return update_element_masks(masks, scores, ratio, excluded=excluded,
                                    allocation=p.allocation)
    if p.granularity == "nm":
        n, m = p.nm_pattern
        fraction = min(max(ratio / p.ratio, 0.0), 1.0)
        return update_nm_masks(masks, scores, fraction, n, m, excluded=excluded)
    return update_masks(masks, ranking_scores(p.criterion, scores), ratio, excluded=excluded,
                        allocation=p.allocation)


class ShardedData:
    """Training batches of a (multi-process) run, each process reading only its data shards.

    The texts are split into ``data_shards`` shards of documents (default: one per process).
    Rows ``[s*b, (s+1)*b)`` of every micro-batch (``b = micro_batch_size / data_shards``) come
    from shard ``s``'s own packed, shuffled dataset; a process loads the shards whose rows its
    devices hold. The global batch of a step is thus fixed by ``(data_shards, seed, step)`` and
    the same for any number of processes.
    """

    def __init__(self, cfg: RunConfig, tokenizer: Any, eos_id: int | None,
                 sharding: Any) -> None:
        t = cfg.train
        self.num_shards = cfg.data_shards or jax.process_count()
        if t.micro_batch_size % self.num_shards:
            raise ValueError(
                f"train.micro_batch_size={t.micro_batch_size} is not a multiple of the "
                f"{self.num_shards} data shards; raise it or set data_shards"
            )
        self.shape = (t.grad_accum, t.micro_batch_size, t.seq_len)
        self.block = t.micro_batch_size // self.num_shards
        self.sharding = sharding
        rows: set[int] = set()
        for idx in sharding.addressable_devices_indices_map(self.shape).values():
            rows.update(range(*idx[1].indices(t.micro_batch_size)))
        self.local_shards = sorted({r // self.block for r in rows})
        self.datasets = {}
        for s in self.local_shards:
            shard = None if self.num_shards == 1 else (s, self.num_shards)
            texts = load_texts(cfg.data, shard=shard)
            ds = PackedDataset.from_texts(texts, tokenizer, t.seq_len, eos_id=eos_id)
            need = t.grad_accum * self.block
            if len(ds) < need:
                which = "" if shard is None else f" (shard {s} of {self.num_shards})"
                raise ValueError(
                    f"training data {cfg.data!r}{which} gives {len(ds)} sequences of "
                    f"{t.seq_len} tokens, fewer than one batch of {need}"
                )
            self.datasets[s] = ds
        self.seed = t.seed

    def iterate(self, start_step: int) -> Iterator[tuple[int, jax.Array]]:
        """``(step, global token batch)`` from ``start_step`` on, endlessly."""
        accum, micro, seq = self.shape
        iters = {
            s: ds.iterate(accum * self.block, self.seed, start_step=start_step,
                          process_index=0, process_count=1)
            for s, ds in self.datasets.items()
        }
        while True:
            local = np.zeros(self.shape, np.int32)  # rows of shards read elsewhere stay unused
            step = None
            for s, it in iters.items():
                step, batch = next(it)
                local[:, s * self.block:(s + 1) * self.block] = batch["tokens"].reshape(
                    accum, self.block, seq)
            yield step, global_array(local, self.sharding)


def run_prune(
    cfg: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run LoRAPrune end to end and return the metrics written to ``out/metrics.json``.

    Everything is validated (model, data, config, output directory) before ``cfg.out`` is
    created, so bad input leaves nothing behind. ``resume`` continues a run directory from its
    latest checkpoint (``cfg`` is then read from the directory), including a run killed while
    exporting.
    """
    start_time = time.perf_counter()
    out = Path(cfg.out)
    primary = distributed.is_primary()
    if not primary:
        log = lambda message: None  # noqa: E731 - one process speaks for all
    if resume:
        saved = out / RUN_CONFIG_FILE
        if not saved.is_file():
            raise FileNotFoundError(f"{out} is not a run directory (no {RUN_CONFIG_FILE}) to resume")
        cfg = RunConfig.from_dict(json.loads(saved.read_text()))
        if (out / METRICS_FILE).exists():
            raise FileExistsError(f"run {out} is already complete ({METRICS_FILE} exists)")
    elif out.exists():
        raise FileExistsError(f"output directory {out} already exists; choose another out=")
    run = PreparedRun(cfg, log)
    config, base, t, mesh = run.config, run.base, cfg.train, run.mesh
    rep = replicated(mesh)
    stacked = isinstance(base["layers"], dict)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)

    @functools.partial(jax.jit, out_shardings=rep)
    def fresh_state() -> tuple[dict[str, Any], dict[str, Any]]:
        masks = init_run_masks(cfg, config, stacked)
        like = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)  # shapes only; no copy
        lora = init_lora(jax.random.PRNGKey(t.seed), like, cfg.lora)
        return init_state(lora, masks, t), masks

    state, masks = fresh_state()  # created on the mesh, replicated
    step_fn = make_train_step(config, cfg.lora, t, cfg.prune, mesh=mesh, stacked=stacked)
    key = global_array(np.asarray(jax.random.PRNGKey(t.seed + 1)), rep)

    distributed.barrier("loraprune-checked")  # every process has seen `out` absent
    if primary:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_json(out / RUN_CONFIG_FILE, cfg.to_dict())
    distributed.barrier("loraprune-out-created")
    ckpt = RunCheckpointer(out / "checkpoints", max_to_keep=2)
    history: list[dict[str, Any]] = []
    start = ckpt.latest_step() if resume else None
    if start is not None:
        # restored onto the mesh: the target's shardings place every array
        restored, meta = ckpt.restore(start, target={"state": state, "masks": masks})
        state, masks = restored["state"], restored["masks"]
        history, before = meta["history"], meta["before"]
        log(f"resumed {out} at step {start}")
    else:
        start = 0
        before = run.evaluate(base, config, progress and primary, "before")
        for spec, r in before.items():
            log(f"before: {spec} ppl {r['ppl']:.3f}")

    batches = run.data.iterate(start)
    bar = tqdm(total=t.steps, initial=start, desc=f"prune {cfg.prune.criterion}",
               unit="step", disable=not (progress and primary))
    train_start = time.perf_counter()
    step = start
    element = cfg.prune.element_wise
    # host copy of the kept counts (or sparsity); refreshed only when masks change
    stats = sparsity_stats(masks, run.excluded) if element else mask_stats(masks)
    for step_idx, tokens in batches:
        if step_idx >= t.steps:
            break
        state, metrics = step_fn(state, base, masks, {"tokens": tokens}, key)
        step = step_idx + 1
        if run.schedule.is_update_step(step):
            masks = update_run_masks(masks, state["scores"], cfg, run.schedule.ratio_at(step),
                                     run.excluded)
            stats = sparsity_stats(masks, run.excluded) if element else mask_stats(masks)
        loss = float(metrics["loss"])
        if bool(metrics["score_skipped"]):
            log(f"step {step}: non-finite importance scores; moving average not updated")
        if element:  # kept fractions of the attention and MLP weights
            kept = {"attn_kept": stats["attn_kept"], "mlp_kept": stats["mlp_kept"]}
        else:
            kept = {"attn_kept": stats["attn_kept_fraction"], "mlp_kept": stats["mlp_kept_fraction"]}
        record = {"step": step, "loss": loss, "grad_norm": float(metrics["grad_norm"]), **kept,
                  "target_ratio": run.schedule.ratio_at(step)}
        history.append(record)
        bar.set_postfix(loss=f"{loss:.3f}", ratio=f"{record['target_ratio']:.2f}")
        bar.update(1)
        if step % cfg.log_every == 0 and not progress:
            log(f"step {step}/{t.steps} loss {loss:.4f} ratio {record['target_ratio']:.3f}")
        if step % cfg.checkpoint_every == 0 or step == t.steps:
            ckpt.save(step, {"state": state, "masks": masks},
                      {"history": history, "before": before, "data_position": step,
                       "run_config": cfg.to_dict()})
    bar.close()
    ckpt.wait()
    ckpt.close()
    train_seconds = time.perf_counter() - train_start

    # Slice and merge on the host (numpy), then place the smaller model on the mesh to evaluate.
    # Weight masks: merge LoRA and zero the masked weights instead; the model keeps its shape.
    t0 = time.perf_counter()
    lora, host_masks = host_tree(state["lora"]), host_tree(masks)
    if element:
        small_cfg = config
        merged = merge_lora(run.host_base, unstack_layers(lora), cfg.lora)
        small = apply_element_masks(merged, unstack_layers(host_masks))
        del merged
        log(f"merged and zeroed the masked weights on the host in {time.perf_counter() - t0:.1f}s")
    else:
        small, small_cfg = slice_and_merge(run.host_base, lora, host_masks, config, cfg.lora)
        log(f"sliced and merged on the host in {time.perf_counter() - t0:.1f}s")
    after = run.evaluate(shard_base(small, small_cfg, mesh, stacked=False), small_cfg,
                         progress and primary, "after")
    for spec, r in after.items():
        log(f"after: {spec} ppl {r['ppl']:.3f} (before {before[spec]['ppl']:.3f})")
    if primary:
        t0 = time.perf_counter()
        export_hf(out / "model", small_cfg, small, run.tokenizer, overwrite=resume,
                  masks=host_masks if element else None)
        # weight masks live beside the exported model (model/masks.safetensors), not here twice
        save_adapters(out / "adapters", lora, None if element else host_masks, cfg.lora, config,
                      overwrite=resume)
        log(f"exported the pruned model and the adapters in {time.perf_counter() - t0:.1f}s")
    params_before = count_params(run.host_base)
    if element:
        sparsity = element_sparsity_report(host_masks, cfg, run.excluded, params_before)
        params_after = params_before - sparsity["zeros"]  # nonzero parameters; shapes unchanged
        layers_out: dict[str, Any] = {"excluded": list(run.excluded),
                                      "sparsity": sparsity.pop("layers")}
    else:
        heads, kv_heads, ffn = masked_widths(config, host_masks)
        params_after = count_params(small)
        layers_out = {
            "heads": list(heads), "kv_heads": list(kv_heads), "ffn": list(ffn),
            "excluded": list(run.excluded),
            "attn_units_kept": stats["attn_kept"], "mlp_channels_kept": stats["mlp_kept"],
        }
    metrics_out = {
        "model": cfg.model,
        "criterion": cfg.prune.criterion,
        "granularity": cfg.prune.granularity,
        "ratio": cfg.prune.ratio,
        "steps": t.steps,
        "mesh": describe(mesh),
        "processes": jax.process_count(),
        "ppl_before": {k: v["ppl"] for k, v in before.items()},
        "ppl_after": {k: v["ppl"] for k, v in after.items()},
        "eval": {"seq_len": cfg.eval_seq_len, "before": before, "after": after},
        "params_before": params_before,
        "params_after": params_after,
        "params_kept_fraction": params_after / params_before,
        "layers": layers_out,
        "final_loss": history[-1]["loss"] if history else math.nan,
        "train_seconds_this_session": train_seconds,
        "run_seconds_this_session": time.perf_counter() - start_time,
        "history": history,
    }
    if element:
        metrics_out["sparsity"] = sparsity
    if primary:
        what = cfg.prune.nm if cfg.prune.granularity == "nm" else cfg.prune.ratio
        kind = "" if not element else f" {cfg.prune.granularity}"
        plot_history(history, out / "training.png",
                     f"{cfg.model} {cfg.prune.criterion}{kind} {what}", element=element)
        write_json(out / METRICS_FILE, metrics_out)  # last: its presence marks a complete run
    distributed.barrier("loraprune-done")
    return metrics_out


def element_sparsity_report(masks: Any, cfg: RunConfig, excluded: tuple[int, ...],
                            params: int) -> dict[str, Any]:
    """The metrics' ``sparsity`` entry of a weight-mask run: achieved sparsity per projection and
    overall (over all masked matrices, over the pruned layers, and of the whole model), per layer,
    and for N:M the share of blocks that follow the pattern."""
    stats = sparsity_stats(masks, excluded)
    out = {
        "target": cfg.prune.ratio,
        "overall": stats["sparsity"],
        "projections": stats["projections"],
        "pruned_layers": stats["pruned_layers"],
        "model": stats["zeros"] / params,
        "zeros": stats["zeros"],
        "masked_weights": stats["total"],
        "layers": stats["layers"],
    }
    if cfg.prune.granularity == "nm":
        n, m = cfg.prune.nm_pattern
        layers = unstack_layers(dict(masks))["layers"]
        blocks = done = 0.0
        for i, layer in enumerate(layers):
            if i in excluded:
                continue
            for mask in layer.values():
                count = np.asarray(mask).size / m
                blocks, done = blocks + count, done + count * nm_fraction(mask, n, m)
        out["nm"] = cfg.prune.nm
        out["nm_blocks_fraction"] = done / blocks if blocks else 1.0
    return out


def plot_history(history: list[dict[str, Any]], path: Path, title: str,
                 element: bool = False) -> None:
    """Loss and pruned fraction against steps, as a PNG (``element``: of weights, not groups).

    Drawn on a bare ``Figure`` (no pyplot), so the caller's matplotlib backend, a notebook's
    inline one for instance, is left alone."""
    from matplotlib.figure import Figure

    steps = [h["step"] for h in history]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, [h["loss"] for h in history], color="tab:blue", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["target_ratio"] for h in history], color="tab:red", lw=1, label="target ratio")
    attn, mlp = ("attention weights", "MLP weights") if element else ("attention units",
                                                                       "MLP channels")
    ax2.plot(steps, [1 - h["attn_kept"] for h in history], color="tab:orange", lw=1, ls="--",
             label=f"{attn} pruned (all layers)")
    ax2.plot(steps, [1 - h["mlp_kept"] for h in history], color="tab:green", lw=1, ls=":",
             label=f"{mlp} pruned (all layers)")
    ax2.set_ylabel("pruned fraction")
    ax2.set_ylim(0, 1)
    ax2.legend(loc="center right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
