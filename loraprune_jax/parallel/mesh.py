"""Device meshes from a string, logical axis names for every parameter, and the rules that map
them to mesh axes (MaxText style).

A mesh has three named axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with
the base weights sharded over it) and ``tensor`` (attention heads and MLP channels split across
devices). Parameters carry *logical* names (``embed``, ``q_heads``, ``kv_heads``, ``mlp``,
``vocab``, ``layers``, ...); :data:`DEFAULT_RULES` maps each to a mesh axis or to none. LoRA
adapters, masks, scores and optimizer state are small and replicated; batches are split over
``data`` and ``fsdp``.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ..config import LlamaConfig

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DEFAULT_MESH = "fsdp:-1"

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("seq", None),
)

# Logical names of each base parameter's axes (kernels are (in, out)).
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


class ShardingError(ValueError):
    """A mesh that does not fit the model, the batch or the device count."""


# Meshes -----------------------------------------------------------------------------------
def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """``"data:2,fsdp:-1,tensor:1"`` -> ``{"data": 2, "fsdp": 4, "tensor": 1}`` for 8 devices.

    Axes left out have size 1; one axis may be ``-1`` and takes the devices left over. The
    sizes must multiply to ``num_devices``.
    """
    sizes: dict[str, int] = {}
    text = spec.strip()
    if not text:
        raise ShardingError("empty mesh spec; expected e.g. 'fsdp:-1' or 'data:2,fsdp:-1,tensor:1'")
    for part in text.split(","):
        name, sep, value = part.strip().partition(":")
        if not sep or name not in AXES:
            raise ShardingError(
                f"bad mesh entry {part.strip()!r} in {spec!r}: expected AXIS:SIZE with AXIS one of "
                f"{', '.join(AXES)}"
            )
        if name in sizes:
            raise ShardingError(f"mesh axis {name!r} given twice in {spec!r}")
        try:
            size = int(value)
        except ValueError:
            raise ShardingError(f"mesh axis {name!r} has size {value!r}, not an integer") from None
        if size == 0 or size < -1:
            raise ShardingError(f"mesh axis {name!r} has size {size}; use a positive size or -1")
        sizes[name] = size
    fill = [n for n, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ShardingError(f"only one mesh axis may be -1, got {', '.join(fill)} in {spec!r}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % fixed:
            raise ShardingError(
                f"mesh {spec!r}: the fixed axes take {fixed} devices, which does not divide the "
                f"{num_devices} devices here"
            )
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ShardingError(
            f"mesh {spec!r} has {fixed} devices but there are {num_devices}; "
            "make one axis -1 to take the rest"
        )
    return {a: sizes.get(a, 1) for a in AXES}


def make_mesh(spec: str = DEFAULT_MESH, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``(data, fsdp, tensor)`` over ``devices`` (default: all devices of
    all processes) from a spec such as ``"data:2,fsdp:-1"``."""
    devices = list(jax.devices() if devices is None else devices)
    try:
        sizes = parse_mesh(spec, len(devices))
    except ShardingError:
        # Fewer devices than there are (e.g. "fsdp:1" on a host with 8): use the first ones,
        # when they all belong to this one process.
        n = _fixed_size(spec)
        if not n or n > len(devices) or jax.process_count() > 1:
            raise
        sizes = parse_mesh(spec, n)
        devices = devices[:n]
    shape = tuple(sizes[a] for a in AXES)
    auto = (AxisType.Auto,) * len(AXES)  # shardings propagate (GSPMD), not checked by type
    try:
        return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # make_mesh insists on a topology-aware layout; any order works for simulated devices.
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES, axis_types=auto)


def _fixed_size(spec: str) -> int:
    """The device count of a spec without ``-1`` (0 when it has one or does not parse)."""
    try:
        sizes = [int(part.partition(":")[2]) for part in spec.split(",")]
    except ValueError:
        return 0
    return 0 if any(s < 1 for s in sizes) else math.prod(sizes)


