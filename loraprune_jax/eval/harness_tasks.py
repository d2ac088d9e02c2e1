"""The harness's own task definitions, pointed at local files: no network.

For each task of ``data.tasks`` (PIQA, ARC-Easy/Challenge, BoolQ, WinoGrande, OpenBookQA,
HellaSwag) whose release files are under a data directory (the layout of ``../shared/data``) or
in prepared tensorflow-datasets, :func:`offline_tasks` writes the documents as JSON lines in the
schema of the harness's Hugging Face copy (``data.tasks`` converts them) and a task YAML that
``include``s the harness's own YAML for the task, replacing only where the documents come from.
Prompts, choices, targets, preprocessing and metrics stay the harness's. A user with network
access runs any other harness task by name, as with the ``hf`` model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.tasks import TASK_NAMES, TASK_SPLITS, load_task_docs
from ..extras import require

# our task name -> the harness's YAML, relative to lm_eval/tasks (its split: data.tasks.TASK_SPLITS)
HARNESS_TASKS: dict[str, str] = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "winogrande": "winogrande/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
}


def harness_yaml(task: str) -> Path:
    """The harness's own YAML file for ``task``."""
    lm_eval = require("lm_eval", "the harness's offline tasks (loraprune_jax.eval.harness_tasks)")
    if task not in HARNESS_TASKS:
        raise ValueError(f"unknown task {task!r}; local files exist for: {', '.join(TASK_NAMES)}")
    return Path(lm_eval.__file__).parent / "tasks" / HARNESS_TASKS[task]


def task_yaml(task: str, docs_file: Path) -> str:
    """A task YAML: the harness's definition of ``task`` reading ``docs_file`` (JSON lines)."""
    split = TASK_SPLITS[task]
    splits = {"training_split": None, "validation_split": None, "test_split": None,
              "fewshot_split": None}
    splits[f"{split}_split"] = split
    lines = [f"include: {json.dumps(str(harness_yaml(task)))}", f"task: {task}",
             "dataset_path: json", "dataset_name: null", "dataset_kwargs:", "  data_files:",
             f"    {split}: {json.dumps(str(docs_file))}"]
    lines += [f"{key}: {'null' if value is None else value}" for key, value in splits.items()]
    return "\n".join(lines) + "\n"


def offline_tasks(tasks: Sequence[str], data_dir: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str],
                  *, source: str = "files") -> Any:
    """A harness ``TaskManager`` holding ``tasks`` read from local files (``source="files"``:
    the release files under ``data_dir``; ``"tfds"``: prepared tensorflow-datasets), their
    documents and YAMLs written under ``out_dir``. Missing files fail here, naming the file."""
    require("lm_eval", "the harness's offline tasks (loraprune_jax.eval.harness_tasks)")
    from lm_eval.tasks import TaskManager

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        harness_yaml(task)  # an unknown name fails before any file is read
    for task in tasks:
        docs = load_task_docs(task, data_dir, source=source)
        docs_file = out / f"{task}.jsonl"
        with open(docs_file, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        (out / f"{task}.yaml").write_text(task_yaml(task, docs_file), encoding="utf-8")
    return TaskManager(include_path=str(out), include_defaults=False)


__all__ = ["HARNESS_TASKS", "harness_yaml", "offline_tasks", "task_yaml"]
