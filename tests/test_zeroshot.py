"""``loraprune-jax zeroshot``: the harness on local files through the command line, and the
bundled SmolLM2 scored through it as PyTorch scores the same requests."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ZEROSHOT_DATA as DATA
from loraprune_jax.cli.zeroshot import add_parser, cmd_zeroshot
from loraprune_jax.eval.harness_eval import harness_zeroshot
from loraprune_jax.eval.loglikelihood import encode_requests


def test_cli_subcommand(tiny_run_inputs, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="loraprune-jax")
    add_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "zs.json"
    args = parser.parse_args([
        "zeroshot", "--model", str(tiny_run_inputs / "model"), "--tasks", "boolq", "winogrande",
        "piqa", "--data-dir", str(DATA), "--limit", "2", "--json", str(out), "--no-progress",
        "--batch-size", "4",
    ])
    assert args.func is cmd_zeroshot
    assert cmd_zeroshot(args) == 0
    payload = json.loads(out.read_text())
    assert set(payload["results"]) == {"boolq", "winogrande", "piqa"}
    assert payload["results"]["piqa"]["docs"] == 2 and "acc_norm" in payload["results"]["piqa"]
    assert payload["mean_acc"] == pytest.approx(
        np.mean([r["acc"] for r in payload["results"].values()]))
    printed = capsys.readouterr()
    assert "winogrande" in printed.out and "mean acc" in printed.out
    # --no-progress: no bars or notices from the harness or datasets either
    assert "%|" not in printed.err and "Generating" not in printed.err, printed.err
    assert "[Task:" not in printed.err, printed.err
    bad = parser.parse_args(["zeroshot", "--model", str(tiny_run_inputs / "model"),
                             "--tasks", "hellaswag", "--data-dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="hellaswag_val.jsonl"):
        cmd_zeroshot(bad)
    with pytest.raises(SystemExit):
        parser.parse_args(["zeroshot", "--model", "x", "--tasks", "mmlu"])


# ----------------------------------------------------------------------------- the real model
ARC_ITEMS = [
    ("What gas do plants take in from the air to make food?",
     ["oxygen", "carbon dioxide", "nitrogen", "helium"], 1),
    ("Which of these is a source of light?", ["a mirror", "the Sun", "the Moon at noon", "a rock"], 1),
    ("What is the boiling point of water at sea level?",
     ["0 degrees Celsius", "50 degrees Celsius", "100 degrees Celsius", "200 degrees Celsius"], 2),
    ("Which organ pumps blood through the body?", ["the lungs", "the stomach", "the heart"], 2),
    ("Which planet is closest to the Sun?", ["Mercury", "Venus", "Earth", "Mars", "Jupiter"], 0),
]


def arc_data_dir(root: Path) -> Path:
    """The hand-written items as an ARC-Easy release file."""
    path = root / "arc" / "ARC-Easy" / "ARC-Easy-Test.jsonl"
    path.parent.mkdir(parents=True)
    with open(path, "w") as f:
        for i, (q, c, g) in enumerate(ARC_ITEMS):
            choices = [{"text": t, "label": "ABCDE"[k]} for k, t in enumerate(c)]
            f.write(json.dumps({"id": f"hand-{i}", "question": {"stem": q, "choices": choices},
                                "answerKey": "ABCDE"[g]}) + "\n")
    return root


@pytest.mark.slow
def test_smollm2_arc_items_reproducible_and_match_pytorch(smollm2, torch_smollm2, tmp_path,
                                                          monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    config, base, tokenizer = smollm2
    data = arc_data_dir(tmp_path)
    res = harness_zeroshot(base, config, tokenizer, ["arc_easy"], data_dir=data, progress=False,
                           keep_samples=True)["arc_easy"]
    again = harness_zeroshot(base, config, tokenizer, ["arc_easy"], data_dir=data, batch_size=1,
                             progress=False, keep_samples=True)["arc_easy"]
    lls = np.array([x for s in res.samples for x in s["lls"]])
    assert np.all(np.isfinite(lls)) and np.all(lls < 0)
    np.testing.assert_allclose([x for s in again.samples for x in s["lls"]], lls, rtol=1e-5, atol=1e-4)
    assert (res.acc, res.acc_norm) == (again.acc, again.acc_norm)
    assert res.acc >= 0.6  # easy hand-written science questions; SmolLM2-135M gets most right

    import torch

    ref = torch_smollm2
    requests = [(f"Question: {q}\nAnswer:", " " + c) for q, choices, _ in ARC_ITEMS for c in choices]
    want = []
    with torch.no_grad():
        for ctx, cont in encode_requests(tokenizer, requests):
            ids = torch.tensor([ctx + cont], dtype=torch.long)
            logp = torch.log_softmax(ref(ids).logits[0].double(), dim=-1)
            pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
            want.append(float(logp[pos, torch.tensor(cont)].sum()))
    np.testing.assert_allclose(lls, want, rtol=1e-4, atol=2e-3)
