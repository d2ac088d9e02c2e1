"""The training loop of a pruning run: compiled steps, the masks rewritten between them on the
schedule, and orbax checkpoints of everything a resumed run needs.

Compiled phases run :func:`~loraprune_jax.train.step.make_train_step`; mask rewrites happen
between steps on small vectors (never recompiling). With ``prune.granularity`` ``unstructured``
or ``nm`` the masks are weight-shaped and follow the same schedule. Each checkpoint holds the
LoRA, optimizer state, masks, scores, step, data position and history, so a killed run resumed
from it ends exactly where the uninterrupted run would. Loading, evaluation and export around
the loop are the pipeline's (:mod:`loraprune_jax.run.prune`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
from tqdm.auto import tqdm

from ..config import PROJECTIONS, RunConfig
from ..core.criteria import ranking_scores
from ..core.elements import update_element_masks, update_nm_masks
from ..core.masks import mask_stats, update_masks
from ..core.schedule import OneShotSchedule, PruneSchedule
from ..models.llama_pruning import init_element_masks, init_masks, llama_sparsity_stats
from .checkpoint import RunCheckpointer


def make_schedule(cfg: RunConfig) -> PruneSchedule | OneShotSchedule:
    """The mask schedule of a run (cubic by default, one-shot on request)."""
    p, steps = cfg.prune, cfg.train.steps
    if p.one_shot:
        return PruneSchedule.one_shot(p.ratio, p.calibration_steps, steps)
    return PruneSchedule(steps, p.ratio, p.init_ratio, p.warmup, p.cooldown, p.prune_every)


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
        return update_element_masks(masks, scores, ratio, excluded=excluded, order=PROJECTIONS,
                                    allocation=p.allocation)
    if p.granularity == "nm":
        n, m = p.nm_pattern
        fraction = min(max(ratio / p.ratio, 0.0), 1.0)
        return update_nm_masks(masks, scores, fraction, n, m, excluded=excluded,
                               order=PROJECTIONS)
    return update_masks(masks, ranking_scores(p.criterion, scores), ratio, excluded=excluded,
                        allocation=p.allocation)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train_loop` ends with: the final state and masks, one history record per
    step, the masks' kept counts (or sparsity), and the seconds spent."""

    state: dict[str, Any]
    masks: Any
    history: list[dict[str, Any]]
    stats: dict[str, Any]
    seconds: float


def train_loop(
    step_fn: Callable[..., tuple[dict[str, Any], dict[str, Any]]],
    state: dict[str, Any],
    masks: Any,
    base: Any,
    batches: Iterator[tuple[int, jax.Array]],
    key: jax.Array,
    *,
    cfg: RunConfig,
    schedule: PruneSchedule | OneShotSchedule,
    excluded: tuple[int, ...],
    ckpt: RunCheckpointer,
    start: int = 0,
    history: list[dict[str, Any]] | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Run the steps ``start + 1 .. cfg.train.steps`` on ``batches`` (``(step, tokens)`` from
    ``start`` on), updating the masks on the schedule and saving a checkpoint every
    ``cfg.checkpoint_every`` steps and at the end (``meta`` is stored with each, beside the
    history, the data position and the config). Waits for the last checkpoint to be written.
    A non-finite loss (its update skipped by the step) and non-finite importance scores (left out
    of their moving average) are logged with their step."""
    t = cfg.train
    history = list(history or [])
    bar = tqdm(total=t.steps, initial=start, desc=f"prune {cfg.prune.criterion}",
               unit="step", disable=not progress)
    train_start = time.perf_counter()
    element = cfg.prune.element_wise
    # host copy of the kept counts (or sparsity); refreshed only when masks change
    stats = llama_sparsity_stats(masks, excluded) if element else mask_stats(masks)
    for step_idx, tokens in batches:
        if step_idx >= t.steps:
            break
        state, metrics = step_fn(state, base, masks, {"tokens": tokens}, key)
        step = step_idx + 1
        if schedule.is_update_step(step):
            masks = update_run_masks(masks, state["scores"], cfg, schedule.ratio_at(step), excluded)
            stats = llama_sparsity_stats(masks, excluded) if element else mask_stats(masks)
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            log(f"step {step}: non-finite loss {loss}; adapters and optimizer not updated")
        if bool(metrics["score_skipped"]):
            log(f"step {step}: non-finite importance scores; moving average not updated")
        if element:  # kept fractions of the attention and MLP weights
            kept = {"attn_kept": stats["attn_kept"], "mlp_kept": stats["mlp_kept"]}
        else:
            kept = {"attn_kept": stats["attn_kept_fraction"], "mlp_kept": stats["mlp_kept_fraction"]}
        record = {"step": step, "loss": loss, "grad_norm": float(metrics["grad_norm"]), **kept,
                  "target_ratio": schedule.ratio_at(step)}
        history.append(record)
        bar.set_postfix(loss=f"{loss:.3f}", ratio=f"{record['target_ratio']:.2f}")
        bar.update(1)
        if step % cfg.log_every == 0 and not progress:
            log(f"step {step}/{t.steps} loss {loss:.4f} ratio {record['target_ratio']:.3f}")
        if step % cfg.checkpoint_every == 0 or step == t.steps:
            ckpt.save(step, {"state": state, "masks": masks},
                      {"history": history, **(meta or {}), "data_position": step,
                       "run_config": cfg.to_dict()})
    bar.close()
    ckpt.wait()
    return TrainResult(state, masks, history, stats, time.perf_counter() - train_start)


__all__ = ["TrainResult", "init_run_masks", "make_schedule", "train_loop", "update_run_masks"]
