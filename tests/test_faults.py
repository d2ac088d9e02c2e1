"""Faults in ``loraprune-jax prune``: SIGKILL in every phase, a disk that fills up, a corrupt
``run_config.json``, non-finite losses.

Each kill runs the real CLI in a subprocess through ``tests/kill_child.py``, which SIGKILLs it at
a chosen training step, file-system operation (taken from the trace of an uninterrupted run, some
of them at random with a fixed seed), function call or random moment after a log line. The next
process continues the run (``--resume``; a fresh start when the kill came before the run
directory existed) and may itself be killed at the next point; every chain ends with an
uninterrupted resume. After each kill nothing may look complete that is not (no metrics.json; a
model/, adapters/, training.png or run_config.json present is the reference's); at the end the
masks, weights and metrics (timings aside) must be the uninterrupted reference run's, bit for bit,
with nothing left behind. 30 kill points in three chains; ``-rP`` prints the tally of each.
A persistent compilation cache shared by the children keeps each run to a few seconds.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

TESTS = Path(__file__).resolve().parent
CHILD = TESTS / "kill_child.py"
TIMINGS = ("train_seconds_this_session", "run_seconds_this_session")
OUTPUTS = ("model", "adapters")


def cli_args(root: Path, out: Path) -> list[str]:
    """The tiny run of tests/test_loop.py (20 steps, a checkpoint every 5) as ``prune`` args."""
    from test_loop import tiny_overrides

    return ["prune", *tiny_overrides(root, out), "--no-progress"]


class Reference:
    """The uninterrupted run every faulted one must reproduce, and how to launch children."""

    def __init__(self, root: Path, work: Path) -> None:
        self.root, self.work = root, work
        cache = work / "jax-cache"
        path = os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
        self.env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "PYTHONPATH": path}
        self.out, trace = work / "ref", work / "ref.trace"
        proc = self.launch("never", self.out, trace=trace)
        assert proc.returncode == 0, proc.stderr[-3000:]
        self.trace = trace.read_text().split("\n")[:-1]
        self.metrics = json.loads((self.out / "metrics.json").read_text())
        self.config = json.loads((self.out / "run_config.json").read_text())

    def launch(self, when: str, out: Path, trace: Path | None = None) -> Any:
        """Run ``prune`` (``--resume`` when ``out`` holds a run_config.json) killed at ``when``."""
        args = (["prune", "--resume", str(out), "--no-progress"]
                if (out / "run_config.json").exists() else cli_args(self.root, out))
        cmd = [sys.executable, str(CHILD), when, str(trace or "-"), *args]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=300)

    def keys(self, path: str, *, exact: bool = False) -> list[str]:
        """Traced operations on ``path`` (``exact``) or on paths starting with it."""
        return [k for k in self.trace
                if (k.split(" ", 1)[1].rsplit("#", 1)[0] == path if exact
                    else k.split(" ", 1)[1].startswith(path))]


@pytest.fixture(scope="module")
def reference(tiny_run_inputs, tmp_path_factory) -> Reference:
    return Reference(tiny_run_inputs, tmp_path_factory.mktemp("faults"))


def same_files(a: Path, b: Path) -> list[str]:
    """Where directory or file ``a`` differs from ``b`` (names and bytes)."""
    if a.is_file():
        return [] if a.read_bytes() == b.read_bytes() else [f"{a.name} differs from the reference"]
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return [f"{a.name}/ holds {names}"]
    return [f"{a.name}/{n} differs" for n in names if (a / n).read_bytes() != (b / n).read_bytes()]


def after_kill(out: Path, ref: Reference) -> list[str]:
    """What a killed run may not leave: anything complete-looking that is not the final output."""
    problems = [f"{out.name}/metrics.json exists"] if (out / "metrics.json").exists() else []
    for name in (*OUTPUTS, "training.png"):
        if (out / name).exists():
            problems += same_files(out / name, ref.out / name)
    if (out / "run_config.json").exists():
        saved = json.loads((out / "run_config.json").read_text())
        if {**saved, "out": ""} != {**ref.config, "out": ""}:
            problems.append("run_config.json differs")
    return problems


def without_timings(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in metrics.items() if k not in TIMINGS}
    out["eval"] = {k: ({s: {**r, "tokens_per_second": None} for s, r in v.items()}
                       if isinstance(v, dict) else v) for k, v in metrics["eval"].items()}
    return out


def bit_identical(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def final_problems(out: Path, ref: Reference) -> list[str]:
    """Where a finished run differs from the reference: masks, weights, metrics, leftovers."""
    if not (out / "metrics.json").exists():
        return ["no metrics.json at the end"]
    problems = []
    for part, name in (("adapters", "masks"), ("adapters", "lora"), ("model", "model")):
        got, want = (load_file(d / part / f"{name}.safetensors") for d in (out, ref.out))
        if sorted(got) != sorted(want) or not all(bit_identical(got[k], want[k]) for k in want):
            problems.append(f"{part}/{name}.safetensors is not bit-identical")
    for name in (*OUTPUTS, "training.png"):
        problems += same_files(out / name, ref.out / name)
    metrics = json.loads((out / "metrics.json").read_text())
    if without_timings(metrics) != without_timings(ref.metrics):
        problems.append("metrics.json differs beyond timings")
    for d, want in ((out, ref.out), (out / "checkpoints", ref.out / "checkpoints")):
        names, ref_names = sorted(os.listdir(d)), sorted(os.listdir(want))
        if names != ref_names:
            problems.append(f"{d.name}/ holds {names}, the reference {ref_names}")
    stray = sorted(p.name for p in out.parent.glob(f".{out.name}.*"))
    return problems + ([f"left beside the run: {stray}"] if stray else [])


def run_chain(ref: Reference, out: Path, points: list[tuple[str, str]]) -> None:
    """Kill one process per point, each continuing the run the last one left; then finish it.
    Prints a line per point and a tally; asserts that every kill was survived."""
    lines, tried, survivors, failed = [], 0, 0, False
    for label, when in points:
        if (out / "metrics.json").exists():  # a random moment came after the end
            lines.append(f"{label} [{when}]: skipped, the run is complete")
            continue
        proc = ref.launch(when, out)
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        if proc.returncode == -signal.SIGKILL:
            problems = after_kill(out, ref)
            tried, survivors = tried + 1, survivors + (not problems)
            state = "killed"
        elif proc.returncode == 0:  # fine for a random moment that came too late
            problems, state = ([] if when.startswith("timer:") else ["never reached"]), "completed"
        else:
            problems, state = [f"exit {proc.returncode}: {last}"], "failed"
        failed |= bool(problems)
        lines.append(f"{label} [{when}]: {'; '.join([state, *problems])}")
    if not (out / "metrics.json").exists():
        proc = ref.launch("never", out)
        if proc.returncode:
            failed = True
            lines.append(f"final resume: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    end = final_problems(out, ref)
    lines.append("end: " + ("; ".join(end) or "masks, weights and metrics of the reference"))
    summary = f"{out.name}: {tried} kill points tried, {0 if end else survivors} survived"
    print("\n".join([summary, *lines]))
    assert not failed and not end, "\n".join([summary, *lines])


@pytest.mark.slow
def test_kills_during_training_resume_to_the_reference(reference, tmp_path):
    """Creating the run directory, before the first checkpoint, between checkpoints, while one
    is written or committed, while old ones are deleted."""
    ref, rng = reference, random.Random(17)
    create = ref.trace[:ref.trace.index(ref.keys("RUN/checkpoints")[0])]
    ckpt = {s: ref.keys(f"RUN/checkpoints/{s}.") for s in (5, 10, 15, 20)}
    points = [
        ("creating the run directory", f"fs:{rng.choice(create[:-1])}"),
        ("committing the run directory", f"fs:{create[-1]}"),
        ("before the first checkpoint", "step:3"),
        ("writing checkpoint 5", f"fs:{rng.choice(ckpt[5][1:-1])}"),
        ("committing checkpoint 5", f"fs:{ckpt[5][-1]}"),
        ("between checkpoints 5 and 10", f"step:{rng.randint(6, 9)}"),
        ("writing checkpoint 10", f"fs:{rng.choice(ckpt[10][1:-1])}"),
        ("between checkpoints 10 and 15", f"step:{rng.randint(11, 14)}"),
        ("writing checkpoint 15", f"fs:{rng.choice(ckpt[15][1:])}"),
        ("deleting checkpoint 5", f"fs:{rng.choice(ref.keys('RUN/checkpoints/5', exact=True))}"),
        ("writing checkpoint 20", f"fs:{rng.choice(ckpt[20][1:])}"),
        ("deleting checkpoint 10", f"fs:{rng.choice(ref.keys('RUN/checkpoints/10', exact=True))}"),
    ]
    run_chain(ref, tmp_path / "training", points)


@pytest.mark.slow
def test_kills_after_training_resume_to_the_reference(reference, tmp_path):
    """Slicing and merging, the evaluation after, the export of model/ and adapters/ (the second
    time over an earlier model/), training.png and metrics.json."""
    ref, rng = reference, random.Random(18)
    model = ref.keys("RUN/.model.tmp-*")
    adapters = ref.keys("RUN/.adapters.tmp-*")
    points = [
        ("slicing and merging", "call:slice_and_merge:1"),
        ("placing the pruned model", "call:shard_base:2"),
        ("evaluating the pruned model", "call:perplexity:1"),
        ("writing model/", f"fs:{rng.choice(model[:-1])}"),
        ("committing model/", f"fs:{model[-1]}"),
        ("writing adapters/", f"fs:{rng.choice(adapters[:-1])}"),
        ("replacing the model/ of an earlier try", f"fs:{model[-1]}"),
        ("removing the leftovers of that try", "fs:shutil.rmtree RUN/.model.tmp-*#1"),
        ("committing adapters/", f"fs:{adapters[-1]}"),
        ("drawing training.png", "fs:open RUN/training.png.tmp.png#1"),
        ("committing training.png", "fs:os.rename RUN/training.png.tmp.png#1"),
        ("writing metrics.json", "fs:open RUN/metrics.json.tmp#1"),
        ("committing metrics.json", "fs:os.rename RUN/metrics.json.tmp#1"),
    ]
    run_chain(ref, tmp_path / "export", points)


@pytest.mark.slow
def test_kills_at_random_moments_resume_to_the_reference(reference, tmp_path):
    """SIGKILL at random moments (seeded) after the model is loaded, after slicing, after the
    export: wherever they land, the run resumes to the reference."""
    rng, points = random.Random(19), []
    for text, span in (("loaded", 2.5), ("loaded", 2.5), ("loaded", 2.5),
                       ("sliced and merged", 0.3), ("exported", 0.3)):
        delay = rng.uniform(0, span)
        points.append((f"{delay:.2f}s after '{text}'", f"timer:{text}:{delay:.3f}"))
    run_chain(reference, tmp_path / "random", points)


def tmpfs_refused(where: Path) -> str | None:
    """Why a tmpfs cannot be mounted on ``where`` in a user namespace here (None: it can)."""
    if shutil.which("unshare") is None:
        return "no unshare(1) to mount a small tmpfs in a user namespace"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"',
                           str(where)], capture_output=True, text=True)
    return proc.returncode and f"cannot mount a tmpfs (unshare -rm): {proc.stderr.strip()}"


@pytest.mark.slow
def test_a_full_disk_ends_the_run_with_one_line_and_it_resumes(reference, tmp_path):
    """On an 8 MiB tmpfs, a file beside the run fills the disk to 40 KiB as the second checkpoint
    begins, and (its space freed) again as the export begins: each ends the run with one line
    and exit status 2; with the space freed the run resumes to the reference."""
    mnt, logs = tmp_path / "disk", tmp_path / "logs"
    mnt.mkdir(), logs.mkdir()
    why = tmpfs_refused(mnt)
    if why:
        pytest.skip(why)
    run, q = mnt / "run", shlex.quote
    resume = f"prune --resume {q(str(run))} --no-progress"
    fresh = shlex.join(cli_args(reference.root, run))
    tries = [("checkpoint", "fill:RunCheckpointer.save:2:40", fresh),
             ("export", "fill:export_hf:1:40", resume), ("resume", "never", resume)]
    script = [f"mount -t tmpfs -o size=8m tmpfs {q(str(mnt))} || exit 1"]
    for name, when, args in tries:
        script += [f"{q(sys.executable)} {q(str(CHILD))} {when} - {args} 2> {logs}/{name}.err",
                   f"echo $? > {logs}/{name}.rc; ls -A {q(str(run))} > {logs}/{name}.ls",
                   f"rm -f {q(str(mnt / 'ballast'))}"]
    script.append(f"cp -a {q(str(run))} {logs}/run")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", "\n".join(script)], env=reference.env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for name, path in (("checkpoint", run / "checkpoints"), ("export", run / "model")):
        err = (logs / f"{name}.err").read_text()
        lines = err.strip().splitlines()
        assert (logs / f"{name}.rc").read_text().strip() == "2", err[-3000:]
        assert "Traceback" not in err and "ERROR" not in err, err[-3000:]
        assert [line for line in lines if "space" in line] == lines[-1:], err[-3000:]
        assert lines[-1].startswith(f"error: {path}: no space left on device while "), lines[-1]
        assert lines[-1].endswith(f"then continue with: loraprune-jax prune --resume {run}")
        # nothing half-written is left in place; the export's temporary directory is gone
        assert (logs / f"{name}.ls").read_text().split() == ["checkpoints", "run_config.json"]
    assert f"resumed {run} at step 5" in (logs / "export.err").read_text()
    assert (logs / "resume.rc").read_text().strip() == "0", (logs / "resume.err").read_text()
    assert final_problems(logs / "run", reference) == []


@pytest.mark.parametrize("text, message", [
    ('{"model": "m", "train": {"steps": 2', "not valid JSON (Expecting"),
    ('["model", "m"]', "expected a JSON object of config keys, got a list"),
    ('{"model": "m", "no_such_key": 1}', "not a language-model run config: unknown config key(s) "
                                          "'no_such_key'"),
    ('{"train": {"steps": [1]}}', "not a language-model run config: train.steps expects int"),
])
def test_a_corrupt_run_config_is_named_on_resume(tmp_path, text, message):
    from loraprune_jax.config import RunConfig
    from loraprune_jax.io import CheckpointError
    from loraprune_jax.run.prune import run_prune

    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text(text)
    with pytest.raises(CheckpointError) as err:
        run_prune(RunConfig(out=str(out)), resume=True, progress=False, log=lambda s: None)
    assert str(err.value).startswith(f"{out / 'run_config.json'}: {message}")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text", [
    '{"model": "m", "no_such_key": 1}',
    '{"model": "m"',
    "[1, 2]",
])
def test_the_cli_names_a_corrupt_run_config_in_one_line(tmp_path, capsys, text):
    from loraprune_jax.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text(text)
    assert main(["prune", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out / 'run_config.json'}: ")


def test_a_non_finite_loss_is_logged_with_its_step_and_training_goes_on():
    """The loop reports a NaN or infinite loss and skipped importance scores with their step
    (the step itself leaves non-finite scores out of the moving average: test_step.py)."""
    import math

    from conftest import tiny_config

    from loraprune_jax.config import RunConfig
    from loraprune_jax.train.loop import init_run_masks, train_loop

    cfg = RunConfig().override({"train.steps": 4, "log_every": 1})
    losses = {1: 2.0, 2: math.nan, 3: math.inf, 4: 1.5}

    def step_fn(state, base, masks, batch, key):
        step = state["step"] + 1
        skipped = not math.isfinite(losses[step])
        return {"step": step}, {"loss": losses[step], "grad_norm": 0.0, "score_skipped": skipped}

    class NoUpdates:
        is_update_step, ratio_at = staticmethod(lambda step: False), staticmethod(lambda step: 0.0)

    class NoCheckpoints:
        def save(self, *args, **kwargs) -> None:
            pass

        def wait(self) -> None:
            pass

    logs: list[str] = []
    result = train_loop(step_fn, {"step": 0}, init_run_masks(cfg, tiny_config(), False), None,
                        ((i, None) for i in range(9)), None, cfg=cfg, schedule=NoUpdates(),
                        excluded=(), ckpt=NoCheckpoints(), progress=False, log=logs.append)
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    assert [h["loss"] for h in result.history][2:] == [math.inf, 1.5]
    assert math.isnan(result.history[1]["loss"])
    noted = [line for line in logs if "non-finite" in line]
    assert noted == ["step 2: non-finite loss nan; adapters and optimizer not updated",
                     "step 2: non-finite importance scores; moving average not updated",
                     "step 3: non-finite loss inf; adapters and optimizer not updated",
                     "step 3: non-finite importance scores; moving average not updated"]


def test_a_full_disk_is_recognised_and_said_in_one_line(tmp_path):
    """ENOSPC as tensorstore and safetensors word it, anywhere in the chain of causes."""
    import errno
    import pickle

    from loraprune_jax.train.diskfull import DiskFullError, no_space_left

    ts = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x\": Failed to write 9 bytes "
                    "to file 17: No space left on device [os_error_code='28']")
    st = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        chained = e
    assert all(no_space_left(e) for e in (ts, st, chained))
    assert not no_space_left(ValueError("os error 280")) and not no_space_left(OSError(2, "x"))
    err = DiskFullError(tmp_path / "model", "exporting", "free some space")
    want = f"{tmp_path / 'model'}: no space left on device while exporting; free some space"
    assert str(err) == want
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_a_new_checkpointer_finishes_the_deletions_a_killed_save_left(tmp_path):
    import jax.numpy as jnp

    from loraprune_jax.train.checkpoint import RunCheckpointer

    with RunCheckpointer(tmp_path / "c", max_to_keep=None) as ck:
        for step in (5, 10, 15):
            ck.save(step, {"w": jnp.full(3, float(step))}, {"step": step})
    with RunCheckpointer(tmp_path / "c", max_to_keep=2) as ck:
        assert ck.all_steps() == [10, 15]
    assert sorted(os.listdir(tmp_path / "c")) == ["10", "15"]
