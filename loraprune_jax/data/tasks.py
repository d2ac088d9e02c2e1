"""Documents of the zero-shot tasks: local files in each task's original release schema, or tfds.

Every loader returns a list of plain dicts with the field names lm-evaluation-harness (0.4.13)
reads from its Hugging Face copy of the task, whatever the source, so the harness's own task
definitions read them unchanged (:mod:`loraprune_jax.eval.harness_tasks`). The harness itself
reads only Hugging Face datasets; this module is what lets it run offline on the release files:

============  =========================================================================
task          document
============  =========================================================================
arc_*         ``{"id", "question", "choices": {"text": [...], "label": [...]}, "answerKey"}``
openbookqa    ``{"id", "question_stem", "choices": {"text", "label"}, "answerKey"}``
piqa          ``{"goal", "sol1", "sol2", "label": int}``
boolq         ``{"question", "passage", "label": int}`` (passage = ``title + " -- " + passage``)
winogrande    ``{"sentence", "option1", "option2", "answer": "1" | "2"}``
hellaswag     ``{"ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings": [4], "label": int}``
============  =========================================================================

Local files (``source="files"``) are found under a data directory by the relative paths of the
shared data folder (``arc/ARC-Easy/ARC-Easy-Test.jsonl``, ``boolq/dev.jsonl``, ...; see
:data:`TASK_FILES`); the split is the one the harness evaluates (test for ARC and OpenBookQA,
validation for the others). tfds (``source="tfds"``) reads prepared ``array_record`` datasets
with ``tfds.data_source`` (no TensorFlow), catalog names in :data:`TFDS_SOURCES`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

TASK_NAMES = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

# Relative paths under the data directory: the release files of the split the harness evaluates.
TASK_FILES: dict[str, tuple[str, ...]] = {
    "arc_easy": ("arc/ARC-Easy/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc/ARC-Challenge/ARC-Challenge-Test.jsonl",),
    "openbookqa": ("openbookqa/test.jsonl",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "boolq": ("boolq/dev.jsonl",),
    "winogrande": ("winogrande/dev.jsonl",),
    "hellaswag": ("hellaswag/hellaswag_val.jsonl",),
}

# The split the harness evaluates per task: what TASK_FILES hold, what tfds reads, what the
# harness's task YAMLs name (eval.harness_tasks).
TASK_SPLITS: dict[str, str] = {
    "arc_easy": "test", "arc_challenge": "test", "openbookqa": "test", "piqa": "validation",
    "boolq": "validation", "winogrande": "validation", "hellaswag": "validation",
}

# tfds catalog name and split per task.
TFDS_SOURCES: dict[str, tuple[str, str]] = {
    task: (name, TASK_SPLITS[task]) for task, name in {
        "arc_easy": "ai2_arc/ARC-Easy",
        "arc_challenge": "ai2_arc/ARC-Challenge",
        "openbookqa": "openbookqa",
        "piqa": "piqa",
        "boolq": "super_glue/boolq",
        "winogrande": "winogrande",
        "hellaswag": "hellaswag",
    }.items()
}

_DESCRIBE = {
    "arc_easy": "the ARC release's ARC-Easy test file",
    "arc_challenge": "the ARC release's ARC-Challenge test file",
    "openbookqa": "OpenBookQA Main test.jsonl",
    "piqa": "PIQA valid.jsonl with its valid-labels.lst",
    "boolq": "BoolQ dev.jsonl",
    "winogrande": "WinoGrande 1.1 dev.jsonl",
    "hellaswag": "HellaSwag hellaswag_val.jsonl (rowanz/hellaswag data/)",
}

DATA_DIR_ENV = "LORAPRUNE_JAX_EVAL_DATA"


class TaskDataError(FileNotFoundError):
    """A task's data file is missing or unreadable (an ``OSError``: the CLI prints one line)."""


def check_task(task: str) -> str:
    if task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASK_NAMES)}")
    return task


# ----------------------------------------------------------------------------- original schemas
def _choices(raw_question: dict[str, Any]) -> dict[str, list[str]]:
    items = raw_question["choices"]
    return {"text": [c["text"] for c in items], "label": [c["label"] for c in items]}


def arc_doc(raw: dict[str, Any]) -> dict[str, Any]:
    """An ARC release line -> the harness' ``allenai/ai2_arc`` document."""
    q = raw["question"]
    return {"id": raw["id"], "question": q["stem"], "choices": _choices(q), "answerKey": raw["answerKey"]}


def openbookqa_doc(raw: dict[str, Any]) -> dict[str, Any]:
    """An OpenBookQA release line -> the harness' ``allenai/openbookqa`` (main) document."""
    q = raw["question"]
    return {
        "id": raw["id"],
        "question_stem": q["stem"],
        "choices": _choices(q),
        "answerKey": raw["answerKey"],
    }


def piqa_doc(raw: dict[str, Any], label: int | str) -> dict[str, Any]:
    """A PIQA ``valid.jsonl`` line and its line of ``valid-labels.lst``."""
    return {"goal": raw["goal"], "sol1": raw["sol1"], "sol2": raw["sol2"], "label": int(label)}


