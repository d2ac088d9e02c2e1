"""The harness's own task definitions on local files: every task of tests/data/zeroshot runs
offline through lm-evaluation-harness with our model and gives the accuracies and per-choice
log-likelihoods of our hand-written zero-shot code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lm_eval import simple_evaluate

from conftest import byte_tokenizer, noisy_norms, tiny_config
from loraprune_jax.data.tasks import TASK_NAMES
from loraprune_jax.eval.harness import LoraPruneJaxLM
from loraprune_jax.eval.harness_tasks import HARNESS_TASKS, harness_yaml, offline_tasks, task_yaml
from loraprune_jax.eval.zeroshot import run_zeroshot
from loraprune_jax.models.llama_params import init_base

DATA = Path(__file__).parent / "data" / "zeroshot"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from loraprune_jax.io import save_hf_dir

    cfg = tiny_config("gqa", vocab_size=260, max_position_embeddings=512)
    tok = byte_tokenizer()
    tok.add_special_tokens({"eos_token": "<|end|>"})
    path = tmp_path_factory.mktemp("harness_tasks") / "model"
    save_hf_dir(path, cfg, noisy_norms(init_base(cfg, 0, std=0.3)), tok)
    return LoraPruneJaxLM(pretrained=str(path), batch_size=8)


def test_every_task_has_a_harness_yaml_that_exists():
    assert set(HARNESS_TASKS) == set(TASK_NAMES)
    for task in TASK_NAMES:
        assert harness_yaml(task).is_file(), task
    text = task_yaml("piqa", Path("/x/piqa.jsonl"))
    assert "dataset_path: json" in text and 'validation: "/x/piqa.jsonl"' in text
    assert "training_split: null" in text and "validation_split: validation" in text


@pytest.mark.slow
def test_offline_harness_tasks_equal_our_zero_shot_code(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = [t for t in TASK_NAMES if t not in ("arc_easy", "arc_challenge")]  # no ARC fixture
    manager = offline_tasks(tasks, DATA, tmp_path / "tasks")
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True)
    ours = run_zeroshot(lm.base, lm.config, lm.tokenizer, tasks, data_dir=DATA, progress=False,
                        keep_samples=True)
    for task in tasks:
        got, want = out["results"][task], ours[task]
        assert got["acc,none"] == pytest.approx(want.acc), task
        if want.acc_norm is not None:
            assert got["acc_norm,none"] == pytest.approx(want.acc_norm), task
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        assert len(samples) == len(want.samples), task
        for s, w in zip(samples, want.samples):
            np.testing.assert_allclose([r[0][0] for r in s["resps"]], w["lls"], rtol=1e-5,
                                       atol=1e-5, err_msg=task)


def test_missing_files_fail_before_the_harness_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="boolq/dev.jsonl"):
        offline_tasks(["boolq"], DATA / "arc", tmp_path / "tasks")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        offline_tasks(["nope"], DATA, tmp_path / "tasks")
