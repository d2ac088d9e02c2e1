"""``--mesh`` and ``--distributed`` for the evaluation commands (``eval``, ``zeroshot``,
``generate``): the mesh from its spec, checked against the model's widths before the weights are
read (``eval.loading.load_for_eval`` then loads and places the model as ``prune`` places it), and
the notes of the load line."""

from __future__ import annotations

import argparse
from typing import Any

MESH_HELP = ("device mesh, as prune's mesh= key: e.g. fsdp:-1, data:2,fsdp:-1,tensor:2 or auto "
             "(FSDP over every device); the model is sharded over it and the batches split, with "
             "the same numbers as one device (default: one device; with several processes, auto)")
DISTRIBUTED_HELP = ("one of several processes (TPU pod workers, GPU hosts): connect them with "
                    "jax.distributed.initialize() first (automatic when JAX_COORDINATOR_ADDRESS "
                    "is set)")


BASE_DTYPE_HELP = ("int8: hold the seven projections of the frozen weights in 8 bits, one scale "
                   "per output channel, dequantized where each is used (default: --dtype)")


def add_mesh_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--mesh SPEC``, ``--distributed`` (``cli.main`` initializes the processes) and
    ``--base-dtype`` (how the frozen weights are held)."""
    from ..config import BASE_DTYPES

    parser.add_argument("--mesh", default=None, metavar="SPEC", help=MESH_HELP)
    parser.add_argument("--distributed", action="store_true", help=DISTRIBUTED_HELP)
    parser.add_argument("--base-dtype", choices=BASE_DTYPES, default=None, help=BASE_DTYPE_HELP)


def mesh_from_args(args: argparse.Namespace, config: Any, batch: int | None = None) -> Any:
    """The ``Mesh`` that ``args.mesh`` names (``auto``: FSDP over as many devices as ``batch``
    rows split over evenly, all when ``batch`` is None), or None for one device. A bad spec, or
    a mesh that does not divide the widths of ``config`` (the model's, read without its weights:
    ``checks.peek``), raises ``ShardingError`` (one line, exit 2) before any weight is read."""
    import jax

    from ..parallel.mesh import auto_mesh_spec, make_mesh

    spec = getattr(args, "mesh", None)
    if spec is None and jax.process_count() > 1:
        spec = "auto"  # every process must take part
    if spec is None:
        return None
    if spec.strip() == "auto":
        spec = auto_mesh_spec(batch or jax.device_count())
    mesh = make_mesh(spec)
    from ..models.llama_params import check_widths

    check_widths(config, mesh)
    return mesh


def base_note(args: argparse.Namespace) -> str:
    """``, projections int8`` for the load line ('' when the base keeps the compute dtype)."""
    base_dtype = getattr(args, "base_dtype", None)
    return f", projections {base_dtype}" if base_dtype else ""


def mesh_note(mesh: Any) -> str:
    """`` on mesh data:1,fsdp:8,tensor:1`` for the load line ('' for one device)."""
    if mesh is None:
        return ""
    from ..parallel.mesh import describe

    return f" on mesh {describe(mesh)}"


def is_primary() -> bool:
    """Whether this process writes the files (process 0 of a multi-process run)."""
    from ..parallel.distributed import is_primary as primary

    return primary()


__all__ = ["add_mesh_args", "base_note", "is_primary", "mesh_from_args", "mesh_note"]