def boolq_doc(raw: dict[str, Any]) -> dict[str, Any]:
    """A BoolQ release line -> the SuperGLUE document (passage prefixed with its page title)."""
    return {
        "question": raw["question"],
        "passage": f"{raw['title']} -- {raw['passage']}",
        "label": 1 if raw["answer"] else 0,
    }


def winogrande_doc(raw: dict[str, Any]) -> dict[str, Any]:
    """A WinoGrande release line (``answer`` ``"1"``/``"2"``)."""
    return {
        "sentence": raw["sentence"],
        "option1": raw["option1"],
        "option2": raw["option2"],
        "answer": str(raw["answer"]),
    }


def hellaswag_doc(raw: dict[str, Any]) -> dict[str, Any]:
    """A HellaSwag release line (``hellaswag_val.jsonl``)."""
    return {
        "ind": raw.get("ind"),
        "activity_label": raw["activity_label"],
        "ctx_a": raw["ctx_a"],
        "ctx_b": raw["ctx_b"],
        "ctx": raw.get("ctx", ""),
        "endings": list(raw["endings"]),
        "label": int(raw["label"]),
    }


_FROM_RELEASE: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "arc_easy": arc_doc,
    "arc_challenge": arc_doc,
    "openbookqa": openbookqa_doc,
    "boolq": boolq_doc,
    "winogrande": winogrande_doc,
    "hellaswag": hellaswag_doc,
}


# ----------------------------------------------------------------------------- local files
def default_data_dir() -> Path | None:
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def task_files(task: str, data_dir: str | os.PathLike[str]) -> list[Path]:
    """The files of ``task`` under ``data_dir``; ``TaskDataError`` names the first missing one."""
    check_task(task)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise TaskDataError(f"{task}: data directory {root} does not exist")
    paths = [root / rel for rel in TASK_FILES[task]]
    for path in paths:
        if not path.is_file():
            raise TaskDataError(
                f"{task}: missing file {path} (expected {_DESCRIBE[task]} at "
                f"<data-dir>/{path.relative_to(root)})"
            )
    return paths


