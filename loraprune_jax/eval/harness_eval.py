"""Zero-shot accuracy through lm-evaluation-harness: what ``loraprune-jax zeroshot`` runs.

:func:`harness_zeroshot` hands an already loaded (possibly sharded, int8, pruned) model to the
harness as :class:`~loraprune_jax.eval.harness.LoraPruneJaxLM`, the tasks as the harness's own
definitions on local files (:func:`~loraprune_jax.eval.harness_tasks.offline_tasks`), and returns
one :class:`~loraprune_jax.eval.zeroshot.TaskResult` per task, as the hand-written path did.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from ..config import LlamaConfig
from .harness import LoraPruneJaxLM
from .harness_tasks import offline_tasks
from .zeroshot import TaskResult


def _sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Our per-document record (gold, per-choice log-likelihoods, greedy flags, predictions)."""
    lls = [float(r[0][0]) for r in sample["resps"]]
    lengths = [len(args[1]) for args in sample["arguments"]]
    pred = int(np.argmax(lls))
    target = sample["target"]
    if isinstance(target, (int, np.integer)) or str(target).isdigit():
        gold = int(target)
    else:  # partial scoring (WinoGrande): the target is the shared continuation, two choices
        gold = pred if sample["acc"] else 1 - pred
    return {"gold": gold, "lls": lls,
            "is_greedy": [bool(r[0][1]) for r in sample["resps"]],
            "pred": pred,
            "pred_norm": int(np.argmax(np.asarray(lls) / np.maximum(lengths, 1)))}


def harness_zeroshot(
    base: dict[str, Any],
    config: LlamaConfig,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    source: str = "files",
    limit: int | None = None,
    batch_size: int | None = None,
    mesh: Mesh | None = None,
    keep_samples: bool = False,
    progress: bool = True,
) -> dict[str, TaskResult]:
    """Accuracy (``acc``, and ``acc_norm`` where the harness reports it, with standard errors)
    of the model on ``tasks`` (the first ``limit`` documents of each), scored by the harness."""
    from lm_eval import simple_evaluate

    lm = LoraPruneJaxLM.from_model(config, base, tokenizer, batch_size=batch_size, mesh=mesh)
    lm.show_progress = progress
    with tempfile.TemporaryDirectory(prefix="loraprune-harness-") as tmp:
        manager = offline_tasks(tasks, data_dir, tmp, source=source)
        start = time.perf_counter()
        out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                              log_samples=True)
    seconds = time.perf_counter() - start
    results: dict[str, TaskResult] = {}
    for task in tasks:
        metrics, samples = out["results"][task], out["samples"][task]
        pairs = [tuple(args) for s in samples for args in s["arguments"]]
        has_norm = "acc_norm,none" in metrics
        results[task] = TaskResult(
            task=task, docs=len(samples), acc=float(metrics["acc,none"]),
            acc_stderr=float(metrics["acc_stderr,none"]),
            acc_norm=float(metrics["acc_norm,none"]) if has_norm else None,
            acc_norm_stderr=float(metrics["acc_norm_stderr,none"]) if has_norm else None,
            requests=len(pairs),
            tokens=sum(lm.tokens_scored[pair] for pair in pairs),  # as the model encoded them
            seconds=seconds / len(tasks),
            samples=[_sample(s) for s in sorted(samples, key=lambda s: s["doc_id"])]
            if keep_samples else None,
        )
    return results


__all__ = ["harness_zeroshot"]
