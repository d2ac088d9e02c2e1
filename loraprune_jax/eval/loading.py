"""The model an evaluation command runs: loaded, its projections quantized to int8 when asked
(``models.quant``), and placed on one device or on a mesh as ``prune`` places it."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ..config import LlamaConfig, check_base_dtype, default_dtype
from ..models.llama_params import shard_base, stack_layers
from ..models.quant import quantize_base


def load_for_eval(spec: str | os.PathLike[str], dtype: str | None = None, *,
                  base_dtype: str | None = None, mesh: Mesh | None = None,
                  stack: bool = False) -> tuple[LlamaConfig, dict[str, Any], Any]:
    """``(config, base, tokenizer)`` of a model spec (``io.load_model``).

    ``base_dtype="int8"`` stores the seven projections in 8 bits. With a ``mesh`` the checkpoint
    is read shard by shard and placed by ``models.llama_params.shard_base`` (layers stacked when
    the widths are uniform); without one it goes to the default device, stacked when ``stack``
    and uniform (the decode loop then scans over one compiled layer).
    """
    from ..io import load_model

    check_base_dtype(base_dtype)
    lazy = mesh is not None or base_dtype is not None  # read slices, never a whole float copy
    config, base, tokenizer = load_model(spec, dtype=dtype or default_dtype(), lazy=lazy)
    if base_dtype == "int8":
        base = quantize_base(base, lazy=True)
    if mesh is not None:
        return config, shard_base(base, config, mesh), tokenizer
    if lazy:
        base = jax.tree.map(jnp.asarray, base)
    if stack and config.is_uniform:
        base = stack_layers(base)
    return config, base, tokenizer


__all__ = ["load_for_eval"]
