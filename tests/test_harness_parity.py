"""Our ``loraprune-jax`` harness model against the harness's own PyTorch ``hf`` model on the same
exported checkpoints (a pruned one with per-layer widths, loaded with its remote code, and a
uniform plain ``LlamaForCausalLM``): per-request log-likelihoods to 1e-3, identical accuracies."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import byte_tokenizer, noisy_norms, tiny_config
from loraprune_jax.eval.harness import NAME
from loraprune_jax.eval.harness_tasks import offline_tasks
from loraprune_jax.io.export import export_hf, needs_remote_code
from loraprune_jax.models.llama_params import init_base
from loraprune_jax.models.llama_pruning import init_masks, slice_and_merge
from test_harness import _task_dir

import lm_eval
from lm_eval.tasks import TaskManager

ZEROSHOT = Path(__file__).parent / "data" / "zeroshot"
OFFLINE = ["piqa", "boolq", "winogrande", "openbookqa"]


def _tokenizer():
    tok = byte_tokenizer()
    tok.add_special_tokens({"eos_token": "<|end|>"})  # id 256: the prefix token
    return tok


def _export(kind: str, path: Path) -> Path:
    """A tiny checkpoint exported as the user would: ``pruned`` has per-layer widths (layer 1
    without heads, layer 2 without MLP, layer 3 partial), ``uniform`` is plain LLaMA."""
    cfg = tiny_config("gqa", vocab_size=260, max_position_embeddings=128, num_layers=4)
    base = noisy_norms(init_base(cfg, 0, std=0.3))
    if kind == "pruned":
        masks = init_masks(cfg)
        masks["layers"][1]["attn"] = jnp.zeros_like(masks["layers"][1]["attn"])
        masks["layers"][2]["mlp"] = jnp.zeros_like(masks["layers"][2]["mlp"])
        masks["layers"][3]["attn"] = masks["layers"][3]["attn"].at[0].set(0.0)
        masks["layers"][3]["mlp"] = masks["layers"][3]["mlp"].at[jnp.array([0, 5, 9])].set(0.0)
        base, cfg = slice_and_merge(base, None, masks, cfg)
    assert needs_remote_code(cfg) == (kind == "pruned")
    return export_hf(path, cfg, base, _tokenizer())


def _evaluate(model: str, model_dir: Path, tasks: list[str], manager: TaskManager) -> dict:
    args = f"pretrained={model_dir},dtype=float32,batch_size=4"
    if model == "hf":
        args += ",trust_remote_code=True"
    return lm_eval.simple_evaluate(model=model, model_args=args, tasks=tasks, device="cpu",
                                   task_manager=manager, log_samples=True)


def _assert_same(ours: dict, theirs: dict, tasks: list[str]) -> int:
    """Per-request log-likelihoods to 1e-3 and identical acc / acc_norm; returns the count."""
    n = 0
    for task in tasks:
        a = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert [s["arguments"] for s in a] == [s["arguments"] for s in b], task
        for x, y in zip(a, b):
            got = np.array([r[0][0] for r in x["resps"]], np.float64)
            want = np.array([r[0][0] for r in y["resps"]], np.float64)
            np.testing.assert_allclose(got, want, atol=1e-3, rtol=0, err_msg=task)
            n += len(got)
        for metric in ("acc,none", "acc_norm,none"):
            assert ours["results"][task].get(metric) == theirs["results"][task].get(metric), task
    return n


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pruned", "uniform"])
def test_our_harness_model_scores_as_the_harness_hf_model(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir = _export(kind, tmp_path / kind)
    runs = {"tiny": (["tiny_choice"], TaskManager(include_path=str(_task_dir(tmp_path)))),
            "offline": (OFFLINE, offline_tasks(OFFLINE, ZEROSHOT, tmp_path / "tasks"))}
    for tasks, manager in runs.values():
        ours = _evaluate(NAME, model_dir, tasks, manager)
        theirs = _evaluate("hf", model_dir, tasks, manager)
        assert _assert_same(ours, theirs, tasks) >= 2 * len(tasks)
