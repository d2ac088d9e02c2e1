"""``--mesh`` and ``--distributed`` for the evaluation commands (``eval``, ``zeroshot``,
``generate``): the mesh from its spec, checked against the model's widths before the weights are
read where the checkpoint allows, and the model loaded and placed on it as ``prune`` places it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

MESH_HELP = ("device mesh, as prune's mesh= key: e.g. fsdp:-1, data:2,fsdp:-1,tensor:2 or auto "
             "(FSDP over every device); the model is sharded over it and the batches split, with "
             "the same numbers as one device (default: one device; with several processes, auto)")
DISTRIBUTED_HELP = ("one of several processes (TPU pod workers, GPU hosts): connect them with "
                    "jax.distributed.initialize() first (automatic when JAX_COORDINATOR_ADDRESS "
                    "is set)")


def add_mesh_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--mesh SPEC`` and ``--distributed`` (``cli.main`` initializes the processes)."""
    parser.add_argument("--mesh", default=None, metavar="SPEC", help=MESH_HELP)
    parser.add_argument("--distributed", action="store_true", help=DISTRIBUTED_HELP)


def _peek_config(model: str) -> Any:
    """The config of a HF directory without its weights (None for other model specs)."""
    from ..io import SMOLLM2_SPECS, read_hf_config

    path = Path(os.fspath(model)).expanduser()
    if model.lower() in SMOLLM2_SPECS and not path.exists():
        return None
    return read_hf_config(path) if path.is_dir() else None


def mesh_from_args(args: argparse.Namespace, batch: int | None = None) -> Any:
    """The ``Mesh`` that ``args.mesh`` names (``auto``: FSDP over as many devices as ``batch``
    rows split over evenly, all when ``batch`` is None), or None for one device. A bad spec, or
    a HF checkpoint whose widths the mesh does not divide, raises ``ShardingError`` (one line,
    exit 2) before any weight is read."""
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
    config = _peek_config(args.model)
    if config is not None:
        from ..models.llama_params import check_widths

        check_widths(config, mesh)
    return mesh


def load_placed(model: str, dtype: str | None, mesh: Any) -> tuple[Any, Any, Any]:
    """``(config, base, tokenizer)`` from ``io.load_model``; with a ``mesh`` read on the host
    and placed on it by ``models.llama_params.shard_base`` (layers stacked when uniform)."""
    from ..config import default_dtype
    from ..io import load_model

    config, base, tokenizer = load_model(model, dtype=dtype or default_dtype(),
                                         as_numpy=mesh is not None)
    if mesh is not None:
        from ..models.llama_params import shard_base

        base = shard_base(base, config, mesh)
    return config, base, tokenizer


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


__all__ = ["add_mesh_args", "is_primary", "load_placed", "mesh_from_args", "mesh_note"]
