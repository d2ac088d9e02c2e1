"""Real orbax round trips for the training-run checkpointer (no mocks of the format)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from absl import logging as absl_logging

from loraprune_jax.train.checkpoint import CheckpointMismatchError, RunCheckpointer

absl_logging.set_verbosity(absl_logging.ERROR)

N_LAYERS, D, R, HEADS, FF = 2, 6, 2, 3, 5


def _arr(step: int, salt: int, shape: tuple[int, ...]) -> np.ndarray:
    """Deterministic float32 data from (step, salt): identical in any process."""
    n = int(np.prod(shape))
    return (np.arange(n, dtype=np.float32) * 0.25 + step * 10.0 + salt * 0.125).reshape(shape)


def make_state(step: int) -> dict:
    """A realistic training state whose every value is a function of ``step``."""
    lora = {
        "layers": [
            {
                "q": {"a": jnp.asarray(_arr(step, 4 * i, (D, R))), "b": jnp.asarray(_arr(step, 4 * i + 1, (R, D)))},
                "v": {"a": jnp.asarray(_arr(step, 4 * i + 2, (D, R))), "b": jnp.asarray(_arr(step, 4 * i + 3, (R, D)))},
            }
            for i in range(N_LAYERS)
        ]
    }
    opt = optax.adamw(1e-3).init(lora)
    adam = opt[0]
    assert isinstance(adam, optax.ScaleByAdamState)
    opt = (
        adam._replace(
            count=jnp.asarray(step, jnp.int32),
            mu=jax.tree.map(lambda x: x * 0.5, lora),
            nu=jax.tree.map(lambda x: x * x, lora),
        ),
        *opt[1:],
    )
    masks = {
        "layers": [
            {"heads": jnp.asarray(np.arange(HEADS) % 2 == step % 2), "mlp": jnp.asarray(np.arange(FF) < step % FF)}
            for _ in range(N_LAYERS)
        ]
    }
    scores = {
        "layers": [
            {"heads": jnp.asarray(_arr(step, 100 + i, (HEADS,))), "mlp": jnp.asarray(_arr(step, 200 + i, (FF,)))}
            for i in range(N_LAYERS)
        ]
    }
    return {
        "lora": lora,
        "opt_state": opt,
        "masks": masks,
        "scores": scores,
        "rng": jax.random.key(step),  # typed key: orbax stores key data + impl
        "rng_data": jax.random.key_data(jax.random.key(step + 1000)),  # raw uint32 alternative
        "step": jnp.asarray(step, jnp.int32),
    }


def make_meta(step: int) -> dict:
    return {
        "config": {"lr": 1e-3, "ranks": [R, R], "name": "tiny", "prune": {"ratio": 0.5}},
        "step": step,
        "data_position": {"epoch": 0, "offset": 4 * step},
        "metrics": [{"step": i, "loss": 1.0 / (i + 1)} for i in range(step)],
    }


def assert_state_equal(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)

    def eq(g, w):
        if jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):
            assert g.dtype == w.dtype
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

    jax.tree.map(eq, got, want)


def tmp_dirs(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".orbax-checkpoint-tmp" in p.name)


# --------------------------------------------------------------------------------------


def test_empty_directory(tmp_path):
    with RunCheckpointer(tmp_path / "run") as ck:
        assert ck.latest_step() is None
        assert ck.all_steps() == []
        with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
            ck.restore(target=jax.eval_shape(lambda: make_state(0)))


def test_round_trip_concrete_target(tmp_path):
    d = tmp_path / "run"
    with RunCheckpointer(d) as ck:
        assert ck.save(3, make_state(3), make_meta(3))
        assert ck.latest_step() == 3
    with RunCheckpointer(d) as ck:  # a fresh process-like manager on the same directory
        state, meta = ck.restore(target=make_state(0))
        assert ck.restore_meta() == meta
    assert_state_equal(state, make_state(3))
    assert isinstance(state["opt_state"][0], optax.ScaleByAdamState)
    assert isinstance(state["lora"]["layers"], list)
    assert isinstance(state["lora"]["layers"][0]["q"]["a"], jax.Array)
    assert meta == json.loads(json.dumps(make_meta(3)))
    # The restored typed key draws the same numbers as the saved one.
    np.testing.assert_array_equal(
        jax.random.normal(state["rng"], (4,)), jax.random.normal(jax.random.key(3), (4,))
    )


def test_round_trip_abstract_target(tmp_path):
    d = tmp_path / "run"
    with RunCheckpointer(d) as ck:
        ck.save(5, make_state(5), make_meta(5))
    abstract = jax.eval_shape(lambda: make_state(0))
    assert isinstance(abstract["rng"], jax.ShapeDtypeStruct)
    with RunCheckpointer(d) as ck:
        state, meta = ck.restore(5, target=abstract)
    assert_state_equal(state, make_state(5))
    assert meta["step"] == 5


def test_abstract_target_with_sharding(tmp_path):
    d = tmp_path / "run"
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with RunCheckpointer(d) as ck:
        ck.save(1, make_state(1), make_meta(1))
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
            jax.eval_shape(lambda: make_state(0)),
        )
        state, _ = ck.restore(target=target)
    assert state["lora"]["layers"][1]["v"]["b"].sharding == sharding
    assert_state_equal(state, make_state(1))


def test_raw_restore_without_target(tmp_path):
    with RunCheckpointer(tmp_path / "run") as ck:
        ck.save(2, make_state(2), make_meta(2))
        state, meta = ck.restore()
    # Without a target orbax returns its own containers: NamedTuples as dicts in lists.
    np.testing.assert_array_equal(state["opt_state"][0]["count"], 2)
    np.testing.assert_array_equal(state["lora"]["layers"][0]["q"]["a"], _arr(2, 0, (D, R)))
    assert meta["data_position"]["offset"] == 8


def _drop_masks(t):
    t = dict(t)
    del t["masks"]
    return t


def _add_extra(t):
    return {**t, "extra": jax.ShapeDtypeStruct((3,), jnp.float32)}


def _wrong_shape(t):
    t["lora"]["layers"][1]["q"]["b"] = jax.ShapeDtypeStruct((R + 1, D), jnp.float32)
    return t


def _wrong_dtype(t):
    t["opt_state"][0].mu["layers"][0]["v"]["a"] = jax.ShapeDtypeStruct((D, R), jnp.bfloat16)
    return t


def _extra_layer(t):
    t["scores"]["layers"].append(t["scores"]["layers"][0])
    return t


def _key_as_raw(t):
    t["rng"] = jax.ShapeDtypeStruct((2,), jnp.uint32)  # stored a typed key, asked for raw data
    return t


@pytest.mark.parametrize(
    "edit, path, words",
    [
        (_drop_masks, "masks/layers/0/heads", "checkpoint has this leaf"),
        (_add_extra, "extra", "target has this leaf"),
        (_wrong_shape, "lora/layers/1/q/b", "shape (2, 6) in the checkpoint, (3, 6) in the target"),
        (_wrong_dtype, "opt_state/0/mu/layers/0/v/a", "dtype float32 in the checkpoint, bfloat16"),
        (_extra_layer, "scores/layers/2/heads", "target has this leaf"),
        (_key_as_raw, "rng", "restored () key<fry>, target (2,) uint32"),
    ],
)
def test_mismatched_target_names_the_path(tmp_path, edit, path, words):
    with RunCheckpointer(tmp_path / "run") as ck:
        ck.save(1, make_state(1), make_meta(1))
        target = edit(jax.eval_shape(lambda: make_state(0)))
        with pytest.raises(CheckpointMismatchError) as info:
            ck.restore(target=target)
    msg = str(info.value)
    assert f"'{path}'" in msg and words in msg, msg
    assert isinstance(info.value, ValueError)


def test_save_validates_before_writing(tmp_path):
    d = tmp_path / "run"
    with RunCheckpointer(d) as ck:
        with pytest.raises(TypeError, match="'step'"):
            ck.save(1, {"w": jnp.ones(2), "step": 7}, {})
        with pytest.raises(TypeError, match="JSON"):
            ck.save(1, {"w": jnp.ones(2)}, {"bad": object()})
        assert ck.all_steps() == []
    assert [p.name for p in d.iterdir() if p.name[0].isdigit()] == []


def test_max_to_keep_and_interval(tmp_path):
    d = tmp_path / "run"
    small = lambda s: {"w": jnp.full((3,), s, jnp.float32)}  # noqa: E731
    with RunCheckpointer(d, max_to_keep=2) as ck:
        for s in range(1, 6):
            assert ck.save(s, small(s), {"s": s})
        assert ck.all_steps() == [4, 5]
        assert ck.save(5, small(5), {}) is False  # not newer than the latest: skipped
    assert sorted(p.name for p in d.iterdir() if p.name.isdigit()) == ["4", "5"]
    with RunCheckpointer(d, max_to_keep=2) as ck:
        state, meta = ck.restore(4, target=small(0))
        np.testing.assert_array_equal(state["w"], [4, 4, 4])
        assert meta == {"s": 4}
        with pytest.raises(FileNotFoundError, match="no checkpoint step 2"):
            ck.restore(2, target=small(0))

    with RunCheckpointer(tmp_path / "every3", max_to_keep=None, save_interval_steps=3) as ck:
        saved = [s for s in range(1, 8) if ck.save(s, small(s), {})]
        assert saved == [1, 3, 6]  # orbax also saves the first step into an empty directory
        assert ck.save(7, small(7), {}, force=True)
        assert ck.all_steps() == [1, 3, 6, 7]


def test_async_save(tmp_path):
    d = tmp_path / "run"
    with RunCheckpointer(d, async_save=True) as ck:
        for s in (1, 2, 3):
            assert ck.save(s, make_state(s), make_meta(s))
        ck.wait()
        assert ck.all_steps() == [2, 3]
    with RunCheckpointer(d) as ck:
        state, meta = ck.restore(target=jax.eval_shape(lambda: make_state(0)))
    assert_state_equal(state, make_state(3))
    assert meta["step"] == 3


def test_leftover_tmp_directory_is_not_a_step(tmp_path):
    d = tmp_path / "run"
    with RunCheckpointer(d) as ck:
        ck.save(1, make_state(1), make_meta(1))
    # What an interrupted orbax save leaves behind: an uncommitted step directory.
    for name in ("2.orbax-checkpoint-tmp", "3.orbax-checkpoint-tmp-1700000000000000"):
        (d / name / "state").mkdir(parents=True)
        (d / name / "state" / "_METADATA").write_text("{truncated")
    with RunCheckpointer(d) as ck:
        assert ck.all_steps() == [1]
        assert ck.latest_step() == 1
        assert_state_equal(ck.restore(target=make_state(0))[0], make_state(1))
        assert ck.save(2, make_state(2), make_meta(2))
        assert ck.all_steps() == [1, 2]
    assert tmp_dirs(d) == []


def test_save_failing_midway_is_not_committed(tmp_path, monkeypatch):
    d = tmp_path / "run"
    with RunCheckpointer(d) as ck:
        ck.save(1, make_state(1), make_meta(1))

    async def boom(self, x, directory):
        raise RuntimeError("disk full while writing meta")

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", boom)
    ck = RunCheckpointer(d)
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="disk full"):
        ck.save(2, make_state(2), make_meta(2))
    monkeypatch.undo()
    # Gotcha: orbax raises as soon as one item fails while the other item's writer
    # threads keep writing into the tmp directory. Let them finish and close the
    # manager before another one (which deletes stale tmp directories) starts.
    for t in set(threading.enumerate()) - before:
        if not t.name.startswith("asyncio"):
            t.join(timeout=20)
    ck.close()
    assert tmp_dirs(d) and tmp_dirs(d)[0].startswith("2."), list(d.iterdir())
    assert sorted(p.name for p in d.iterdir() if p.name.isdigit()) == ["1"]
    with RunCheckpointer(d) as ck2:
        assert ck2.all_steps() == [1]
        assert ck2.save(2, make_state(2), make_meta(2))
        state, meta = ck2.restore(target=make_state(0))
    assert_state_equal(state, make_state(2))
    assert meta["step"] == 2


_CHILD = r"""
import os, sys, time
from absl import logging
logging.set_verbosity(logging.ERROR)
import orbax.checkpoint as ocp
from test_checkpoint import make_state, make_meta
from loraprune_jax.train.checkpoint import RunCheckpointer

