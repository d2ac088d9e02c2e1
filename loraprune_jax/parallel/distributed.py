"""Multi-process set-up: one process per host (TPU pod workers, GPU hosts, local CPU tests).

Every process runs the same program on its own devices; :func:`initialize` connects them through
``jax.distributed`` so that ``jax.devices()`` lists the devices of all processes and a mesh spans
them. On Cloud TPU pods and SLURM the coordinator is found automatically; elsewhere set
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
"""

from __future__ import annotations

import os

import jax


def wants_distributed() -> bool:
    """Whether the environment names a coordinator (so :func:`initialize` should run)."""
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> tuple[int, int]:
    """Connect this process to the others with ``jax.distributed.initialize`` (arguments, then
    the ``JAX_*`` environment variables, then cluster auto-detection) and return
    ``(process_index, process_count)``. Calling it again is a no-op."""
    if not is_initialized():
        env = os.environ
        num = num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES")
        pid = process_id if process_id is not None else env.get("JAX_PROCESS_ID")
        jax.distributed.initialize(
            coordinator_address=coordinator_address or env.get("JAX_COORDINATOR_ADDRESS"),
            num_processes=None if num is None else int(num),
            process_id=None if pid is None else int(pid),
        )
    return jax.process_index(), jax.process_count()


def is_initialized() -> bool:
    """Whether ``jax.distributed`` is connected in this process."""
    from jax._src import distributed as _dist  # the public API has no query for this

    return _dist.global_state.client is not None


def is_primary() -> bool:
    """Process 0 writes the files that exist once (config, exports, metrics)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (nothing to do with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
