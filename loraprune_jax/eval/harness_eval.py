"""Zero-shot accuracy through lm-evaluation-harness: what ``loraprune-jax zeroshot`` runs.

:func:`harness_zeroshot` hands an already loaded (possibly sharded, int8, pruned) model to the
harness as :class:`~loraprune_jax.eval.harness.LoraPruneJaxLM`, the tasks as the harness's own
definitions on local files (:func:`~loraprune_jax.eval.harness_tasks.offline_tasks`), and returns
one :class:`TaskResult` per task: the harness's metrics with what our command line reports beside
them (documents, requests, tokens, seconds, and per-document log-likelihoods on request).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from ..config import LlamaConfig
from .harness import LoraPruneJaxLM
from .harness_tasks import offline_tasks


@dataclasses.dataclass
class TaskResult:
    """Accuracy of one task (``acc_norm`` is None where the harness does not report it)."""

    task: str
    docs: int
    acc: float
    acc_stderr: float
    acc_norm: float | None
    acc_norm_stderr: float | None
    requests: int
    tokens: int  # input tokens scored (shared rows counted once per request)
    seconds: float
    samples: list[dict[str, Any]] | None = None

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not samples:
            out.pop("samples")
        if self.acc_norm is None:
            out.pop("acc_norm")
            out.pop("acc_norm_stderr")
        return out


def format_result(res: TaskResult) -> str:
    """One line per task, as ``loraprune-jax zeroshot`` prints it."""
    line = f"{res.task:<14} n={res.docs:<5d} acc={res.acc:.4f} ± {res.acc_stderr:.4f}"
    if res.acc_norm is not None:
        line += f"  acc_norm={res.acc_norm:.4f} ± {res.acc_norm_stderr:.4f}"
    return line + f"  ({res.seconds:.1f}s)"


def _sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Our per-document record (gold, per-choice log-likelihoods, greedy flags, predictions)."""
    lls = [float(r[0][0]) for r in sample["resps"]]
    # acc_norm divides by the choice's length; the continuation is the delimiter " " + choice
    lengths = [len(args[1]) - 1 for args in sample["arguments"]]
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


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars or notices from the harness and ``datasets`` (``--no-progress``). The
    harness has no switch for its per-task request bar, so its module's ``tqdm`` is replaced
    for the duration."""
    import datasets
    import lm_eval.api.task as task_module
    from tqdm import tqdm

    bars = datasets.is_progress_bar_enabled()
    logger = logging.getLogger("lm_eval")
    level, bar = logger.level, task_module.tqdm
    datasets.disable_progress_bars()
    logger.setLevel(logging.ERROR)
    task_module.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = bar
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


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
    of the model on ``tasks`` (the first ``limit`` documents of each), scored by the harness;
    ``progress=False`` also silences the harness's and ``datasets``' bars and notices."""
    from lm_eval import simple_evaluate

    lm = LoraPruneJaxLM.from_model(config, base, tokenizer, batch_size=batch_size, mesh=mesh)
    lm.show_progress = progress
    quiet = contextlib.nullcontext() if progress else _quiet()
    with tempfile.TemporaryDirectory(prefix="loraprune-harness-") as tmp, quiet:
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


__all__ = ["TaskResult", "format_result", "harness_zeroshot"]