def auto_mesh_spec(micro_batch_size: int, num_devices: int | None = None) -> str:
    """The mesh that ``mesh=auto`` means: FSDP over as many devices as the micro-batch splits
    over evenly (all of them in a multi-process job, where every process must take part)."""
    n = jax.device_count() if num_devices is None else num_devices
    if jax.process_count() > 1:
        return "fsdp:-1"
    return f"fsdp:{math.gcd(n, micro_batch_size)}"


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    """Axis name -> size."""
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def describe(mesh: Mesh) -> str:
    """``"data:1,fsdp:8,tensor:1"`` for a mesh."""
    return ",".join(f"{a}:{s}" for a, s in mesh_sizes(mesh).items())


# Rules --------------------------------------------------------------------------------------
def spec_for(logical: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> P:
    """The ``PartitionSpec`` of an array whose axes have the given logical names.

    A mesh axis is used at most once per array: a later logical axis that maps to a mesh axis
    already taken stays unsharded.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical:
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise ShardingError(f"no sharding rule for logical axis {name!r}")
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def logical_axes(base: dict[str, Any]) -> dict[str, Any]:
    """A tree like ``base`` (list or stacked layers) whose leaves are tuples of logical names."""
    out: dict[str, Any] = {k: TOP_AXES[k] for k in base if k != "layers"}
    layers = base["layers"]
    if isinstance(layers, dict):
        out["layers"] = {k: ("layers",) + LAYER_AXES[k] for k in layers}
    else:
        out["layers"] = [{k: LAYER_AXES[k] for k in layer} for layer in layers]
    return out


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def _axis_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    sizes = mesh_sizes(mesh)
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(sizes[n] for n in names)


def check_widths(config: LlamaConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> None:
    """Raise :class:`ShardingError` when a model width does not divide the mesh axis it is
    split over: heads, KV heads and MLP channels of every layer (``tensor``), the hidden size
    (``fsdp``), the vocabulary. Says what to change."""
    table = dict(rules)

    def size(logical: str) -> tuple[int, str]:
        entry = table.get(logical)
        return _axis_size(mesh, entry), (entry if isinstance(entry, str) else "x".join(entry or ()))

    problems = []
    for what, logical, width in (
        ("hidden size", "embed", config.hidden_size),
        ("vocabulary", "vocab", config.vocab_size),
    ):
        n, axis = size(logical)
        if width % n:
            problems.append(f"the {what} {width} is not a multiple of the {axis} axis ({n})")
    tensor_bad = []
    for i in range(config.num_layers):
        for what, logical, width in (
            ("query heads", "q_heads", config.heads(i)),
            ("KV heads", "kv_heads", config.kv_heads(i)),
            ("MLP channels", "mlp", config.ffn(i)),
        ):
            n, axis = size(logical)
            if width % n:
                tensor_bad.append((i, what, width, axis, n))
    if tensor_bad:
        i, what, width, axis, n = tensor_bad[0]
        more = f" (and {len(tensor_bad) - 1} more)" if len(tensor_bad) > 1 else ""
        pruned = "" if config.is_uniform else (
            "; this model was pruned to widths that the axis does not divide: use a smaller "
            "tensor axis, or prune with allocation=uniform and a ratio whose kept counts it divides"
        )
        problems.append(
            f"layer {i} has {width} {what}, not a multiple of the {axis} axis ({n}){more}{pruned}"
        )
    if problems:
        raise ShardingError(
            f"mesh {describe(mesh)} does not fit the model: " + "; ".join(problems)
            + ". Change the mesh (e.g. mesh=fsdp:-1 or a smaller tensor axis)."
        )


def param_shardings(base: dict[str, Any], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict[str, Any]:
    """``NamedSharding`` for every leaf of ``base`` (arrays or shape structs), from the rules."""
    axes = logical_axes(base)
    return jax.tree.map(lambda a: NamedSharding(mesh, spec_for(a, rules)), axes, is_leaf=_is_axes)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (LoRA, masks, scores, optimizer state, keys)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 3, batch_axis: int = 1,
                   rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Token batches ``(grad_accum, micro_batch, seq)`` split over ``data`` x ``fsdp`` along
    the micro-batch axis."""
    names: list[str | None] = [None] * ndim
    names[batch_axis] = "batch"
    return NamedSharding(mesh, spec_for(names, rules))


def check_batch(micro_batch_size: int, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> None:
    """The micro-batch must split evenly over the batch axes."""
    n = _axis_size(mesh, dict(rules).get("batch"))
    if micro_batch_size % n:
        raise ShardingError(
            f"train.micro_batch_size={micro_batch_size} is not a multiple of the {n} devices on "
            f"the batch axes (data x fsdp) of mesh {describe(mesh)}: set train.micro_batch_size "
            f"to a multiple of {n}, or move devices to the tensor axis"
        )


# Placing arrays -----------------------------------------------------------------------------
def global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds in full (each process fills
    only its own devices' shards)."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def shard_base(
    base: dict[str, Any], config: LlamaConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES,
    *, stacked: bool | None = None, dtype: Any = None,
) -> dict[str, Any]:
    """Place a host base tree (list layout, numpy or jax leaves) on ``mesh``.

    With ``stacked`` (default: when the widths are uniform) the layers are stacked on a
    leading axis without ever building the whole stacked array on the host: each device's
    shard is read from the per-layer arrays. Checks the widths first (:func:`check_widths`).
    """
    check_widths(config, mesh, rules)
    stacked = config.is_uniform if stacked is None else stacked
    layers = base["layers"]
    cast = (lambda x: x) if dtype is None else (lambda x: x.astype(dtype))

    def put(x: Any, sharding: NamedSharding) -> jax.Array:
        return jax.make_array_from_callback(
            x.shape, sharding, lambda idx: cast(np.asarray(x[idx]))
        )

    top = {k: v for k, v in base.items() if k != "layers"}
    if stacked and isinstance(layers, list):
        shape_tree = {**top, "layers": {k: None for k in layers[0]}}
        shardings = param_shardings(shape_tree, mesh, rules)
        out = {k: put(v, shardings[k]) for k, v in top.items()}
        stacked_layers = {}
        for name in layers[0]:
            per_layer = [layer[name] for layer in layers]
            shape = (len(per_layer),) + tuple(per_layer[0].shape)

            def read(idx: tuple[slice, ...], per_layer: list[Any] = per_layer) -> np.ndarray:
                rows = range(len(per_layer))[idx[0]]
                return cast(np.stack([np.asarray(per_layer[i][idx[1:]]) for i in rows]))

            stacked_layers[name] = jax.make_array_from_callback(
                shape, shardings["layers"][name], read
            )
        out["layers"] = stacked_layers
        return out
    shardings = param_shardings(base, mesh, rules)
    return jax.tree.map(put, base, shardings)


def host_tree(tree: Any) -> Any:
    """Numpy copies of a (possibly multi-process sharded) tree, on every process."""
    from jax.experimental import multihost_utils

    def get(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


# Activation constraints ---------------------------------------------------------------------
_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "loraprune_jax_mesh", default=None
)


@contextmanager
def activation_sharding(mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """While tracing inside this context, :func:`constrain` pins activations to ``mesh``."""
    token = _ACTIVE.set(None if mesh is None else (mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical axis names when a mesh is active, else ``x``."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(logical, rules)))


def base_layout(config: LlamaConfig, stacked: bool) -> dict[str, Any]:
    """The key structure of a base tree for ``config`` (leaves ``None``), for shardings."""
    layer = {k: None for k in LAYER_AXES}
    out: dict[str, Any] = {"embed": None, "final_norm": None}
    if not config.tie_word_embeddings:
        out["lm_head"] = None
    out["layers"] = layer if stacked else [dict(layer) for _ in range(config.num_layers)]
    return out
