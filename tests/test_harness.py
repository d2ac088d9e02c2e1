"""Our JAX model inside lm-evaluation-harness: a local task through ``simple_evaluate`` gives our
direct log-likelihoods; rolling log-likelihoods and greedy generation equal our own."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import byte_tokenizer, noisy_norms, tiny_config
from loraprune_jax.eval.loglikelihood import loglikelihoods, prefix_token_id, tok_encode
from loraprune_jax.models.llama import token_nll
from loraprune_jax.models.llama_params import init_base

import lm_eval
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from loraprune_jax.eval.harness import NAME, LoraPruneJaxLM

DOCS = Path(__file__).parent / "data" / "harness" / "tiny_choice.jsonl"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from loraprune_jax.io import save_hf_dir

    cfg = tiny_config("gqa", vocab_size=260, max_position_embeddings=64)
    tok = byte_tokenizer()
    tok.add_special_tokens({"eos_token": "<|end|>"})  # id 256: the harness's prefix token
    path = tmp_path_factory.mktemp("harness") / "model"
    save_hf_dir(path, cfg, noisy_norms(init_base(cfg, 0, std=0.3)), tok)
    return path


def _task_dir(tmp_path: Path) -> Path:
    """The task's YAML pointing at the local documents by absolute path (no network)."""
    (tmp_path / "tiny_choice.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {DOCS}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return tmp_path


@pytest.mark.slow
def test_simple_evaluate_by_name_scores_as_our_direct_loglikelihoods(tiny_dir, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = lm_eval.simple_evaluate(model=NAME, model_args=f"pretrained={tiny_dir},batch_size=4",
                                  tasks=["tiny_choice"],
                                  task_manager=TaskManager(include_path=str(_task_dir(tmp_path))),
                                  log_samples=True)
    samples = out["samples"]["tiny_choice"]
    assert len(samples) == 3
    lm = LoraPruneJaxLM(pretrained=str(tiny_dir))
    correct = 0
    for sample in samples:
        pairs = [tuple(a) for a in sample["arguments"]]  # (context, continuation) per choice
        want = loglikelihoods(lm.base, lm.config, lm.tokenizer, pairs)
        got = [tuple(r[0]) for r in sample["resps"]]
        np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-6)
        assert [bool(g[1]) for g in got] == [w[1] for w in want]
        correct += int(np.argmax([w[0] for w in want]) == sample["target"])
    assert out["results"]["tiny_choice"]["acc,none"] == pytest.approx(correct / 3)


def test_rolling_loglikelihood_covers_every_token_once(tiny_dir):
    lm = LoraPruneJaxLM(pretrained=str(tiny_dir), max_length=16)
    texts = ["short text", "a longer text that needs several windows of sixteen tokens each"]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                    for i, t in enumerate(texts)])
    # the reference: one window per 16 predicted tokens, as the harness cuts them
    prefix = prefix_token_id(lm.tokenizer)
    for text, value in zip(texts, got):
        ids = [prefix] + tok_encode(lm.tokenizer, text, add_special_tokens=False)
        total, start = 0.0, 1
        while start < len(ids):
            end = min(start + 16, len(ids))
            lo = max(0, end - 17)  # as much context as fits in 16 inputs
            window = jnp.asarray([ids[lo:end]])
            nll = np.asarray(token_nll(lm.base, None, None, window, lm.config))[0]
            total -= float(nll[start - lo - 1:].sum())
            start = end
        assert value == pytest.approx(total, rel=1e-5)
    assert len(tok_encode(lm.tokenizer, texts[1], add_special_tokens=False)) > 32


def test_generate_until_is_our_greedy_generation_cut_at_the_stop_string(tiny_dir):
    from loraprune_jax.eval.generate import generate_text

    lm = LoraPruneJaxLM(pretrained=str(tiny_dir))
    prompts = ["Hello", "The quick brown"]
    reqs = [Instance("generate_until", {}, (p, {"until": ["zz"], "max_gen_toks": 6}), i)
            for i, p in enumerate(prompts)]
    got = lm.generate_until(reqs)
    ours = generate_text((lm.config, lm.base, lm.tokenizer), prompts, max_new_tokens=6)
    assert got == [text.split("zz")[0] for text in ours]
    assert json.dumps(got)  # plain strings


@pytest.mark.slow
def test_the_harness_command_line_runs_our_model(tiny_dir, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "loraprune_jax.eval.harness", "run", "--model", NAME,
         "--model_args", f"pretrained={tiny_dir}", "--tasks", "tiny_choice",
         "--include_path", str(_task_dir(tmp_path))],
        capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "tiny_choice" in res.stdout and "acc" in res.stdout
