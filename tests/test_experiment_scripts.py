"""The experiment scripts run end to end on a tiny model, so they cannot rot unnoticed."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import paper_table  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "zeroshot"


@pytest.mark.slow
def test_paper_table_on_a_tiny_model(tiny_run_inputs, tmp_path, capsys):
    root, out = tiny_run_inputs, tmp_path / "paper"
    argv = ["--ratios", "0.5", "--criteria", "lora", "random", "--out", str(out),
            "--ppl", f"eval={root / 'eval.txt'}", "--seq-len", "32", "--max-windows", "4",
            "--tasks", "arc_easy", "piqa", "--data-dir", str(DATA), "--limit", "2", "--plain-ppl-only",
            f"model={root / 'model'}", f"data={root / 'train.txt'}", f"eval_texts=[{root / 'eval.txt'}]",
            "train.steps=6", "train.seq_len=32", "train.micro_batch_size=2", "eval_seq_len=32",
            "eval_max_windows=4", "prune.prune_every=2", "lora.rank=2"]
    assert paper_table.main(argv) == 0
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [(r["ratio"], r["method"]) for r in rows] == [
        ("0.0", "dense"), ("0.5", "lora"), ("0.5", "lora w/o LoRA"),
        ("0.5", "random"), ("0.5", "random w/o LoRA")]
    for r in rows:
        assert float(r["ppl eval"]) > 1.0
        if "w/o" in r["method"]:  # --plain-ppl-only: zero-shot cells left empty
            assert r["arc_easy"] == r["average"] == ""
        else:
            accs = [float(r[t]) for t in ("arc_easy", "piqa")]
            assert all(0.0 <= a <= 1.0 for a in accs)
            assert np.isclose(float(r["average"]), np.mean(accs))
    md = (out / "table.md").read_text().splitlines()
    assert md[0] == "| ratio | method | ppl eval | arc_easy | piqa | average |"
    assert len(md) == 2 + len(rows) and "–" in md[4] and "–" not in md[3]
    assert (out / "ppl_vs_ratio.png").stat().st_size > 0
    # finished runs are reused: a second call prunes nothing and writes the same table
    capsys.readouterr()
    assert paper_table.main(argv) == 0
    assert "==" not in capsys.readouterr().err
    assert list(csv.DictReader(open(out / "table.csv"))) == rows


@pytest.mark.slow
def test_diagnosis_on_a_tiny_model(tiny_run_inputs, tmp_path, capsys):
    import json

    import diagnose_lora

    root, out = tiny_run_inputs, tmp_path / "diag"
    argv = ["--out", str(out), "--steps", "3", "--checkpoints", "0", "3", "--seeds", "0", "1",
            "--probes", "2", "--model", str(root / "model"), "--data", str(root / "train.txt"),
            "--probe-text", str(root / "eval.txt"), "--seq-len", "32"]
    assert diagnose_lora.main(argv) == 0
    res = json.loads((out / "diagnosis.json").read_text())
    assert res["layers"] == [0, 1, 2]  # the last of 4 layers is not pruned
    for seed in ("0", "1"):
        at0, at3 = res["seeds"][seed]["0"], res["seeds"][seed]["3"]
        assert all(v == 0.0 for v in at0["bbt_over_ata"].values())  # B starts at zero
        assert all(v > 0.0 for v in at3["bbt_over_ata"].values())  # and has trained
        assert all(-1.0 <= v <= 1.0 for v in at0["spearman_vs_vanilla"].values())
        assert at0["overlap_with_vanilla"]["lora attn 0.5"] is not None
    agree = res["seed_agreement"]["0"]["mlp 0.5"]
    assert 0.0 <= agree["seed_vs_seed"] <= 1.0 and len(agree["seed_vs_vanilla"]) == 2
    assert "| step |" in capsys.readouterr().out and (out / "diagnosis.png").stat().st_size > 0


@pytest.mark.slow
def test_faithful_regime_on_a_tiny_model(tiny_run_inputs, tmp_path, capsys):
    import json

    import faithful_regime

    root, out = tiny_run_inputs, tmp_path / "faithful"
    argv = ["--out", str(out), "--settings", "0.3:4:0.001", "--criteria", "fisher",
            "--ratios", "0.5", "--eval", str(root / "eval.txt"),
            f"model={root / 'model'}", f"data={root / 'train.txt'}", "train.seq_len=32",
            "train.micro_batch_size=2", "eval_seq_len=32", "eval_max_windows=2",
            "prune.prune_every=1", "lora.rank=2"]
    assert faithful_regime.main(argv) == 0
    rows = json.loads((out / "table.json").read_text())
    assert [(r["setting"], r["ratio"]) for r in rows] == [("w0.3-s4-lr0.001", 0.5)]
    assert rows[0]["fisher"] > 1.0
    cfg = json.loads((out / "w0.3-s4-lr0.001" / "fisher-0.5" / "run_config.json").read_text())
    assert (cfg["prune"]["warmup"], cfg["train"]["steps"], cfg["train"]["lr"]) == (0.3, 4, 0.001)
    assert capsys.readouterr().out.count("| 50% |") == 1
    # a run interrupted before its metrics were written is resumed, not refused
    (out / "w0.3-s4-lr0.001" / "fisher-0.5" / "metrics.json").unlink()
    assert faithful_regime.main(argv) == 0
    assert "resuming" in capsys.readouterr().err
    again = json.loads((out / "table.json").read_text())
    assert again[0]["fisher"] == pytest.approx(rows[0]["fisher"], rel=1e-6)


def test_faithful_settings_parse():
    import argparse

    import faithful_regime

    assert faithful_regime.parse_setting("0.3:100") == (0.3, 100, 1e-4)
    assert faithful_regime.parse_setting("0.5:400:1e-3") == (0.5, 400, 1e-3)
    assert faithful_regime.setting_name(0.5, 400, 1e-4) == "w0.5-s400"
    for bad in ("0.3", "a:100", "0.3:1.5", "0.1:2:3:4"):
        with pytest.raises(argparse.ArgumentTypeError):
            faithful_regime.parse_setting(bad)


@pytest.mark.slow
def test_bench_peer_on_a_tiny_model(tiny_run_inputs, capsys):
    """Both stacks train the same exported weights in their own processes: the first losses
    agree (B = 0, so the adapters add nothing), and the last line gives a ratio per shape."""
    sys.path.insert(0, str(EXPERIMENTS / "bench"))
    import bench_peer

    argv = ["--model", str(tiny_run_inputs / "model"), "--shapes", "1x16", "2x8", "--steps", "1"]
    assert bench_peer.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("ratio 1x16 ") and " 2x8 " in out[-1]
    rows = {(r[0].strip(), r[1].strip()): r[2:] for r in
            (line.split("|")[1:-1] for line in out if line.startswith(("| 1 x 16", "| 2 x 8")))}
    assert set(rows) == {(s, n) for s in ("1 x 16", "2 x 8") for n in ("ours", "PyTorch + PEFT")}
    for shape in ("1 x 16", "2 x 8"):
        (ours, lo, faults, system), (peer, lp, *_) = rows[shape, "ours"], rows[shape, "PyTorch + PEFT"]
        assert float(ours) > 0 and float(peer) > 0 and float(faults) >= 0 and float(system) >= 0
        assert float(lo) == pytest.approx(float(lp), abs=1e-4) and float(lo) > 1.0
    # one stack alone: no ratio line
    assert bench_peer.main([*argv[:3], "1x16", "--steps", "1", "--sides", "ours"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert not out[-1].startswith("ratio") and out[-1].startswith("| 1 x 16 | ours |")


def test_bench_peer_shapes_parse():
    import argparse

    sys.path.insert(0, str(EXPERIMENTS / "bench"))
    import bench_peer

    assert bench_peer.parse_shape("2x256") == (2, 256)
    for bad in ("2", "ax3", "0x128", "2x1"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_peer.parse_shape(bad)


@pytest.mark.slow
def test_profile_step_on_a_tiny_model(tiny_run_inputs, capsys):
    sys.path.insert(0, str(EXPERIMENTS / "bench"))
    import profile_step

    assert profile_step.main(["--model", str(tiny_run_inputs / "model"), "--shapes", "1x16", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    rows = {r[0].strip(): r[1:] for r in (line.split("|")[1:-1] for line in out.splitlines()
                                         if line.startswith("| ") and not line.startswith("| phase")
                                         and not line.startswith("| ---"))}
    assert set(rows) == {"step", "forward", "backward", "dropout (fwd + bwd)", "attention x 4 layers",
                         "lm head + loss", "importance (lora, to groups)", "clip + AdamW"}
    assert float(rows["step"][0]) > 0 and rows["step"][1].strip() == "100%"  # seconds, share
    assert rows["step"][5].strip() == "all" and rows["forward"][5].strip() == "in step"
    for cells in rows.values():
        float(cells[2])  # GFLOP, a number (tiny here)


# two groups of two jax.distributed processes on a 0.2 MB checkpoint: 13-22 s on two busy cores
@pytest.mark.slow
def test_sharded_load_memory_on_a_tiny_checkpoint(tmp_path):
    import sharded_load_memory as slm

    ckpt = tmp_path / "ckpt"
    size = slm.write_checkpoint(ckpt, hidden=64, layers=2, vocab=512, ffn=128, heads=4)
    res = slm.measure(ckpt, processes=2, devices=2, mesh_spec="fsdp:-1")
    assert res["checkpoint"] == size
    assert [r["process"] for r in res["eager"]] == [r["process"] for r in res["lazy"]] == [0, 1]
    for eager, lazy in zip(res["eager"], res["lazy"]):
        # both ways place the same values; each process holds half the model's bytes
        assert eager["checksum"] == lazy["checksum"]
        assert eager["local_shards"] == lazy["local_shards"]
        assert lazy["peak"] >= lazy["baseline"] > 0
    # the shards of the 4 devices: every tensor once, the norms (replicated) on each device
    tensor_bytes = size - sum(8 + json_header_len(p) for p in ckpt.glob("*.safetensors"))
    norm_bytes = (2 * 2 + 1) * 64 * 2
    assert sum(r["local_shards"] for r in res["lazy"]) == tensor_bytes + 3 * norm_bytes
    assert slm.table(res).count("\n") == 5


def json_header_len(path: Path) -> int:
    import struct

    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]
