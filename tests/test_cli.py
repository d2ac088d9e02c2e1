"""The command line: eval on a tiny HF checkpoint with its own tokenizer, JSON output, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import byte_tokenizer, tiny_config
from loraprune_jax.cli import main
from loraprune_jax.data.packing import tokenize_join
from loraprune_jax.eval.perplexity import perplexity
from loraprune_jax.io import load_hf_dir, save_hf_dir
from loraprune_jax.models.llama_params import init_base

TEXT = "The quick brown fox jumps over the lazy dog. " * 20


@pytest.fixture
def model_dir(tmp_path):
    cfg = tiny_config("gqa", vocab_size=256)
    path = tmp_path / "model"
    save_hf_dir(path, cfg, init_base(cfg, 0, std=0.2), byte_tokenizer())
    return path


def test_eval_writes_json_matching_the_library(model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "res" / "ppl.json"
    rc = main(["eval", "--model", str(model_dir), "--text", str(text), "--seq-len", "32",
               "--max-windows", "5", "--json", str(out), "--no-progress"])
    assert rc == 0
    got = json.loads(out.read_text())
    assert set(got) == {"ppl", "tokens"} and got["tokens"] == 5 * 32
    cfg, base, tok = load_hf_dir(model_dir)
    ids = tokenize_join(TEXT, tok)
    assert len(ids) == len(TEXT.encode())  # one token per byte
    want = perplexity(base, cfg, ids, 32, max_windows=5, progress=False)
    assert got["ppl"] == pytest.approx(want.ppl, rel=1e-6)
    assert f"ppl={want.ppl:.4f}" in capsys.readouterr().out


def test_eval_several_lengths_writes_nested_json(model_dir, tmp_path):
    text = tmp_path / "t.jsonl"
    text.write_text("\n".join(json.dumps({"text": TEXT[:300]}) for _ in range(2)))
    out = tmp_path / "ppl.json"
    assert main(["eval", "--model", str(model_dir), "--text", str(text), "--seq-len", "16", "64",
                 "--json", str(out), "--no-progress"]) == 0
    got = json.loads(out.read_text())[str(text)]
    assert set(got) == {"16", "64"}
    assert got["16"]["tokens"] == (602 // 16) * 16  # two docs joined with "\n\n"
    assert np.isfinite(got["64"]["ppl"])


def test_bad_inputs_exit_with_a_message(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse's own exit, one line
        main(["eval", "--model", "x", "--seq-len", "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--seq-len" in err and ">= 2" in err


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_the_run_resumes(tiny_run_inputs, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_loop import tiny_overrides

    out = tmp_path / "run"
    # the CLI as `python -m loraprune_jax.cli` runs it, with Python's own Ctrl-C handler: a
    # shell's background job (CI) starts with SIGINT ignored, which Python would keep
    entry = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "from loraprune_jax.cli import main; sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", entry, "prune", "--no-progress",
           *tiny_overrides(tiny_run_inputs, out, **{"train.steps": 20})]
    proc = subprocess.Popen(cmd, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while not (out / "checkpoints" / "5").is_dir():  # in the middle of training
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"interrupted: continue with: loraprune-jax prune --resume {out}"
    assert not (out / "metrics.json").exists()
    assert main(["prune", "--resume", str(out), "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 20


def test_eval_reads_any_utf8_file_and_refuses_a_binary_one(model_dir, tmp_path, capsys):
    from loraprune_jax.data.corpora import WIKI_FILE, gensim_test_data_dir

    cor = f"{gensim_test_data_dir()}/miIslita.cor"  # gensim's corpus format: plain text, 169 bytes
    out = tmp_path / "ppl.json"
    assert main(["eval", "--model", str(model_dir), "--text", cor, "--seq-len", "16",
                 "--json", str(out), "--no-progress"]) == 0
    got = json.loads(out.read_text())
    assert got["tokens"] == (169 // 16) * 16  # one token per byte, the remainder dropped
    cfg, base, tok = load_hf_dir(model_dir)
    with open(cor, encoding="utf-8") as f:
        ids = tokenize_join([f.read()], tok)
    assert got["ppl"] == pytest.approx(perplexity(base, cfg, ids, 16, progress=False).ppl, rel=1e-6)
    capsys.readouterr()
    binary = f"{gensim_test_data_dir()}/{WIKI_FILE}"
    assert main(["eval", "--model", str(model_dir), "--text", binary, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # one line, before the model loads (no "model ... loaded" line)
    assert len(err) == 1 and err[0].startswith(f"error: {binary}: not valid UTF-8 (")


@pytest.mark.parametrize("command, extra", [
    ("eval", []), ("zeroshot", ["--tasks", "boolq"]), ("generate", ["--prompt", "x"]),
])
def test_evaluation_commands_take_mesh_and_distributed(command, extra):
    from loraprune_jax.cli import build_parser

    args = build_parser().parse_args([command, "--model", "m", *extra])
    assert args.mesh is None and not args.distributed  # one device by default
    args = build_parser().parse_args([command, "--model", "m", *extra, "--mesh", "data:2,fsdp:-1",
                                      "--distributed"])
    assert args.mesh == "data:2,fsdp:-1" and args.distributed


def test_eval_mesh_auto_splits_the_batch_and_keeps_the_perplexity(model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "ppl.json"
    assert main(["eval", "--model", str(model_dir), "--text", str(text), "--seq-len", "32",
                 "--max-windows", "6", "--batch-size", "4", "--mesh", "auto", "--json", str(out),
                 "--no-progress"]) == 0
    assert "on mesh data:1,fsdp:4,tensor:1" in capsys.readouterr().err  # gcd(8 devices, 4)
    cfg, base, tok = load_hf_dir(model_dir)
    want = perplexity(base, cfg, tokenize_join(TEXT, tok), 32, max_windows=6, progress=False)
    assert json.loads(out.read_text())["ppl"] == pytest.approx(want.ppl, rel=1e-5)


@pytest.mark.slow
def test_demo_prunes_the_bundled_model(smollm2_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORAPRUNE_JAX_CACHE", str(smollm2_cache))  # the session's conversion
    out = tmp_path / "run"
    assert main(["demo", "train.steps=6", "prune.prune_every=2", "eval_max_windows=2",
                 f"out={out}", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    # 30 layers: 0-2 and 29 excluded; elsewhere 1 of 3 KV groups (3 query heads) and half the FFN go
    assert m["layers"]["excluded"] == [0, 1, 2, 29]
    assert m["layers"]["heads"] == [9, 9, 9] + [6] * 26 + [9]
    assert m["layers"]["kv_heads"] == [3, 3, 3] + [2] * 26 + [3]
    assert m["layers"]["ffn"] == [1536] * 3 + [768] * 26 + [1536]
    assert m["params_before"] == 134_515_008
    d, hd = 576, 64
    removed = 26 * (2 * d * 3 * hd + 2 * d * hd + 3 * d * 768)  # q+o of 3 heads, k+v of 1, 768 channels
    assert m["params_before"] - m["params_after"] == removed
    for spec in ("wiki:heldout", "lee"):
        assert 2.0 < m["ppl_before"][spec] < 200.0
    summary = capsys.readouterr().out
    assert "parameters: 134.5M -> 92.3M" in summary


def test_run_config_from_yaml_then_overrides(tmp_path):
    from loraprune_jax.config import build_run_config

    path = tmp_path / "run.yaml"
    path.write_text("prune:\n  ratio: 0.2\n  criterion: wanda\ntrain.steps: 7\nlora: {rank: 4, targets: [q, v]}\n")
    cfg = build_run_config(str(path), ["prune.ratio=0.3", "out=x"])
    assert (cfg.prune.ratio, cfg.prune.criterion, cfg.train.steps) == (0.3, "wanda", 7)
    assert cfg.lora.rank == 4 and cfg.lora.targets == ("q", "v") and cfg.out == "x"
    auto = build_run_config(None, ["prune.criterion=random"])
    assert auto.out.startswith("runs/smollm2-random-0.5-")
    with pytest.raises(ValueError, match="key=value"):
        build_run_config(None, ["prune.ratio"])
    with pytest.raises(ValueError, match="unknown config key"):
        build_run_config(None, ["prune.rate=0.1"])


def test_nm_patterns_stay_strings_on_the_command_line_and_in_yaml(tmp_path):
    from loraprune_jax.config import build_run_config, parse_overrides

    # YAML 1.1 reads 2:4 as the base-60 integer 124; the CLI keeps it text
    assert parse_overrides(["prune.nm=2:4", "a=10", "b=0.5", "c=[q, v]"]) == {
        "prune.nm": "2:4", "a": 10, "b": 0.5, "c": ["q", "v"]}
    path = tmp_path / "run.yaml"
    path.write_text("prune:\n  granularity: nm\n  nm: 1:4\n")
    cfg = build_run_config(str(path), [])
    assert cfg.prune.nm == "1:4" and cfg.prune.ratio == 0.75
    assert cfg.out.startswith("runs/smollm2-lora-nm1-4-")
    cfg = build_run_config(None, ["prune.granularity=unstructured", "prune.ratio=0.3"])
    assert cfg.out.startswith("runs/smollm2-lora-unstructured-0.3-")
    with pytest.raises(ValueError, match="prune.ratio=0.3"):
        build_run_config(None, ["prune.granularity=nm", "prune.ratio=0.3"])


def test_prune_dispatches_image_classifiers(tmp_path, capsys):
    """``model=vit-s`` / ``model=cifar10-cnn`` build a ClassifierConfig (defaults kept under
    overrides); a classifier run refuses --resume and classifier-incompatible keys."""
    from loraprune_jax.config import build_run_config
    from loraprune_jax.config import ClassifierConfig

    cfg = build_run_config(None, ["model=vit-s", "prune.ratio=0.2", "train.steps=7"])
    assert isinstance(cfg, ClassifierConfig)
    assert (cfg.prune.ratio, cfg.prune.prune_every, cfg.train.steps, cfg.train.lr) == (0.2, 5, 7, 1e-3)
    assert cfg.out.startswith("runs/vit-s-lora-0.2-")
    cnn = build_run_config(None, ["model=cifar10-cnn", "prune.criterion=magnitude", "out=y"])
    assert (cnn.model, cnn.prune.criterion, cnn.out) == ("cifar10-cnn", "magnitude", "y")
    with pytest.raises(ValueError, match="unknown config key"):
        build_run_config(None, ["model=vit-s", "lora.rank=4"])  # the classifier's key is lora_rank
    assert main(["prune", "model=vit-s", "prune.criterion=wanda", "out=" + str(tmp_path / "w")]) == 2
    assert "not available" in capsys.readouterr().err
    run = tmp_path / "r"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps(cfg.override({"out": str(run)}).to_dict()))
    assert main(["prune", "--resume", str(run)]) == 2
    assert "cannot resume" in capsys.readouterr().err
