"""Zero-shot task data: release files in their original schemas, and tfds (without TensorFlow)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from loraprune_jax.data.tasks import (
    TASK_FILES,
    TASK_NAMES,
    TaskDataError,
    load_task_docs,
)

DATA = Path(__file__).parent / "data" / "zeroshot"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_task_loads_from_release_files():
    counts = {"arc_easy": 3, "arc_challenge": 2, "openbookqa": 2, "piqa": 3, "boolq": 2,
              "winogrande": 2, "hellaswag": 2}
    assert set(counts) == set(TASK_NAMES) == set(TASK_FILES)
    for task, n in counts.items():
        docs = load_task_docs(task, DATA)
        assert len(docs) == n, task
        assert load_task_docs(task, DATA, limit=1) == docs[:1]
        assert load_task_docs(task, DATA, limit=100) == docs


def test_arc_and_openbookqa_documents():
    easy = load_task_docs("arc_easy", DATA)
    assert easy[0] == {
        "id": "Toy_easy_1",
        "question": "Which object is the best conductor of heat?",
        "choices": {"text": ["a wooden spoon", "a copper pot", "a paper cup", "a plastic plate"],
                    "label": ["A", "B", "C", "D"]},
        "answerKey": "B",
    }
    assert easy[1]["choices"]["label"] == ["1", "2", "3", "4"] and easy[1]["answerKey"] == "2"
    assert len(easy[2]["choices"]["text"]) == 3
    challenge = load_task_docs("arc_challenge", DATA)
    assert len(challenge[0]["choices"]["text"]) == 5
    obqa = load_task_docs("openbookqa", DATA)
    assert obqa[0]["question_stem"] == "A magnet will stick to"
    assert obqa[1]["answerKey"] == " C"  # kept as in the file; the task strips it (lm-eval)


def test_piqa_boolq_winogrande_hellaswag_documents():
    piqa = load_task_docs("piqa", DATA)
    assert [d["label"] for d in piqa] == [0, 1, 0]
    assert piqa[2]["sol2"] == "sharpen with a  spoon "  # untouched
    boolq = load_task_docs("boolq", DATA)
    assert boolq[0]["passage"].startswith("Sun -- The Sun is the star")
    assert [d["label"] for d in boolq] == [1, 0]
    assert set(boolq[0]) == {"question", "passage", "label"}
    wino = load_task_docs("winogrande", DATA)
    assert wino[1] == {"sentence": "Anna gave Maria a gift because _ was celebrating her birthday.",
                       "option1": "Anna", "option2": "Maria", "answer": "2"}
    hs = load_task_docs("hellaswag", DATA)
    assert hs[0]["label"] == 2 and len(hs[0]["endings"]) == 4 and hs[0]["ctx_b"] == "he"


def test_missing_files_are_named(tmp_path):
    with pytest.raises(TaskDataError, match=r"hellaswag/hellaswag_val.jsonl"):
        load_task_docs("hellaswag", tmp_path)
    shutil.copytree(DATA / "piqa", tmp_path / "piqa")
    (tmp_path / "piqa" / "valid-labels.lst").unlink()
    with pytest.raises(FileNotFoundError, match=r"piqa/valid-labels.lst"):
        load_task_docs("piqa", tmp_path)
    with pytest.raises(TaskDataError, match="does not exist"):
        load_task_docs("boolq", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown task"):
        load_task_docs("mmlu", DATA)
    with pytest.raises(ValueError, match="source"):
        load_task_docs("boolq", DATA, source="hub")


def test_data_dir_from_environment(monkeypatch):
    monkeypatch.delenv("LORAPRUNE_JAX_EVAL_DATA", raising=False)
    with pytest.raises(TaskDataError, match="--data-dir"):
        load_task_docs("boolq")
    monkeypatch.setenv("LORAPRUNE_JAX_EVAL_DATA", str(DATA))
    assert len(load_task_docs("boolq")) == 2


def test_bad_files_raise_clearly(tmp_path):
    shutil.copytree(DATA / "piqa", tmp_path / "piqa")
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(ValueError, match="3 items but .* 2 labels"):
        load_task_docs("piqa", tmp_path)
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "dev.jsonl").write_text('{"question": "q", "answer": true}\n')
    with pytest.raises(ValueError, match="release schema"):
        load_task_docs("boolq", tmp_path)
    (tmp_path / "boolq" / "dev.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="dev.jsonl:1"):
        load_task_docs("boolq", tmp_path)


# ----------------------------------------------------------------------------- tfds
import tensorflow_datasets as tfds  # noqa: E402

_OPTIONS = ["A", "B", "C", "D", "E"]
_NUM_TO_LETTER = dict(zip("12345", "ABCDE"))


def _arc_examples(path: Path):
    """Release lines as the tfds ai2_arc builder yields them (labels 1-4 mapped to A-E)."""
    for row in read_jsonl(path):
        yield row["id"], {
            "id": row["id"],
            "question": row["question"]["stem"],
            "choices": {
                "text": [c["text"] for c in row["question"]["choices"]],
                "label": [_NUM_TO_LETTER.get(c["label"], c["label"])
                          for c in row["question"]["choices"]],
            },
            "answerKey": _NUM_TO_LETTER.get(row["answerKey"], row["answerKey"]),
        }


class Ai2ArcLocal(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Same name, config, version and features as tfds' ai2_arc, built from our toy files."""

    name = "ai2_arc"
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="ARC-Easy", version=tfds.core.Version("1.0.0"))]

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "question": tfds.features.Text(),
                "choices": tfds.features.Sequence({
                    "text": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=_OPTIONS),
                }),
                "answerKey": tfds.features.ClassLabel(names=_OPTIONS),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples(DATA / TASK_FILES["arc_easy"][0])}

    def _generate_examples(self, path):
        yield from _arc_examples(path)


