"""The seven zero-shot tasks of the LoRAPrune / LLM-Pruner tables as lm-evaluation-harness
(0.4.13) defines them: BoolQ, PIQA, HellaSwag, WinoGrande, ARC-Easy, ARC-Challenge, OpenBookQA.

Each document becomes a list of ``(context, continuation)`` requests and a gold index:

* ordinary tasks: one request ``(doc_to_text, " " + choice)`` per choice;
* WinoGrande (partial scoring): one context per option, ``sentence[:i] + option`` with ``i`` the
  blank, and one shared continuation ``" " + sentence[i+1:].strip()``.

Given the summed log-likelihood of each request (:mod:`loraprune_jax.eval.loglikelihood`),
``acc`` = argmax of the sums; ``acc_norm`` (ARC, OpenBookQA, PIQA, HellaSwag) = argmax of the sum
divided by the choice's length in characters. Standard errors are the sample standard deviation
over documents divided by ``sqrt(n)``, as the harness reports.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..data.tasks import TASK_NAMES

TARGET_DELIMITER = " "

Doc = dict[str, Any]


def hellaswag_preprocess(text: str) -> str:
    """The harness' HellaSwag cleaning: strip, ``" [title]"`` -> ``". "``, drop ``[...]`` tags,
    double spaces -> one (a single pass, as ``str.replace`` does)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _label_index(doc: Doc, key: str) -> int:
    labels = list(doc["choices"]["label"])
    if key not in labels:
        raise ValueError(
            f"document {doc.get('id', '?')!r}: answerKey {key!r} is not one of its labels {labels}"
        )
    return labels.index(key)


def _winogrande_blank(doc: Doc) -> int:
    i = doc["sentence"].find("_")
    if i < 0:
        raise ValueError(f"winogrande sentence has no blank '_': {doc['sentence']!r}")
    return i


@dataclasses.dataclass(frozen=True)
class Task:
    """A multiple-choice task as the harness defines it.

    ``text(doc)``: the context (``doc_to_text``); ``choices(doc)``: the answer strings
    (``doc_to_choice``; for a partial-scoring task, the contexts); ``gold(doc)``: the gold index;
    ``continuation(doc)``: the shared continuation of a partial-scoring task (``doc_to_target``).
    """

    name: str
    text: Callable[[Doc], str] | None
    choices: Callable[[Doc], list[str]]
    gold: Callable[[Doc], int]
    metrics: tuple[str, ...]
    split: str
    dataset: str
    continuation: Callable[[Doc], str] | None = None

    @property
    def partial(self) -> bool:
        return self.continuation is not None


def _arc(name: str, config: str) -> Task:
    return Task(
        name=name,
        text=lambda d: f"Question: {d['question']}\nAnswer:",
        choices=lambda d: list(d["choices"]["text"]),
        gold=lambda d: _label_index(d, d["answerKey"]),
        metrics=("acc", "acc_norm"),
        split="test",
        dataset=f"allenai/ai2_arc ({config})",
    )


TASKS: dict[str, Task] = {
    "arc_easy": _arc("arc_easy", "ARC-Easy"),
    "arc_challenge": _arc("arc_challenge", "ARC-Challenge"),
    "openbookqa": Task(
        name="openbookqa",
        text=lambda d: d["question_stem"],
        choices=lambda d: list(d["choices"]["text"]),
        gold=lambda d: _label_index(d, d["answerKey"].lstrip()),
        metrics=("acc", "acc_norm"),
        split="test",
        dataset="allenai/openbookqa (main)",
    ),
    "piqa": Task(
        name="piqa",
        text=lambda d: f"Question: {d['goal']}\nAnswer:",
        choices=lambda d: [d["sol1"], d["sol2"]],
        gold=lambda d: int(d["label"]),
        metrics=("acc", "acc_norm"),
        split="validation",
        dataset="baber/piqa",
    ),
    "boolq": Task(
        name="boolq",
        text=lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
        choices=lambda d: ["no", "yes"],
        gold=lambda d: int(d["label"]),
        metrics=("acc",),
        split="validation",
        dataset="aps/super_glue (boolq)",
    ),
    "winogrande": Task(
        name="winogrande",
        text=None,
        choices=lambda d: [
            d["sentence"][: _winogrande_blank(d)] + opt for opt in (d["option1"], d["option2"])
        ],
        gold=lambda d: {"1": 0, "2": 1}[str(d["answer"])],
        metrics=("acc",),
        split="validation",
        dataset="allenai/winogrande (winogrande_xl)",
        continuation=lambda d: d["sentence"][_winogrande_blank(d) + 1 :].strip(),
    ),
    "hellaswag": Task(
        name="hellaswag",
        text=lambda d: hellaswag_preprocess(
            d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()
        ),
        choices=lambda d: [hellaswag_preprocess(e) for e in d["endings"]],
        gold=lambda d: int(d["label"]),
        metrics=("acc", "acc_norm"),
        split="validation",
        dataset="Rowan/hellaswag",
    ),
}
assert set(TASKS) == set(TASK_NAMES)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASK_NAMES)}")
    return TASKS[name]


def doc_to_requests(task: Task | str, doc: Doc) -> tuple[list[tuple[str, str]], int, list[str]]:
    """``(requests, gold, choices)`` of one document: ``(context, continuation)`` pairs, one per
    choice, the gold index and the choice strings (whose lengths ``acc_norm`` divides by)."""
    task = get_task(task) if isinstance(task, str) else task
    choices = task.choices(doc)
    if task.partial:
        cont = TARGET_DELIMITER + task.continuation(doc)
        requests = [(ctx, cont) for ctx in choices]
    else:
        ctx = task.text(doc)
        requests = [(ctx, TARGET_DELIMITER + c) for c in choices]
    gold = task.gold(doc)
    if not 0 <= gold < len(choices):
        raise ValueError(f"{task.name}: gold index {gold} outside {len(choices)} choices")
    return requests, gold, choices


def choice_metrics(
    lls: Sequence[float], gold: int, choices: Sequence[str]
) -> dict[str, float]:
    """``acc`` and ``acc_norm`` of one document from its per-choice log-likelihoods.

    ``acc_norm`` divides by ``len(choice)`` in characters (no delimiter); ties go to the first
    choice (``np.argmax``).
    """
    lls = np.asarray(lls, np.float64)
    lengths = np.array([float(len(c)) for c in choices])
    with np.errstate(divide="ignore", invalid="ignore"):
        pred_norm = int(np.argmax(lls / lengths))
    pred = int(np.argmax(lls))
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold), "pred": pred,
            "pred_norm": pred_norm}


def mean_stderr(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof 1) over ``sqrt(n)``; NaN below two values."""
    x = np.asarray(values, np.float64)
    if x.size < 2:
        return float("nan")
    return float(np.std(x, ddof=1) / math.sqrt(x.size))


__all__ = [
    "TARGET_DELIMITER",
    "TASKS",
    "Doc",
    "Task",
    "choice_metrics",
    "doc_to_requests",
    "get_task",
    "hellaswag_preprocess",
    "mean_stderr",
]
