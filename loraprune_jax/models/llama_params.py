"""The LLaMA base tree's layout: per-layer shapes and checks, stacking layers for ``lax.scan``,
the ``flax.nnx`` module whose parameters are that tree, and each parameter's logical axes with
the widths a mesh must divide (``parallel.mesh`` maps them to devices)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from ..config import PROJECTIONS, LlamaConfig, LoraConfig
from ..core.trees import unstack
from ..parallel.mesh import (
    DEFAULT_RULES, Rules, check_divisible, is_placed, param_shardings, place_tree,
)
from .llama import forward
from .quant import QTYPE, QArray, check_base_dtype, is_quantized

Array = jax.Array
LAYER_KEYS = ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")


def stack_layers(tree: dict[str, Any]) -> dict[str, Any]:
    """List-of-layers tree -> stacked tree (leading layer axis), for ``lax.scan``."""
    layers = tree["layers"]
    if isinstance(layers, dict):
        return tree
    shapes = {jax.tree.structure(l) for l in layers}
    if len(shapes) != 1:
        raise ValueError("layers have different structures and cannot be stacked")
    for name in jax.tree.leaves(jax.tree.map(lambda *xs: len({x.shape for x in xs}), *layers)):
        if name != 1:
            raise ValueError("layer widths differ; a pruned model cannot be stacked")
    out = dict(tree)
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


def unstack_layers(tree: dict[str, Any]) -> dict[str, Any]:
    """Stacked tree -> list of per-layer dicts (the core's ``unstack``)."""
    return unstack(tree)


def layer_shapes(config: LlamaConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Expected parameter shapes of layer ``i`` (kernels ``(in, out)``)."""
    d, hd = config.hidden_size, config.head_dim
    h, kv, f = config.heads(i), config.kv_heads(i), config.ffn(i)
    return {
        "attn_norm": (d,),
        "q": (d, h * hd),
        "k": (d, kv * hd),
        "v": (d, kv * hd),
        "o": (h * hd, d),
        "mlp_norm": (d,),
        "gate": (d, f),
        "up": (d, f),
        "down": (f, d),
    }


def param_shapes(config: LlamaConfig) -> dict[str, Any]:
    """The base tree of ``config`` (list layout) with shape tuples as leaves."""
    d = config.hidden_size
    out: dict[str, Any] = {
        "embed": (config.vocab_size, d),
        "layers": [layer_shapes(config, i) for i in range(config.num_layers)],
        "final_norm": (d,),
    }
    if not config.tie_word_embeddings:
        out["lm_head"] = (d, config.vocab_size)
    return out


def check_base(base: dict[str, Any], config: LlamaConfig) -> None:
    """Raise ``ValueError`` naming the first parameter whose presence or shape disagrees."""
    base = unstack_layers(base)
    want = param_shapes(config)
    if config.tie_word_embeddings and "lm_head" in base:
        raise ValueError("config.tie_word_embeddings is set but base has an 'lm_head'")
    layers = base.get("layers", ())
    if len(layers) != config.num_layers:
        raise ValueError(f"base has {len(layers)} layers, config says {config.num_layers}")
    checks = [((k,), base.get(k), v) for k, v in want.items() if k != "layers"]
    for i, (layer, shapes) in enumerate(zip(layers, want["layers"])):
        checks += [(("layer", i, k), layer.get(k), v) for k, v in shapes.items()]
    for where, leaf, shape in checks:
        name = " ".join(map(str, where))
        if leaf is None:
            raise ValueError(f"base has no {name}")
        if tuple(leaf.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(leaf.shape)}")


# ----------------------------------------------------------------------------- nnx module
class LlamaBlock(nnx.Module):
    """Parameters of one decoder layer (RMSNorm, attention projections, SwiGLU MLP)."""

    def __init__(self, config: LlamaConfig, layer: int, *, rngs: nnx.Rngs, std: float = 0.02):
        dtype = config.jnp_dtype
        for name, shape in layer_shapes(config, layer).items():
            if name.endswith("norm"):
                value = jnp.ones(shape, dtype)
            else:
                value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
            setattr(self, name, nnx.Param(value))


class Llama(nnx.Module):
    """A LLaMA-family causal LM whose forward pass is the pure :func:`forward`.

    ``params()`` returns the plain base tree used by every pure function in the package, so an
    nnx model and the functional core stay interchangeable (``Llama.from_params`` goes back).
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, std: float = 0.02):
        self.config = config
        dtype = config.jnp_dtype
        d, v = config.hidden_size, config.vocab_size
        self.embed = nnx.Param((std * jax.random.normal(rngs.params(), (v, d))).astype(dtype))
        self.layers = nnx.List(
            [LlamaBlock(config, i, rngs=rngs, std=std) for i in range(config.num_layers)]
        )
        self.final_norm = nnx.Param(jnp.ones((d,), dtype))
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(
                (std * jax.random.normal(rngs.params(), (d, v))).astype(dtype)
            )

    def params(self) -> dict[str, Any]:
        """The frozen-base pytree (list layout)."""
        out: dict[str, Any] = {
            "embed": self.embed[...],
            "final_norm": self.final_norm[...],
            "layers": [{k: getattr(b, k)[...] for k in LAYER_KEYS} for b in self.layers],
        }
        if not self.config.tie_word_embeddings:
            out["lm_head"] = self.lm_head[...]
        return out

    @classmethod
    def from_params(cls, config: LlamaConfig, base: dict[str, Any]) -> Llama:
        """Wrap an existing base tree (e.g. a loaded checkpoint) as an nnx module."""
        base = unstack_layers(base)
        check_base(base, config)
        model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
        model.embed = nnx.Param(base["embed"])
        model.final_norm = nnx.Param(base["final_norm"])
        if "lm_head" in base:
            model.lm_head = nnx.Param(base["lm_head"])
        for block, layer in zip(model.layers, base["layers"]):
            for k in LAYER_KEYS:
                setattr(block, k, nnx.Param(layer[k]))
        return model

    def __call__(
        self,
        tokens: Array,
        lora: dict[str, Any] | None = None,
        masks: dict[str, Any] | None = None,
        lora_cfg: LoraConfig | None = None,
        *,
        rng: Array | None = None,
    ) -> Array:
        return forward(self.params(), lora, masks, tokens, self.config, lora_cfg, rng=rng)


def init_base(config: LlamaConfig, key: Array | int = 0, std: float = 0.02) -> dict[str, Any]:
    """A random base tree for ``config`` (tests and shape-only planning)."""
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1)) if isinstance(key, jax.Array) else key
    return Llama(config, rngs=nnx.Rngs(seed), std=std).params()


