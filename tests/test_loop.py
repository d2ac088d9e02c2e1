"""A whole pruning run on a tiny model: exact ratios, export, metrics, one-shot, resume
(kills in every phase: test_faults.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from loraprune_jax.cli import main
from loraprune_jax.config import RunConfig
from loraprune_jax.data.packing import tokenize_join, windows
from loraprune_jax.eval.perplexity import perplexity
from loraprune_jax.io import load_adapters, load_hf_dir
from loraprune_jax.run.prune import run_prune


def tiny_overrides(root: Path, out: Path, **extra) -> list[str]:
    opts = {
        "model": root / "model", "data": root / "train.txt", "eval_texts": f"[{root / 'eval.txt'}]",
        "out": out, "train.steps": 20, "train.seq_len": 32, "train.micro_batch_size": 2,
        "eval_seq_len": 32, "eval_max_windows": 6, "checkpoint_every": 5,
        "prune.prune_every": 4, "lora.rank": 2, "lora.dropout": 0.05,
    }
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]


def config_for(root: Path, out: Path, **extra) -> RunConfig:
    from loraprune_jax.config import build_run_config

    return build_run_config(None, tiny_overrides(root, out, **extra))


@pytest.mark.slow
def test_run_reaches_the_ratio_and_exports(tiny_run_inputs, tmp_path):
    root = tiny_run_inputs
    out = tmp_path / "run"
    m = run_prune(config_for(root, out), progress=False, log=lambda s: None)
    # 4 layers: layer 3 (the last) is excluded, int(0.1 * 4) = 0 first layers
    assert m["layers"]["excluded"] == [3]
    assert m["layers"]["attn_units_kept"] == [1, 1, 1, 2]  # floor(2 * 0.5) = 1 unit pruned
    assert m["layers"]["mlp_channels_kept"] == [16, 16, 16, 32]
    assert m["layers"]["heads"] == [3, 3, 3, 6]
    assert m["params_after"] < m["params_before"]
    assert len(m["history"]) == 20 and m["history"][-1]["target_ratio"] == 0.5
    # the exported model is the pruned model: its perplexity is the reported one
    cfg, base, tok = load_hf_dir(out / "model")
    assert cfg.layer_num_heads == (3, 3, 3, 6)
    ids = tokenize_join([(root / "eval.txt").read_text()], tok)
    every = windows(ids, 32)
    win = every[np.linspace(0, len(every) - 1, 6).round().astype(int)]  # evenly spaced
    res = perplexity(base, cfg, win.reshape(-1), 32, progress=False)
    spec = str(root / "eval.txt")
    assert res.ppl == pytest.approx(m["ppl_after"][spec], rel=1e-5)
    lora, masks, lora_cfg = load_adapters(out / "adapters")
    assert lora_cfg.rank == 2
    kept = np.asarray(masks["layers"]["attn"]).sum(axis=1).tolist()
    assert kept == [1, 1, 1, 2]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["ppl_after"] == m["ppl_after"]
    assert (out / "training.png").stat().st_size > 1000
    assert json.loads((out / "run_config.json").read_text())["train"]["steps"] == 20


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["wanda", "taylor"])
def test_one_shot_updates_masks_once(tiny_run_inputs, tmp_path, criterion):
    cfg = config_for(tiny_run_inputs, tmp_path / "one", **{
        "prune.one_shot": "true", "prune.calibration_steps": 3, "prune.criterion": criterion})
    m = run_prune(cfg, progress=False, log=lambda s: None)
    kept = [h["mlp_kept"] for h in m["history"]]
    assert kept[:2] == [1.0, 1.0] and len(set(kept[2:])) == 1 and kept[2] < 1.0
    assert m["layers"]["mlp_channels_kept"] == [16, 16, 16, 32]


@pytest.mark.slow
def test_global_allocation_keeps_the_total(tiny_run_inputs, tmp_path):
    cfg = config_for(tiny_run_inputs, tmp_path / "glob", **{"prune.allocation": "global",
                                                             "prune.criterion": "magnitude"})
    m = run_prune(cfg, progress=False, log=lambda s: None)
    assert sum(m["layers"]["mlp_channels_kept"][:3]) == 48  # 96 prunable channels, half kept
    assert min(m["layers"]["mlp_channels_kept"]) >= 1


@pytest.mark.parametrize("bad, message", [
    ({"prune.ratio": 1.0}, "ratio must be in [0, 1)"),
    ({"prune.criterion": "obs"}, "unknown criterion"),
    ({"prune.criterion": "fisher", "prune.granularity": "unstructured"}, "cannot rank single weights"),
    ({"model": "/nonexistent/model"}, "no such model"),
    ({"train.micro_batch_size": 4000}, "fewer than one batch"),
    ({"train.steps": "many"}, "expects int"),
    ({"mesh": "fsdp:-1"}, "micro_batch_size=2 is not a multiple of the 8 devices"),
    ({"mesh": "data:2,model:4"}, "AXIS one of data, fsdp, tensor"),
    ({"mesh": "data:2,tensor:2"}, "layer 0 keeps 1 KV heads, which the tensor axis (2) does not"),
    ({"mesh": "data:2,tensor:2", "prune.allocation": "global"}, "use prune.allocation=uniform"),
    ({"data_shards": 2}, "fewer than the 2 data shards"),
])
def test_bad_input_exits_2_and_leaves_nothing(tiny_run_inputs, tmp_path, capsys, bad, message):
    out = tmp_path / "bad"
    assert main(["prune", *tiny_overrides(tiny_run_inputs, out, **bad), "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # one line says what is wrong
    assert last.startswith("error: ") and message in last
    assert not out.exists()


def test_existing_output_directory_is_refused(tiny_run_inputs, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["prune", *tiny_overrides(tiny_run_inputs, out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]


@pytest.mark.slow
def test_run_on_a_mesh_equals_one_device(tiny_run_inputs, tmp_path):
    """Tensor parallel over KV groups (2 units, ratio 0 keeps both) and data parallel batches."""
    root = tiny_run_inputs
    extra = {"train.steps": 6, "prune.ratio": 0.0, "lora.dropout": 0.0}
    one = run_prune(config_for(root, tmp_path / "one", **extra), progress=False, log=lambda s: None)
    many = run_prune(config_for(root, tmp_path / "many", mesh="data:2,tensor:2", **extra),
                     progress=False, log=lambda s: None)
    assert many["mesh"] == "data:2,fsdp:1,tensor:2"
    np.testing.assert_allclose([h["loss"] for h in many["history"]],
                               [h["loss"] for h in one["history"]], rtol=1e-5)
    for spec, ppl in one["ppl_after"].items():
        assert many["ppl_after"][spec] == pytest.approx(ppl, rel=1e-5)


@pytest.mark.slow
def test_int8_base_run_on_a_mesh_equals_one_device_and_exports_what_it_reports(tiny_run_inputs,
                                                                               tmp_path):
    root = tiny_run_inputs
    extra = {"train.steps": 6, "prune.ratio": 0.5, "lora.dropout": 0.0, "base_dtype": "int8"}
    one = run_prune(config_for(root, tmp_path / "one", **extra), progress=False, log=lambda s: None)
    many = run_prune(config_for(root, tmp_path / "many", mesh="fsdp:2", **extra),
                     progress=False, log=lambda s: None)
    dense = run_prune(config_for(root, tmp_path / "dense", **{**extra, "base_dtype": "null"}),
                      progress=False, log=lambda s: None)
    assert one["base_dtype"] == "int8" and dense["base_dtype"] is None
    assert one["params_before"] == dense["params_before"]  # parameters, not scales
    np.testing.assert_allclose([h["loss"] for h in many["history"]],
                               [h["loss"] for h in one["history"]], rtol=1e-5)
    spec = str(root / "eval.txt")
    assert many["ppl_after"][spec] == pytest.approx(one["ppl_after"][spec], rel=1e-5)
    # 8 bits cost little: the dense perplexity moves by well under 1%
    assert one["ppl_before"][spec] == pytest.approx(dense["ppl_before"][spec], rel=1e-2)
    assert one["ppl_before"][spec] != dense["ppl_before"][spec]
    # the export holds the dequantized, sliced, merged weights whose perplexity was reported
    cfg, base, tok = load_hf_dir(tmp_path / "one" / "model")
    ids = tokenize_join([(root / "eval.txt").read_text()], tok)
    every = windows(ids, 32)
    win = every[np.linspace(0, len(every) - 1, 6).round().astype(int)]
    res = perplexity(base, cfg, win.reshape(-1), 32, progress=False)
    assert res.ppl == pytest.approx(one["ppl_after"][spec], rel=1e-5)


# ----------------------------------------------------------------------------- weight masks
@pytest.mark.slow
@pytest.mark.parametrize("granularity, extra, target", [
    ("unstructured", {"prune.ratio": 0.3, "prune.criterion": "lora"}, 0.3),
    ("nm", {"prune.criterion": "wanda"}, 0.5),
])
def test_weight_mask_run_exports_zeros_at_the_target(tiny_run_inputs, tmp_path, granularity,
                                                     extra, target):
    import shutil

    from loraprune_jax.io.export import load_export_masks

    root = tiny_run_inputs
    out = tmp_path / granularity
    cfg = config_for(root, out, **{"prune.granularity": granularity, **extra})
    m = run_prune(cfg, progress=False, log=lambda s: None)
    assert m["granularity"] == granularity and m["ratio"] == target
    assert m["layers"]["excluded"] == [3] and m["history"][-1]["target_ratio"] == target
    # the export keeps the model's shape; its zeros are exactly the masks' zeros
    mcfg, base, tok = load_hf_dir(out / "model")
    masks = load_export_masks(out / "model")
    assert mcfg.layer_num_heads is None and mcfg.num_heads == 6 and mcfg.intermediate_size == 32
    zeros, sizes = {}, {}
    for i in range(4):
        for name, mk in masks["layers"][i].items():
            w = np.asarray(base["layers"][i][name])
            assert mk.shape == w.shape and np.all(w[mk == 0] == 0)
            if i == 3:
                assert mk.all()
                continue
            k = mk.size - int(mk.sum())
            assert k == int(np.floor(mk.size * target + 1e-9)), (i, name)
            zeros[name], sizes[name] = zeros.get(name, 0) + k, sizes.get(name, 0) + mk.size
            if granularity == "nm":  # every block of 4 input rows of a column keeps 2
                rows, cols = mk.shape
                assert (mk.reshape(rows // 4, 4, cols).sum(axis=1) == 2).all()
    sp = m["sparsity"]
    for name in zeros:
        assert sp["pruned_layers"]["projections"][name] == pytest.approx(zeros[name] / sizes[name])
    assert sp["pruned_layers"]["sparsity"] == pytest.approx(sum(zeros.values()) / sum(sizes.values()))
    assert sp["pruned_layers"]["sparsity"] == pytest.approx(target, abs=1e-3)
    assert sp["zeros"] == sum(zeros.values()) and m["layers"]["sparsity"][3] == 0.0
    assert m["params_after"] == m["params_before"] - sp["zeros"]
    if granularity == "nm":
        assert sp["nm"] == "2:4" and sp["nm_blocks_fraction"] == 1.0
    kept = [h["mlp_kept"] for h in m["history"]]
    assert kept[0] == 1.0 and kept == sorted(kept, reverse=True) and kept[-1] < 1.0
    # the exported model is the evaluated one
    ids = tokenize_join([(root / "eval.txt").read_text()], tok)
    every = windows(ids, 32)
    win = every[np.linspace(0, len(every) - 1, 6).round().astype(int)]
    res = perplexity(base, mcfg, win.reshape(-1), 32, progress=False)
    assert res.ppl == pytest.approx(m["ppl_after"][str(root / "eval.txt")], rel=1e-5)
    lora, no_masks, _ = load_adapters(out / "adapters")
    assert no_masks is None and lora["layers"]["q"]["a"].shape[-1] == 2

    # resumed from the step-15 checkpoint, the run ends exactly as it did: masks, scores,
    # LoRA and the data position come back
    for name in ("metrics.json", "model", "adapters", "training.png"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(out / "checkpoints" / "20")
    assert main(["prune", "--resume", str(out), "--no-progress"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in m["history"]]
    assert again["sparsity"] == m["sparsity"] and again["ppl_after"] == m["ppl_after"]
    masks2 = load_export_masks(out / "model")
    for a, b in zip(masks["layers"], masks2["layers"]):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_nm_needs_input_dims_divisible_by_m(tiny_run_inputs, tmp_path, capsys):
    out = tmp_path / "bad"
    args = tiny_overrides(tiny_run_inputs, out, **{"prune.granularity": "nm", "prune.nm": "1:5"})
    assert main(["prune", *args, "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "layer 0 'q' has input dimension 48, not divisible by M=5" in last
    assert not out.exists()
