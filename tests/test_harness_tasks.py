"""The harness's own task definitions on local files: every task of tests/data/zeroshot builds
the prompts the harness builds from its Hugging Face copy (our documents are in that schema),
and runs offline with our model, scoring each request as a brute-force forward pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lm_eval import simple_evaluate

from conftest import (
    ZEROSHOT_DATA as DATA,
    byte_tokenizer,
    harness_requests,
    noisy_norms,
    reference_lls,
    tiny_config,
)
from loraprune_jax.data.tasks import TASK_NAMES
from loraprune_jax.eval.harness import LoraPruneJaxLM
from loraprune_jax.eval.harness_tasks import HARNESS_TASKS, harness_yaml, offline_tasks, task_yaml
from loraprune_jax.eval.loglikelihood import encode_requests
from loraprune_jax.models.llama_params import init_base


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    """Every fixture document of the seven tasks as the harness turns it into requests."""
    return harness_requests(list(TASK_NAMES), DATA, tmp_path_factory.mktemp("requests"))


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


# --------------------------------------------------------------- prompts, from the release files
def test_arc_prompts_numeric_labels_and_odd_choice_counts(requests):
    docs = requests["arc_easy"]
    ctx = "Question: Which object is the best conductor of heat?\nAnswer:"
    assert docs[0] == ([(ctx, " a wooden spoon"), (ctx, " a copper pot"), (ctx, " a paper cup"),
                        (ctx, " a plastic plate")], 1)
    assert docs[1][1] == 1  # labels "1"-"4" in the release, answerKey "2"
    assert len(docs[2][0]) == 3
    ch = requests["arc_challenge"]
    assert (len(ch[0][0]), ch[0][1]) == (5, 2)
    assert ch[1][1] == 0  # answerKey "1" of 3 choices


def test_openbookqa_stem_only_and_answer_key_with_space(requests):
    reqs, gold = requests["openbookqa"][1]
    assert reqs[0] == ("When it is cold outside, people often wear", " shorts")
    assert gold == 2  # answerKey " C" in the release


def test_boolq_prompt_joins_title_and_passage(requests):
    reqs, gold = requests["boolq"][1]
    ctx = ("Penguin -- Penguins are a group of aquatic flightless birds. They live almost "
           "exclusively in the Southern Hemisphere.\nQuestion: can penguins fly?\nAnswer:")
    assert reqs == [(ctx, " no"), (ctx, " yes")] and gold == 0


def test_piqa_prompt_and_labels_from_their_own_file(requests):
    reqs, gold = requests["piqa"][1]
    assert reqs[1] == ("Question: How do I cool a hot drink quickly?\nAnswer:",
                       " Add a few ice cubes and stir.")
    assert gold == 1


def test_winogrande_partial_scoring(requests):
    reqs, gold = requests["winogrande"][0]
    cont = " was too big."
    assert reqs == [("The trophy did not fit in the suitcase because the trophy", cont),
                    ("The trophy did not fit in the suitcase because the suitcase", cont)]
    assert gold == 0
    reqs, gold = requests["winogrande"][1]
    assert gold == 1
    assert reqs[1] == ("Anna gave Maria a gift because Maria", " was celebrating her birthday.")


def test_hellaswag_preprocessing(requests):
    reqs, gold = requests["hellaswag"][0]
    assert reqs[2] == ("Making a sandwich: A man takes two slices of bread out of a bag. He",
                       " spreads butter on one slice with a knife.")
    assert gold == 2
    reqs, _ = requests["hellaswag"][1]
    assert reqs[0][0] == ("Home and Garden: How to water a plant. Check the soil. "
                          "Stick your finger about an inch into the soil.")
    # the harness strips before dropping tags, so an ending with a leading tag keeps a leading
    # space after the delimiter
    assert reqs[0][1] == "  If it feels dry, the plant needs water."


# --------------------------------------------------------------- scores, end to end
@pytest.mark.slow
def test_offline_harness_tasks_score_as_a_brute_force_forward(lm, requests, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = list(TASK_NAMES)
    manager = offline_tasks(tasks, DATA, tmp_path / "tasks")
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True)
    for task in tasks:
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        assert len(samples) == len(requests[task]), task
        accs = []
        for s, (reqs, gold) in zip(samples, requests[task]):
            assert [tuple(a) for a in s["arguments"]] == reqs, task
            want = reference_lls(lm.base, lm.config, encode_requests(lm.tokenizer, reqs))
            got = [r[0][0] for r in s["resps"]]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=task)
            accs.append(float(np.argmax(want) == gold))
        assert out["results"][task]["acc,none"] == pytest.approx(np.mean(accs)), task


def test_missing_files_fail_before_the_harness_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="boolq/dev.jsonl"):
        offline_tasks(["boolq"], DATA / "arc", tmp_path / "tasks")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        offline_tasks(["nope"], DATA, tmp_path / "tasks")