# ----------------------------------------------------------------------------- logical axes
# The logical names of each parameter's axes (kernels are (in, out)), which parallel.mesh's rules
# map to mesh axes.
LAYER_AXES: dict[str, tuple[str, ...]] = {
    "attn_norm": ("norm",),
    "q": ("embed", "q_heads"),
    "k": ("embed", "kv_heads"),
    "v": ("embed", "kv_heads"),
    "o": ("q_heads", "embed"),
    "mlp_norm": ("norm",),
    "gate": ("embed", "mlp"),
    "up": ("embed", "mlp"),
    "down": ("mlp", "embed"),
}
TOP_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "final_norm": ("norm",),
    "lm_head": ("embed", "vocab"),
}


def _axes_of(axes: tuple[str, ...], leaf: Any) -> Any:
    """A leaf's logical axes; for an int8 weight a ``QArray`` of its values' axes and its
    scales' (one per output channel: the input axis becomes ``unit``, of size one)."""
    if not is_quantized(leaf):
        return axes
    return QArray(axes, axes[:-2] + ("unit", axes[-1]), None, QTYPE)


def logical_axes(base: dict[str, Any]) -> dict[str, Any]:
    """A tree like ``base`` (list or stacked layers; leaves may be ``None``, int8 weights
    ``QArray`` nodes) whose leaves are tuples of logical axis names."""
    out: dict[str, Any] = {k: TOP_AXES[k] for k in base if k != "layers"}
    layers = base["layers"]
    if isinstance(layers, dict):
        out["layers"] = {k: _axes_of(("layers",) + LAYER_AXES[k], v) for k, v in layers.items()}
    else:
        out["layers"] = [{k: _axes_of(LAYER_AXES[k], v) for k, v in layer.items()}
                         for layer in layers]
    return out