class SuperGlueLocal(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """tfds' super_glue/boolq schema: SuperGLUE passage (title-prefixed), ClassLabel label."""

    name = "super_glue"
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="boolq", version=tfds.core.Version("1.0.2"))]

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "question": tfds.features.Text(),
                "passage": tfds.features.Text(),
                "idx": np.int32,
                "label": tfds.features.ClassLabel(names=["False", "True"]),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        for i, row in enumerate(read_jsonl(DATA / "boolq" / "dev.jsonl")):
            yield i, {"question": row["question"], "passage": f"{row['title']} -- {row['passage']}",
                      "idx": i, "label": "True" if row["answer"] else "False"}


class WinograndeLocal(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "winogrande"
    VERSION = tfds.core.Version("1.2.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "sentence": tfds.features.Text(),
                "option1": tfds.features.Text(),
                "option2": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=["1", "2"]),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        for row in read_jsonl(DATA / "winogrande" / "dev.jsonl"):
            yield row["qID"], {k: row[k] for k in ("sentence", "option1", "option2")} | {
                "label": row["answer"]}


class PiqaLocal(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "piqa"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(), "goal": tfds.features.Text(),
                "sol1": tfds.features.Text(), "sol2": tfds.features.Text(),
                "label": tfds.features.ClassLabel(num_classes=2),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        labels = (DATA / "piqa" / "valid-labels.lst").read_text().split()
        for i, (row, label) in enumerate(zip(read_jsonl(DATA / "piqa" / "valid.jsonl"), labels)):
            yield i, {"id": str(i), **row, "label": int(label)}


class OpenbookqaLocal(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "openbookqa"
    VERSION = tfds.core.Version("0.1.0")  # the registered builder's version

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "question": {"stem": tfds.features.Text(),
                             **{f"choice_{c}": tfds.features.Text() for c in "ABCD"}},
                "fact1": tfds.features.Text(),
                "humanScore": tfds.features.Tensor(shape=(), dtype=np.float32),
                "clarity": tfds.features.Tensor(shape=(), dtype=np.float32),
                "turkIdAnonymized": tfds.features.Text(),
                "answerKey": tfds.features.ClassLabel(names=["A", "B", "C", "D"]),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        for row in read_jsonl(DATA / "openbookqa" / "test.jsonl"):
            q = row["question"]
            yield row["id"], {
                "question": {"stem": q["stem"],
                             **{f"choice_{c['label']}": c["text"] for c in q["choices"]}},
                "fact1": "", "humanScore": 1.0, "clarity": 1.0, "turkIdAnonymized": "",
                "answerKey": row["answerKey"].strip(),
            }


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds_tasks")
    for cls in (Ai2ArcLocal, SuperGlueLocal, WinograndeLocal, PiqaLocal, OpenbookqaLocal):
        builder = cls(data_dir=str(root), file_format="array_record")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return root


@pytest.mark.parametrize("task", ["arc_easy", "boolq", "winogrande", "piqa", "openbookqa"])
def test_tfds_gives_the_same_requests_as_release_files(tfds_dir, task, tmp_path):
    """Read back through tfds.data_source (array_record): the harness builds the same prompts,
    choices and gold from them as from the release files."""
    from conftest import harness_requests

    from_tfds = load_task_docs(task, tfds_dir, source="tfds")
    from_files = load_task_docs(task, DATA)
    assert (harness_requests([task], tfds_dir, tmp_path / "tfds", source="tfds")
            == harness_requests([task], DATA, tmp_path / "files"))
    assert load_task_docs(task, tfds_dir, source="tfds", limit=1) == from_tfds[:1]
    if task == "boolq":
        assert from_tfds == from_files
    if task == "arc_easy":  # labels 1-4 became letters in tfds; the gold index is unchanged
        assert from_tfds[1]["choices"]["label"] == ["A", "B", "C", "D"]
        assert from_tfds[1]["answerKey"] == "B"


def test_tfds_missing_dataset_is_clear(tfds_dir):
    with pytest.raises(TaskDataError, match="hellaswag"):
        load_task_docs("hellaswag", tfds_dir, source="tfds")


def test_tfds_path_needs_no_tensorflow(tfds_dir):
    load_task_docs("arc_easy", tfds_dir, source="tfds")
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed here; cannot prove TF-free operation")
    assert "tensorflow" not in sys.modules


def test_hellaswag_tfds_document_mapping():
    from loraprune_jax.data.tasks import hellaswag_doc_from_tfds

    doc = hellaswag_doc_from_tfds({
        "context": b"A man is cooking. he", "endings": [b"a", b"b", b"c", b"d"],
        "activity_label": b"Cooking", "label": np.int32(1), "split_type": b"indomain",
        "source_id": b"x",
    })
    assert doc["ctx_a"] == "A man is cooking. he" and doc["ctx_b"] == "" and doc["label"] == 1
    assert doc["endings"] == ["a", "b", "c", "d"]
