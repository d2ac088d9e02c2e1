"""``harness_zeroshot``, what ``loraprune-jax zeroshot`` runs: the harness's metrics per task with
our per-document records, equal to accuracies worked out by hand from brute-force scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import ZEROSHOT_DATA as DATA, byte_tokenizer, harness_requests, reference_lls, tiny_config
from loraprune_jax.data.tasks import TASK_NAMES
from loraprune_jax.eval.harness_eval import TaskResult, format_result, harness_zeroshot
from loraprune_jax.eval.loglikelihood import encode_requests
from loraprune_jax.models.llama_params import init_base


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config("gqa", vocab_size=256)
    return cfg, init_base(cfg, 0, std=0.2), byte_tokenizer()


def test_metrics_and_samples_equal_hand_computed_ones(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg, base, tok = model
    res = harness_zeroshot(base, cfg, tok, ["arc_easy", "boolq"], data_dir=DATA,
                           keep_samples=True, progress=False)
    built = harness_requests(["arc_easy"], DATA, tmp_path)["arc_easy"]
    arc = res["arc_easy"]
    assert (arc.docs, arc.requests) == (3, 11)
    accs, norms, tokens = [], [], 0
    for sample, (reqs, gold) in zip(arc.samples, built):
        encoded = encode_requests(tok, reqs)
        tokens += sum(len(c) + len(x) for c, x in encoded)
        lls = reference_lls(base, cfg, encoded)
        np.testing.assert_allclose(sample["lls"], lls, rtol=1e-5, atol=1e-5)
        per_char = lls / np.array([len(x) - 1 for _, x in reqs])  # the choice without " "
        assert (sample["gold"], sample["pred"], sample["pred_norm"]) == (
            gold, int(np.argmax(lls)), int(np.argmax(per_char)))
        accs.append(float(np.argmax(lls) == gold))
        norms.append(float(np.argmax(per_char) == gold))
    assert arc.tokens == tokens
    assert arc.acc == pytest.approx(np.mean(accs))
    assert arc.acc_norm == pytest.approx(np.mean(norms))
    assert arc.acc_stderr == pytest.approx(np.std(accs, ddof=1) / math.sqrt(3))
    out = arc.to_dict()
    assert "samples" not in out and "acc_norm" in out and "samples" in arc.to_dict(samples=True)
    boolq = res["boolq"]
    assert boolq.acc_norm is None and "acc_norm" not in boolq.to_dict()
    assert "acc_norm" not in format_result(boolq) and "acc_norm=" in format_result(arc)


@pytest.mark.slow
def test_all_seven_tasks_with_a_limit(model, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg, base, tok = model
    results = harness_zeroshot(base, cfg, tok, list(TASK_NAMES), data_dir=DATA, limit=2,
                               progress=False)
    assert list(results) == list(TASK_NAMES)
    for name, res in results.items():
        assert isinstance(res, TaskResult)
        assert res.docs == 2 and 0.0 <= res.acc <= 1.0 and res.seconds > 0, name
        assert (res.acc_norm is None) == (name in ("boolq", "winogrande")), name


def test_missing_data_fails_before_scoring(model):
    cfg, base, tok = model
    with pytest.raises(FileNotFoundError, match="boolq/dev.jsonl"):
        harness_zeroshot(base, cfg, tok, ["boolq"], data_dir=DATA / "arc", progress=False)
