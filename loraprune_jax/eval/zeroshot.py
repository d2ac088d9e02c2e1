"""Zero-shot multiple-choice accuracy with lm-evaluation-harness (0.4.13) semantics.

A task's documents (:mod:`loraprune_jax.data.tasks`) become requests and gold answers
(:mod:`.zeroshot_tasks`), are scored by log-likelihood in length buckets
(:mod:`.loglikelihood`), and aggregate into ``acc`` and ``acc_norm`` with standard errors per
task (:class:`TaskResult`). ``loraprune-jax zeroshot`` is the command-line front end
(:mod:`loraprune_jax.cli.zeroshot`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from ..config import LlamaConfig, LoraConfig
from ..data.tasks import load_task_docs
from ..models.llama_params import place_base, stack_layers
from .loglikelihood import encode_requests, score_tokens
from .zeroshot_tasks import Doc, Task, choice_metrics, doc_to_requests, get_task, mean_stderr


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


def evaluate_task(
    base: dict[str, Any],
    config: LlamaConfig,
    tokenizer: Any,
    task: Task | str,
    docs: Sequence[Doc],
    *,
    keep_samples: bool = False,
    **kwargs: Any,
) -> TaskResult:
    """Score every document of ``task`` and aggregate; ``kwargs`` as for :func:`score_tokens`
    (``lora``, ``masks``, ``lora_cfg``, ``batch_size``, ``progress``, ...)."""
    task = get_task(task) if isinstance(task, str) else task
    if not docs:
        raise ValueError(f"{task.name}: no documents")
    start = time.perf_counter()
    built = [doc_to_requests(task, d) for d in docs]
    requests = [r for reqs, _, _ in built for r in reqs]
    encoded = encode_requests(tokenizer, requests)
    kwargs.setdefault("desc", task.name)
    ll, greedy = score_tokens(base, config, encoded, **kwargs)
    accs, norms, samples = [], [], []
    lo = 0
    for doc, (reqs, gold, choices) in zip(docs, built):
        lls = ll[lo : lo + len(reqs)]
        m = choice_metrics(lls, gold, choices)
        accs.append(m["acc"])
        norms.append(m["acc_norm"])
        if keep_samples:
            samples.append({
                "gold": gold, "lls": [float(x) for x in lls],
                "is_greedy": [bool(x) for x in greedy[lo : lo + len(reqs)]],
                "pred": m["pred"], "pred_norm": m["pred_norm"],
            })
        lo += len(reqs)
    has_norm = "acc_norm" in task.metrics
    return TaskResult(
        task=task.name,
        docs=len(docs),
        acc=float(np.mean(accs)),
        acc_stderr=mean_stderr(accs),
        acc_norm=float(np.mean(norms)) if has_norm else None,
        acc_norm_stderr=mean_stderr(norms) if has_norm else None,
        requests=len(requests),
        tokens=int(sum(len(c) + len(x) for c, x in encoded)),
        seconds=time.perf_counter() - start,
        samples=samples if keep_samples else None,
    )


def prepare_base(base: dict[str, Any], config: LlamaConfig, mesh: Mesh | None = None
                 ) -> dict[str, Any]:
    """Stack the layers of a uniform model (``lax.scan``: faster to compile); a pruned model
    with per-layer widths stays a list. With a ``mesh``: the base placed on it (as is when
    already there; see ``models.llama_params.place_base``)."""
    if mesh is not None:
        return place_base(base, config, mesh)
    if config.is_uniform and isinstance(base["layers"], list):
        return stack_layers(base)
    return base


def run_zeroshot(
    base: dict[str, Any],
    config: LlamaConfig,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    data_dir: str | Path | None = None,
    source: str = "files",
    limit: int | None = None,
    batch_size: int | None = None,
    bucket: int = 16,
    lora: dict[str, Any] | None = None,
    masks: dict[str, Any] | None = None,
    lora_cfg: LoraConfig | None = None,
    progress: bool = True,
    keep_samples: bool = False,
    log: Callable[[str], None] | None = None,
    mesh: Mesh | None = None,
) -> dict[str, TaskResult]:
    """Evaluate ``tasks`` (names of :data:`TASKS`) on their documents (the first ``limit`` of
    each) from ``data_dir`` (release files, or tfds with ``source="tfds"``). With a ``mesh``
    the base is placed on it (unless it already is) and each call's rows are split over its
    batch axes; log-likelihoods equal one device's to float tolerance."""
    for name in tasks:
        get_task(name)
    docs = {
        name: load_task_docs(name, data_dir, source=source, limit=limit) for name in tasks
    }  # all data first: a missing file fails before any compute
    base = prepare_base(base, config, mesh)
    results: dict[str, TaskResult] = {}
    for name in tasks:
        res = evaluate_task(
            base, config, tokenizer, name, docs[name], lora=lora, masks=masks, lora_cfg=lora_cfg,
            batch_size=batch_size, bucket=bucket, progress=progress, keep_samples=keep_samples,
            mesh=mesh,
        )
        results[name] = res
        if log is not None:
            log(format_result(res))
    return results


def format_result(res: TaskResult) -> str:
    line = f"{res.task:<14} n={res.docs:<5d} acc={res.acc:.4f} ± {res.acc_stderr:.4f}"
    if res.acc_norm is not None:
        line += f"  acc_norm={res.acc_norm:.4f} ± {res.acc_norm_stderr:.4f}"
    return line + f"  ({res.seconds:.1f}s)"


__all__ = ["TaskResult", "evaluate_task", "format_result", "prepare_base", "run_zeroshot"]
