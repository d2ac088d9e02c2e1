"""A whole LoRAPrune run: load, evaluate, train with progressive masks, slice, export, evaluate.

The pipeline around :func:`~loraprune_jax.train.loop.train_loop`: everything is loaded and
validated (model, data, evaluation texts, mesh, output directory) before anything is written;
the dense model is evaluated, trained with the masks shrinking on the schedule, sliced and
merged on the host (or, with ``prune.granularity`` ``unstructured`` / ``nm``, merged with the
masked weights zeroed, keeping its shape; ``model/masks.safetensors`` holds the masks),
exported, evaluated again, and ``metrics.json`` written last. Everything a run needs to
continue lives in its orbax checkpoints, so a killed run resumed with ``resume=True`` ends
exactly where the uninterrupted run would, whatever phase the kill came in: the run directory
appears whole with its ``run_config.json``, every output is renamed into place complete, and a
resume first removes what the killed process left half-written. A disk that fills up ends the
run with one :class:`~loraprune_jax.train.diskfull.DiskFullError` that says how to resume.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..config import PROJECTIONS, RunConfig, default_dtype
from ..data import load_texts
from ..data.packing import spread_windows, tokenize_join
from ..data.sharded import ShardedData
from ..eval.perplexity import perplexity
from ..io import export_hf, load_model, save_adapters
from ..io.lazy import materialize
from ..io.jsonfile import write_json
from ..models.llama_params import unstack_layers
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
)
from ..models.llama_params import shard_base
from ..models.quant import dequantize_base_host, quantize_base
from ..core.elements import apply_element_masks, nm_fraction
from ..core.masks import num_to_prune
from ..core.trees import count_params, excluded_layers
from ..models.llama_pruning import check_nm_widths, llama_sparsity_stats, masked_widths, slice_and_merge
from ..train.checkpoint import RunCheckpointer
from ..train.loop import init_run_masks, make_schedule, train_loop
from ..train.plot import plot_history
from ..train.step import init_state, make_train_step
from . import METRICS_FILE
from .rundir import PLOT_FILE, create_run_dir, disk_full_hint, read_run_config, remove_leftovers


class PreparedRun:
    """Everything loaded, validated and placed on the mesh before the output directory is
    created: the checks, the data and the texts first, the weights last (the costly part)."""

    def __init__(self, cfg: RunConfig, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        t = cfg.train
        spec = auto_mesh_spec(t.micro_batch_size) if cfg.mesh == "auto" else cfg.mesh
        self.mesh = make_mesh(spec)
        check_batch(t.micro_batch_size, self.mesh)
        t0 = time.perf_counter()
        # lazy: the config, the tokenizer and handles on the tensors; weights are read when placed
        self.config, host, self.tokenizer = load_model(
            cfg.model, dtype=cfg.dtype or default_dtype(), lazy=True
        )
        if self.tokenizer is None:
            raise ValueError(f"model={cfg.model}: has no tokenizer files; cannot tokenize the data")
        self.excluded = excluded_layers(
            self.config.num_layers, cfg.prune.exclude_first, cfg.prune.exclude_last
        )
        self.masked = tuple(p for p in PROJECTIONS if p in cfg.lora.targets)  # element masks
        if cfg.prune.granularity == "nm":
            check_nm_widths(self.config, self.masked, *cfg.prune.nm_pattern, excluded=self.excluded)
        self._check_final_widths()
        self.schedule = make_schedule(cfg)  # validates steps/calibration before anything runs
        self.batch_sharding = batch_sharding(self.mesh)
        self.data = ShardedData(cfg, self.tokenizer, self.config.eos_token_id, self.batch_sharding)
        self.eval_windows = {}
        for spec in cfg.eval_texts:
            ids = tokenize_join(list(load_texts(spec, split="heldout")), self.tokenizer)
            if len(ids) < cfg.eval_seq_len:
                raise ValueError(
                    f"eval_texts: {spec!r} has {len(ids)} tokens, fewer than one window of "
                    f"eval_seq_len={cfg.eval_seq_len}"
                )
            self.eval_windows[spec] = spread_windows(ids, cfg.eval_seq_len, cfg.eval_max_windows)
        # all checked: now the weights
        if cfg.mesh == "auto" and self.mesh.size < jax.device_count():
            log(f"mesh auto: {describe(self.mesh)}, {self.mesh.size} of {jax.device_count()} "
                f"devices (train.micro_batch_size={t.micro_batch_size} splits over no more)")
        if jax.process_count() > 1:  # every process says which shards it reads
            print(f"process {jax.process_index()}: data shards {self.data.local_shards} of "
                  f"{self.data.num_shards}", file=sys.stderr, flush=True)
        self.params = count_params(host)  # before quantizing: parameters, not scales
        if cfg.base_dtype == "int8":  # scales now; each device's int8 slice as it is placed
            host = quantize_base(host, lazy=True)
        # list layout, lazy leaves: each process reads its devices' shards from the files now,
        # and whole tensors only at the end, to slice and merge on the host
        self.host_base = host
        self.base = shard_base(host, self.config, self.mesh)  # stacked when widths are uniform
        stored = "" if cfg.base_dtype is None else f", projections {cfg.base_dtype}"
        log(f"loaded {cfg.model}: {self.config.num_params() / 1e6:.1f}M parameters "
            f"({self.config.dtype}{stored}) in {time.perf_counter() - t0:.1f}s on mesh "
            f"{describe(self.mesh)} ({jax.process_count()} process(es))")

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
        cfg = read_run_config(out)
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
    step_fn = make_train_step(config, cfg.lora, t, cfg.prune, mesh=mesh, stacked=stacked,
                              base_dtype=cfg.base_dtype)
    key = global_array(np.asarray(jax.random.PRNGKey(t.seed + 1)), rep)

    distributed.barrier("loraprune-checked")  # every process has seen `out` absent
    if primary:
        if not resume:
            create_run_dir(out, cfg.to_dict())
        elif removed := remove_leftovers(out):
            log(f"removed what the interrupted run left half-written: {', '.join(removed)}")
    distributed.barrier("loraprune-out-created")
    then = f"free some space, then continue with: loraprune-jax prune --resume {out}"
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

    with disk_full_hint(out / "checkpoints", "saving a checkpoint", then):
        trained = train_loop(step_fn, state, masks, base, run.data.iterate(start), key, cfg=cfg,
                             schedule=run.schedule, excluded=run.excluded, ckpt=ckpt, start=start,
                             history=history, meta={"before": before},
                             progress=progress and primary, log=log)
    ckpt.close()
    state, masks, history, stats = trained.state, trained.masks, trained.history, trained.stats
    train_seconds = trained.seconds
    element = cfg.prune.element_wise

    # Slice and merge on the host (numpy), then place the smaller model on the mesh to evaluate.
    # Weight masks: merge LoRA and zero the masked weights instead; the model keeps its shape.
    # An int8 base is dequantized first: the export holds the weights the adapters trained on.
    t0 = time.perf_counter()
    lora, host_masks = host_tree(state["lora"]), host_tree(masks)
    # read from the checkpoint one tensor at a time (an int8 base: its dequantized values)
    host_base = materialize(dequantize_base_host(run.host_base, config.jnp_dtype))
    if element:
        small_cfg = config
        merged = merge_lora(host_base, unstack_layers(lora), cfg.lora)
        small = apply_element_masks(merged, unstack_layers(host_masks))
        del merged
        log(f"merged and zeroed the masked weights on the host in {time.perf_counter() - t0:.1f}s")
    else:
        small, small_cfg = slice_and_merge(host_base, lora, host_masks, config, cfg.lora)
        log(f"sliced and merged on the host in {time.perf_counter() - t0:.1f}s")
    del host_base  # what the smaller model shares with it stays
    after = run.evaluate(shard_base(small, small_cfg, mesh, stacked=False), small_cfg,
                         progress and primary, "after")
    for spec, r in after.items():
        log(f"after: {spec} ppl {r['ppl']:.3f} (before {before[spec]['ppl']:.3f})")
    if primary:
        t0 = time.perf_counter()
        with disk_full_hint(out / "model", "exporting the pruned model", then):
            export_hf(out / "model", small_cfg, small, run.tokenizer, overwrite=resume,
                      masks=host_masks if element else None)
        # weight masks live beside the exported model (model/masks.safetensors), not here twice
        with disk_full_hint(out / "adapters", "saving the adapters", then):
            save_adapters(out / "adapters", lora, None if element else host_masks, cfg.lora,
                          config, overwrite=resume)
        log(f"exported the pruned model and the adapters in {time.perf_counter() - t0:.1f}s")
    params_before = run.params
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
        "base_dtype": cfg.base_dtype,
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
        with disk_full_hint(out / PLOT_FILE, "drawing the training plot", then):
            plot_history(history, out / PLOT_FILE,
                         f"{cfg.model} {cfg.prune.criterion}{kind} {what}", element=element)
        with disk_full_hint(out / METRICS_FILE, "writing the metrics", then):
            write_json(out / METRICS_FILE, metrics_out)  # last: its presence marks a complete run
    distributed.barrier("loraprune-done")
    return metrics_out


def element_sparsity_report(masks: Any, cfg: RunConfig, excluded: tuple[int, ...],
                            params: int) -> dict[str, Any]:
    """The metrics' ``sparsity`` entry of a weight-mask run: achieved sparsity per projection and
    overall (over all masked matrices, over the pruned layers, and of the whole model), per layer,
    and for N:M the share of blocks that follow the pattern."""
    stats = llama_sparsity_stats(masks, excluded)
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


__all__ = ["PreparedRun", "element_sparsity_report", "run_prune"]
