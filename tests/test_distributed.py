"""Two local processes (jax.distributed over a local coordinator, 2 CPU devices each) run the
same CLI prune as one process on a 4-device mesh: each reads only its data shard, both write one
orbax checkpoint together, restore it against the mesh's shardings, and the results agree."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loraprune_jax.io import load_adapters
from loraprune_jax.parallel import distributed
from loraprune_jax.run.prune import run_prune
from test_loop import config_for

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def train_dir(tiny_run_inputs):
    """Training text as 8 documents, so two data shards get four each."""
    text = (tiny_run_inputs / "train.txt").read_text()
    d = tiny_run_inputs / "train_docs"
    d.mkdir(exist_ok=True)
    n = len(text) // 8
    for i in range(8):
        (d / f"doc{i}.txt").write_text(text[i * n:(i + 1) * n])
    return d


def _extra(train_dir: Path) -> dict[str, object]:
    return {"data": train_dir, "train.micro_batch_size": 4, "train.steps": 8,
            "checkpoint_every": 4, "prune.prune_every": 2, "lora.dropout": 0.0}


def _launch(args: list[str], tmp_path: Path, timeout: float = 600) -> list[str]:
    """Run ``loraprune-jax`` ARGS as two processes; return their stderr logs."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ)
        env.update({
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(pid),
        })
        log = open(tmp_path / f"proc{pid}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "loraprune_jax.cli", *args],
            env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = [p.wait(timeout=timeout) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = [(tmp_path / f"proc{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n\n".join(logs)[-6000:]
    return logs


def test_not_initialized_in_a_plain_process():
    assert not distributed.is_initialized()
    assert distributed.is_primary()
    distributed.barrier("nothing to wait for")  # one process: returns at once


def test_two_processes_agree_with_one(tiny_run_inputs, train_dir, tmp_path):
    root = tiny_run_inputs
    # One process, four of the simulated devices, the two data shards read here.
    ref_cfg = config_for(root, tmp_path / "one", mesh="fsdp:4", data_shards=2, **_extra(train_dir))
    ref = run_prune(ref_cfg, progress=False, log=lambda s: None)

    out = tmp_path / "two"
    from test_loop import tiny_overrides

    args = ["prune", *tiny_overrides(root, out, mesh="fsdp:-1", **_extra(train_dir)),
            "--no-progress", "--distributed"]
    logs = _launch(args, tmp_path)
    assert "process 0: data shards [0] of 2" in logs[0]
    assert "process 1: data shards [1] of 2" in logs[1]
    assert "pruned" in logs[0] and "pruned" not in logs[1]  # one process reports
    got = json.loads((out / "metrics.json").read_text())
    assert got["processes"] == 2 and got["mesh"] == "data:1,fsdp:4,tensor:1"
    np.testing.assert_allclose([h["loss"] for h in got["history"]],
                               [h["loss"] for h in ref["history"]], rtol=1e-5)
    for spec, ppl in ref["ppl_after"].items():
        assert got["ppl_after"][spec] == pytest.approx(ppl, rel=1e-5)
        assert got["ppl_before"][spec] == pytest.approx(ref["ppl_before"][spec], rel=1e-6)
    assert got["layers"] == ref["layers"]
    lora2, masks2, _ = load_adapters(out / "adapters")
    lora1, masks1, _ = load_adapters(tmp_path / "one" / "adapters")
    for a, b in zip(_leaves(masks2), _leaves(masks1)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(lora2), _leaves(lora1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 8]

    # Both processes restore the last checkpoint together onto the mesh and finish again.
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "model")
    logs = _launch(["prune", "--resume", str(out), "--no-progress", "--distributed"], tmp_path)
    assert f"resumed {out} at step 8" in logs[0]
    again = json.loads((out / "metrics.json").read_text())
    assert again["ppl_after"] == got["ppl_after"]
    assert again["history"] == got["history"]


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]
