"""Physical pruning: cut masked groups out of the weights and fold LoRA in (method.md, section 5).

During training the masks only zero the outputs of pruned groups. At the end the pruned groups
are removed for real: each kept attention unit keeps its ``H/K`` query heads (q columns, o rows)
and its KV head (k/v columns), each kept MLP channel its gate/up column and down row, and LoRA is
merged as ``W + scale * A @ B``. The result is a smaller dense base tree (list layout, widths may
differ per layer) whose logits equal those of the masked, unmerged model up to float rounding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import PROJECTIONS, LlamaConfig, LoraConfig

# A module import (names resolved at call time): models.llama imports pruning.groups, so
# ``from ..models.llama import ...`` here would be circular when the package re-exports slicing.
from ..models import llama as _llama
from ..models import lora as _lora

Array = jax.Array

# Projections whose output columns / input rows a group owns.
_OUT_COLS = {"q": "q", "k": "kv", "v": "kv", "gate": "mlp", "up": "mlp"}
_IN_ROWS = {"o": "q", "down": "mlp"}


def _mask_vector(value: Any, layer: int, kind: str, size: int) -> np.ndarray:
    """A layer's mask as a float numpy vector, checked to be exactly 0/1 and of the right size."""
    arr = np.asarray(value).astype(np.float32)
    if arr.shape != (size,):
        raise ValueError(f"masks layer {layer} {kind!r}: expected shape ({size},), got {arr.shape}")
    bad = ~((arr == 0.0) | (arr == 1.0))
    if bad.any():
        idx = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"masks layer {layer} {kind!r} must be exactly 0 or 1 to slice; "
            f"entry {idx} is {arr[idx]!r} ({int(bad.sum())} bad entries)"
        )
    return arr


def kept_indices(masks: dict[str, Any] | None, config: LlamaConfig) -> list[dict[str, np.ndarray]]:
    """Per layer, the ids that survive slicing (numpy ``int64`` vectors).

    Keys: ``"units"`` (kept attention units = KV heads), ``"heads"`` (kept query heads),
    ``"q"`` (kept columns of q = rows of o), ``"kv"`` (kept columns of k and v) and ``"mlp"``
    (kept MLP channels). ``masks`` may be stacked or ``None`` (everything kept). Raises
    ``ValueError`` when a mask is not exactly 0/1 or has the wrong size.
    """
    mask_layers = _llama.unstack_layers(masks)["layers"] if masks is not None else None
    if mask_layers is not None and len(mask_layers) != config.num_layers:
        raise ValueError(f"masks have {len(mask_layers)} layers, config says {config.num_layers}")
    hd = config.head_dim
    out = []
    for i in range(config.num_layers):
        h, kv, f = config.heads(i), config.kv_heads(i), config.ffn(i)
        if mask_layers is None:
            attn, mlp = np.ones(kv, np.float32), np.ones(f, np.float32)
        else:
            attn = _mask_vector(mask_layers[i]["attn"], i, "attn", kv)
            mlp = _mask_vector(mask_layers[i]["mlp"], i, "mlp", f)
        g = h // kv if kv else 0
        units = np.flatnonzero(attn).astype(np.int64)
        heads = (units[:, None] * g + np.arange(g)[None, :]).reshape(-1)
        q_cols = (heads[:, None] * hd + np.arange(hd)[None, :]).reshape(-1)
        kv_cols = (units[:, None] * hd + np.arange(hd)[None, :]).reshape(-1)
        out.append(
            {
                "units": units,
                "heads": heads.astype(np.int64),
                "q": q_cols.astype(np.int64),
                "kv": kv_cols.astype(np.int64),
                "mlp": np.flatnonzero(mlp).astype(np.int64),
            }
        )
    return out


def slice_and_merge(
    base: dict[str, Any],
    lora: dict[str, Any] | None,
    masks: dict[str, Any] | None,
    config: LlamaConfig,
    lora_cfg: LoraConfig | None = None,
) -> tuple[dict[str, Any], LlamaConfig]:
    """The smaller dense model: ``(base tree in list layout, its config)``.

    Slices each projection first (and ``B``'s columns / ``A``'s rows with it) and then merges,
    which equals merging then slicing but never materialises a full-width merged weight.
    Accepts list or stacked layouts for all three trees; ``lora`` and ``masks`` may be ``None``.
    Embeddings, norms and the LM head are shared (not copied) with ``base``. A base of numpy
    arrays is sliced and merged on the host (numpy results), so a model too large for one
    device can be sliced after training on a mesh.
    """
    base = _llama.unstack_layers(base)
    _llama.check_base(base, config)
    lora_layers = None
    if lora is not None:
        if lora_cfg is None:
            raise ValueError("slice_and_merge() got a LoRA tree but no lora_cfg (rank/alpha)")
        lora_layers = _llama.unstack_layers(lora)["layers"]
        if len(lora_layers) != config.num_layers:
            raise ValueError(f"lora has {len(lora_layers)} layers, config says {config.num_layers}")
        for i, adapters in enumerate(lora_layers):
            unknown = set(adapters) - set(PROJECTIONS)
            if unknown:
                raise ValueError(f"lora layer {i} has unknown projections {sorted(unknown)}")
    scale = lora_cfg.scale if lora_cfg is not None else 0.0
    keep = kept_indices(masks, config)

    new_layers = []
    for i, (layer, ids) in enumerate(zip(base["layers"], keep)):
        adapters = lora_layers[i] if lora_layers is not None else {}
        new = dict(layer)
        for name in PROJECTIONS:
            w, pair = layer[name], adapters.get(name)
            take = np.take if isinstance(w, np.ndarray) else jnp.take  # numpy stays on the host
            if name in _OUT_COLS:
                cols = ids[_OUT_COLS[name]]
                w = take(w, cols, axis=1)
                if pair is not None:
                    pair = {"a": pair["a"], "b": take(pair["b"], cols, axis=1)}
            else:
                rows = ids[_IN_ROWS[name]]
                w = take(w, rows, axis=0)
                if pair is not None:
                    pair = {"a": take(pair["a"], rows, axis=0), "b": pair["b"]}
            new[name] = _lora.merge_pair(w, pair, scale)
        new_layers.append(new)

    g = [config.heads(i) // config.kv_heads(i) if config.kv_heads(i) else 0 for i in range(config.num_layers)]
    heads = tuple(len(ids["units"]) * g[i] for i, ids in enumerate(keep))
    kv_heads = tuple(len(ids["units"]) for ids in keep)
    ffn = tuple(len(ids["mlp"]) for ids in keep)
    new_config = config.with_widths(heads, kv_heads, ffn)
    out = {k: v for k, v in base.items() if k != "layers"}
    out["layers"] = new_layers
    _llama.check_base(out, new_config)
    return out, new_config


def count_params(base: dict[str, Any]) -> int:
    """Number of parameters in a base tree (either layout; a tied head is counted once)."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base)))


__all__ = ["count_params", "kept_indices", "slice_and_merge"]