def _read_jsonl(path: Path, limit: int | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({e.msg})") from e
    return out


def _read_labels(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _convert(task: str, path: Path, rows: Iterable[dict[str, Any]], fn: Callable) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(fn(row))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{task}: {path} item {i}: not in the release schema (field {e})") from e
    return out


def load_task_files(
    task: str, data_dir: str | os.PathLike[str], limit: int | None = None
) -> list[dict[str, Any]]:
    """Documents of ``task`` from its release files under ``data_dir`` (the first ``limit``)."""
    paths = task_files(task, data_dir)
    if task == "piqa":
        data, labels_path = paths
        rows = _read_jsonl(data, None)
        labels = _read_labels(labels_path)
        if len(labels) != len(rows):
            raise ValueError(
                f"piqa: {data} has {len(rows)} items but {labels_path} has {len(labels)} labels"
            )
        rows, labels = rows[:limit], labels[:limit]
        return [piqa_doc(r, lab) for r, lab in zip(rows, labels)]
    return _convert(task, paths[0], _read_jsonl(paths[0], limit), _FROM_RELEASE[task])


# ----------------------------------------------------------------------------- tfds
def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return _text(value.item())
    return str(value)


def _texts(values: Any) -> list[str]:
    return [_text(v) for v in values]


_LETTERS = "ABCDE"


def arc_doc_from_tfds(ex: dict[str, Any]) -> dict[str, Any]:
    """tfds ``ai2_arc``: labels and ``answerKey`` are ClassLabel indices into A-E (tfds maps the
    release's ``1``-``4`` labels to letters, which keeps the gold index)."""
    labels = [_LETTERS[int(i)] for i in ex["choices"]["label"]]
    return {
        "id": _text(ex["id"]),
        "question": _text(ex["question"]),
        "choices": {"text": _texts(ex["choices"]["text"]), "label": labels},
        "answerKey": _LETTERS[int(ex["answerKey"])],
    }


def openbookqa_doc_from_tfds(ex: dict[str, Any]) -> dict[str, Any]:
    """tfds ``openbookqa``: four ``choice_A``..``choice_D`` fields, ClassLabel ``answerKey``."""
    q = ex["question"]
    return {
        "id": _text(ex.get("id", "")),
        "question_stem": _text(q["stem"]),
        "choices": {"text": [_text(q[f"choice_{c}"]) for c in "ABCD"], "label": list("ABCD")},
        "answerKey": "ABCD"[int(ex["answerKey"])],
    }


def piqa_doc_from_tfds(ex: dict[str, Any]) -> dict[str, Any]:
    return {
        "goal": _text(ex["goal"]),
        "sol1": _text(ex["sol1"]),
        "sol2": _text(ex["sol2"]),
        "label": int(ex["label"]),
    }


def boolq_doc_from_tfds(ex: dict[str, Any]) -> dict[str, Any]:
    """tfds ``super_glue/boolq``: the SuperGLUE copy, passage already title-prefixed;
    ClassLabel ``["False", "True"]`` gives 0/1 as the harness' ``label``."""
    return {"question": _text(ex["question"]), "passage": _text(ex["passage"]), "label": int(ex["label"])}


def winogrande_doc_from_tfds(ex: dict[str, Any]) -> dict[str, Any]:
    """tfds ``winogrande``: ClassLabel ``["1", "2"]`` -> ``answer`` ``"1"``/``"2"``."""
    return {
        "sentence": _text(ex["sentence"]),
        "option1": _text(ex["option1"]),
        "option2": _text(ex["option2"]),
        "answer": str(int(ex["label"]) + 1),
    }


def hellaswag_doc_from_tfds(ex: dict[str, Any]) -> dict[str, Any]:
    """tfds ``hellaswag`` keeps only the joined ``ctx`` (as ``context``), not ``ctx_a``/``ctx_b``.

    The harness capitalizes ``ctx_b`` (first letter up, the rest lower), which cannot be redone
    without the split point, so this document puts the whole context in ``ctx_a`` and leaves
    ``ctx_b`` empty: scores then differ slightly from the harness' (see :func:`load_task_tfds`).
    """
    return {
        "ind": None,
        "activity_label": _text(ex["activity_label"]),
        "ctx_a": _text(ex["context"]),
        "ctx_b": "",
        "ctx": _text(ex["context"]),
        "endings": _texts(ex["endings"]),
        "label": int(ex["label"]),
    }


_FROM_TFDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "arc_easy": arc_doc_from_tfds,
    "arc_challenge": arc_doc_from_tfds,
    "openbookqa": openbookqa_doc_from_tfds,
    "piqa": piqa_doc_from_tfds,
    "boolq": boolq_doc_from_tfds,
    "winogrande": winogrande_doc_from_tfds,
    "hellaswag": hellaswag_doc_from_tfds,
}


def load_task_tfds(
    task: str,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    *,
    name: str | None = None,
    split: str | None = None,
) -> list[dict[str, Any]]:
    """Documents of ``task`` from a prepared tfds dataset (array_record, read without TensorFlow).

    ``name`` / ``split`` override the catalog name and split of :data:`TFDS_SOURCES`;
    ``data_dir`` is tfds' data directory (default: tfds' own, ``~/tensorflow_datasets``). Nothing
    is downloaded: prepare the dataset first with ``file_format="array_record"``. Note that tfds
    writes examples in a shuffled order unless the builder disables shuffling, so ``limit`` takes
    a different subset than the harness' ``--limit`` would.
    """
    from .tfds_source import prepared_data_source

    check_task(task)
    default_name, default_split = TFDS_SOURCES[task]
    name, split = name or default_name, split or default_split
    try:
        source = prepared_data_source(name, split, data_dir)
    except Exception as e:  # tfds raises several types (AssertionError, DatasetNotFoundError, ...)
        raise TaskDataError(
            f"{task}: cannot read tfds dataset {name}[{split}]"
            + (f" under {data_dir}" if data_dir is not None else "")
            + f" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); prepare it "
            "with file_format='array_record' or use the release files with --data-dir"
        ) from e
    n = len(source) if limit is None else min(limit, len(source))
    if task == "hellaswag":
        warnings.warn(
            "tfds hellaswag has no ctx_a/ctx_b: the context is not re-capitalized as the harness "
            "does, so scores can differ slightly from lm-eval's",
            stacklevel=2,
        )
    examples = source.__getitems__(list(range(n))) if n else []
    convert = _FROM_TFDS[task]
    return [convert(ex) for ex in examples]


# ----------------------------------------------------------------------------- entry point
def load_task_docs(
    task: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    source: str = "files",
    limit: int | None = None,
    tfds_name: str | None = None,
    split: str | None = None,
) -> list[dict[str, Any]]:
    """Documents of ``task``: the first ``limit`` of the split the harness evaluates.

    ``source="files"``: release files under ``data_dir`` (default ``$LORAPRUNE_JAX_EVAL_DATA``);
    ``source="tfds"``: a prepared tfds dataset, ``data_dir`` being tfds' data directory.
    """
    check_task(task)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    if source == "tfds":
        return load_task_tfds(task, data_dir, limit, name=tfds_name, split=split)
    if source != "files":
        raise ValueError(f"source must be 'files' or 'tfds', got {source!r}")
    if data_dir is None:
        data_dir = default_data_dir()
        if data_dir is None:
            raise TaskDataError(
                f"{task}: no data directory: give --data-dir DIR (holding e.g. "
                f"{TASK_FILES[task][0]}) or set ${DATA_DIR_ENV}"
            )
    return load_task_files(task, data_dir, limit)


__all__ = [
    "DATA_DIR_ENV",
    "TASK_FILES",
    "TASK_NAMES",
    "TASK_SPLITS",
    "TFDS_SOURCES",
    "TaskDataError",
    "arc_doc",
    "boolq_doc",
    "hellaswag_doc",
    "load_task_docs",
    "load_task_files",
    "load_task_tfds",
    "openbookqa_doc",
    "piqa_doc",
    "task_files",
    "winogrande_doc",
]