def base_layout(config: LlamaConfig, stacked: bool, base_dtype: str | None = None) -> dict[str, Any]:
    """The key structure of a base tree for ``config`` (leaves ``None``; with ``base_dtype``
    ``"int8"`` the projections are ``QArray`` nodes), for shardings."""
    check_base_dtype(base_dtype)
    quantized = QArray(None, None, None, QTYPE) if base_dtype == "int8" else None
    layer = {k: quantized if k in PROJECTIONS else None for k in LAYER_AXES}
    out: dict[str, Any] = {"embed": None, "final_norm": None}
    if not config.tie_word_embeddings:
        out["lm_head"] = None
    out["layers"] = layer if stacked else [dict(layer) for _ in range(config.num_layers)]
    return out


def base_shardings(config: LlamaConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                   stacked: bool | None = None, base_dtype: str | None = None) -> dict[str, Any]:
    """``NamedSharding`` of every base parameter for ``config`` on ``mesh`` (stacked layers by
    default when the widths are uniform; ``base_dtype="int8"``: the int8 values and scales)."""
    stacked = config.is_uniform if stacked is None else stacked
    return param_shardings(logical_axes(base_layout(config, stacked, base_dtype)), mesh, rules)


def check_widths(config: LlamaConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> None:
    """Raise ``ShardingError`` when a width does not divide the mesh axis it is split over:
    heads, KV heads and MLP channels of every layer (``tensor``), the hidden size (``fsdp``),
    the vocabulary. Says what to change."""
    widths: list[tuple[int | None, str, str, int]] = [
        (None, "hidden size", "embed", config.hidden_size),
        (None, "vocabulary", "vocab", config.vocab_size),
    ]
    for i in range(config.num_layers):
        widths += [(i, "query heads", "q_heads", config.heads(i)),
                   (i, "KV heads", "kv_heads", config.kv_heads(i)),
                   (i, "MLP channels", "mlp", config.ffn(i))]
    hint = "" if config.is_uniform else (
        "; this model was pruned to widths that the axis does not divide: use a smaller "
        "tensor axis, or prune with allocation=uniform and a ratio whose kept counts it divides")
    check_divisible(widths, mesh, rules, hint)


def shard_base(base: dict[str, Any], config: LlamaConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES,
               *, stacked: bool | None = None, dtype: Any = None) -> dict[str, Any]:
    """Place a host base tree (list layout, numpy or jax leaves) on ``mesh``, its layers stacked
    (by default when the widths are uniform) shard by shard without a whole stacked copy on the
    host. Checks the widths first (:func:`check_widths`)."""
    check_widths(config, mesh, rules)
    stacked = config.is_uniform if stacked is None else stacked
    layers = base["layers"]
    shape = {**base, "layers": dict(layers[0]) if stacked and isinstance(layers, list)
             else layers}
    return place_tree(base, logical_axes(shape), mesh, rules, stacked=stacked, dtype=dtype)


def place_base(base: dict[str, Any], config: LlamaConfig, mesh: Mesh,
               rules: Rules = DEFAULT_RULES) -> dict[str, Any]:
    """``base`` on ``mesh``: as it is when it already lies there (placed by :func:`shard_base`),
    else :func:`shard_base` of it (layers stacked when uniform). Checks the widths either way."""
    if is_placed(base, mesh):
        check_widths(config, mesh, rules)
        return base
    return shard_base(base, config, mesh, rules)
