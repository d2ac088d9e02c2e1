"""keep_freed_memory: freed large blocks are reused in-process (no fresh page faults)."""

import os
import platform
import subprocess
import sys

import pytest

# keep_freed_memory tunes glibc's malloc and is a no-op elsewhere (musl, macOS, Windows): there
# is nothing to measure on those platforms.
GLIBC_ONLY = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="keep_freed_memory only tunes glibc's malloc; this libc is not glibc")

# Each run is its own process: the malloc settings are process-wide and one-way.
SCRIPT = """
import resource, sys
import numpy as np
from loraprune_jax.train.hostmem import keep_freed_memory
accepted = keep_freed_memory() if sys.argv[1] == "keep" else None
a = np.ones(16 << 20, np.float32); del a  # 64 MiB, once to warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    a = np.ones(16 << 20, np.float32); del a
print(accepted, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(mode: str, **env: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         check=True, env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1])


@GLIBC_ONLY
def test_freed_blocks_are_reused_without_page_faults() -> None:
    accepted, kept = _run("keep")
    _, system = _run("system")
    assert accepted == "True"
    assert system >= 100  # glibc's defaults: each 64 MiB block is mapped afresh
    assert kept <= system // 20


@GLIBC_ONLY
def test_environment_variable_turns_it_off() -> None:
    accepted, faults = _run("keep", LORAPRUNE_JAX_SYSTEM_MALLOC="1")
    assert accepted == "False"
    assert faults >= 100