directory, hang_at = sys.argv[1], int(sys.argv[2])
orig = ocp.handlers.JsonCheckpointHandler._save_fn

async def slow(self, x, d):
    if x.get("step") == hang_at:  # the state item is being written; stall the commit
        print("hanging", flush=True)
        time.sleep(60)
    return await orig(self, x, d)

ocp.handlers.JsonCheckpointHandler._save_fn = slow
ck = RunCheckpointer(directory, max_to_keep=2)
for step in range(1, 50):
    ck.save(step, make_state(step), make_meta(step))
    print("saved", step, flush=True)
    time.sleep(0.01)
"""


def test_sigkill_during_save_keeps_last_complete_step(tmp_path):
    d = tmp_path / "run"
    tests_dir = Path(__file__).resolve().parent
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(tests_dir), str(tests_dir.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(d), "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if line.startswith("hanging"):
                break
        assert lines[-3:] == ["saved 2", "saved 3", "hanging"], lines
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert tmp_dirs(d) and tmp_dirs(d)[0].startswith("4."), list(d.iterdir())  # killed mid-save
    with RunCheckpointer(d, max_to_keep=2) as ck:
        assert ck.all_steps() == [2, 3]
        assert ck.latest_step() == 3
        state, meta = ck.restore(target=jax.eval_shape(lambda: make_state(0)))
        assert_state_equal(state, make_state(3))
        assert meta == json.loads(json.dumps(make_meta(3)))
        # The run resumes: step 4 is written again and committed this time.
        assert ck.save(4, make_state(4), make_meta(4))
        assert ck.all_steps() == [3, 4]
        assert_state_equal(ck.restore(4, target=make_state(0))[0], make_state(4))
    assert tmp_dirs(d) == []


def test_restore_reshards_onto_another_mesh(tmp_path):
    """Saved from one mesh layout, restored onto the target's (different) shardings."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from loraprune_jax.parallel.mesh import make_mesh, replicated

    src, dst = make_mesh("fsdp:8"), make_mesh("data:2,tensor:4")
    w = np.arange(16 * 24, dtype=np.float32).reshape(16, 24)
    tree = {"w": jax.device_put(w, NamedSharding(src, P("fsdp", None))),
            "v": jax.device_put(np.arange(5.0, dtype=np.float32), replicated(src))}
    with RunCheckpointer(tmp_path / "ck") as ck:
        ck.save(1, tree, {"note": "sharded"})
    want = {"w": NamedSharding(dst, P(None, "tensor")), "v": replicated(dst)}
    target = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=want[k]) for k, x in tree.items()}
    with RunCheckpointer(tmp_path / "ck") as ck:
        got, meta = ck.restore(1, target)
        assert meta == {"note": "sharded"}
        bad = dict(target, w=jax.ShapeDtypeStruct((16, 12), np.float32, sharding=want["w"]))
        with pytest.raises(CheckpointMismatchError, match="'w'.*shape"):
            ck.restore(1, bad)
    for k in tree:
        assert got[k].sharding == want[k]
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(tree[k]))
    assert got["w"].addressable_shards[0].data.shape == (16, 6)
