"""Run the ``loraprune-jax`` CLI in this process and SIGKILL it at a chosen moment.

    python kill_child.py WHEN TRACE prune key=value ...

The launcher of tests/test_faults.py: it patches the run from outside, so the package carries no
test hooks. WHEN is one of

* ``never``: run to the end;
* ``step:N``: when the data iterator hands out the batch after step N (steps 1..N done);
* ``fs:KEY``: just before the file-system operation KEY (see TRACE) of this process: an open
  for writing, mkdir, rename, remove or rmtree in the run directory or a ``.NAME.*`` sibling of
  it (Python's audit events, so orbax's directory commits, the export's temporary directories
  and the JSON files count; tensorstore's and safetensors' own writes, in native code, do not);
* ``call:NAME:N``: on entering the N-th call of ``loraprune_jax.run.prune.NAME`` (``NAME`` may
  be ``Class.method``);
* ``timer:TEXT:SECONDS``: SECONDS after the run first logs a line containing TEXT;
* ``fill:NAME:N:KIB``: no kill; on entering the N-th call of NAME, a file ``ballast`` beside the
  run directory fills its file system until KIB KiB are left (a disk that fills up meanwhile).

TRACE is a file that gets one KEY per line for every such operation, or ``-``. A KEY is
``event path#n``: the path relative to the run directory's parent with the run directory named
``RUN`` and random ``tmp-``/``old-`` suffixes as ``*``, and ``n`` counting the same operation on
the same path in this process.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from collections import Counter
from typing import Any, Callable

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_EVENTS = {"open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate",
           "shutil.rmtree", "shutil.move", "shutil.copyfile", "os.symlink"}
_RANDOM = re.compile(r"(tmp|old)-[0-9a-f]{8}")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def run_dir(args: list[str]) -> str:
    """The run directory of a ``prune`` command line."""
    if "--resume" in args:
        return os.path.abspath(args[args.index("--resume") + 1])
    return os.path.abspath(next(a[4:] for a in args if a.startswith("out=")))


def watch_files(run: str, kill_at: str | None, trace: Any) -> None:
    """Name the file-system operations on ``run`` (and its ``.NAME.*`` siblings); write them to
    ``trace`` and die before the one named ``kill_at``."""
    parent, name = os.path.split(run)
    seen: Counter[str] = Counter()

    def writes(event: str, args: tuple) -> bool:
        if event != "open":
            return True
        mode, flags = args[1], args[2] or 0
        return bool(mode and set(mode) & set("wax+")) or bool(flags & _WRITE_FLAGS)

    def hook(event: str, args: tuple) -> None:
        if event not in _EVENTS or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        rel = os.path.relpath(os.path.abspath(os.fsdecode(args[0])), parent).split(os.sep)
        if not (rel[0] == name or rel[0].startswith(f".{name}.")) or not writes(event, args):
            return
        rel[0] = "RUN" if rel[0] == name else ".RUN." + rel[0][len(name) + 2:]
        path = _RANDOM.sub(r"\1-*", "/".join(rel))
        seen[f"{event} {path}"] += 1
        key = f"{event} {path}#{seen[f'{event} {path}']}"
        if trace is not None:
            trace.write(key + "\n")
            trace.flush()
        if key == kill_at:
            die()

    sys.addaudithook(hook)


def kill_at_step(n: int) -> None:
    from loraprune_jax.data import sharded

    iterate = sharded.ShardedData.iterate

    def patched(self: Any, start_step: int) -> Any:
        for step, batch in iterate(self, start_step):
            if step == n:
                die()
            yield step, batch

    sharded.ShardedData.iterate = patched


def on_call(name: str, n: int, action: Callable[[], None]) -> None:
    """Run ``action`` on entering the ``n``-th call of ``loraprune_jax.run.prune.<name>``."""
    import loraprune_jax.run.prune as rp

    owner: Any = rp
    *outer, attr = name.split(".")
    for part in outer:
        owner = getattr(owner, part)
    func: Callable[..., Any] = getattr(owner, attr)
    calls = 0

    def patched(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == n:
            action()
        return func(*args, **kwargs)

    setattr(owner, attr, patched)


def fill_disk(run: str, free_kib: int) -> None:
    """Write ``ballast`` beside ``run`` until its file system has ``free_kib`` KiB left."""
    parent = os.path.dirname(run)
    st = os.statvfs(parent)
    size = st.f_bavail * st.f_frsize - free_kib * 1024
    with open(os.path.join(parent, "ballast"), "ab") as f:
        f.write(b"\0" * max(size, 0))


class _Timer:
    """stderr that starts a SIGKILL timer when a line containing ``text`` is written."""

    def __init__(self, stream: Any, text: str, seconds: float) -> None:
        self.stream, self.text, self.seconds, self.started = stream, text, seconds, False

    def write(self, s: str) -> int:
        n = self.stream.write(s)
        if not self.started and self.text in s:
            self.started = True
            self.stream.flush()
            threading.Timer(self.seconds, die).start()
        return n

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.stream, attr)


def main() -> int:
    when, trace_path, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    kind, _, spec = when.partition(":")
    trace = None if trace_path == "-" else open(trace_path, "a")  # noqa: SIM115 - lives on
    if kind == "step":
        kill_at_step(int(spec))
    elif kind == "call":
        name, _, n = spec.rpartition(":")
        on_call(name, int(n), die)
    elif kind == "fill":
        name, n, free = spec.split(":")
        on_call(name, int(n), lambda: fill_disk(run_dir(args), int(free)))
    elif kind == "timer":
        text, _, seconds = spec.rpartition(":")
        sys.stderr = _Timer(sys.stderr, text, float(seconds))
    elif kind not in ("never", "fs"):
        raise SystemExit(f"unknown WHEN {when!r}")
    if trace is not None or kind == "fs":
        watch_files(run_dir(args), spec if kind == "fs" else None, trace)
    from loraprune_jax.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
