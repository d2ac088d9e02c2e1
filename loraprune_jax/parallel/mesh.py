"""Device meshes from a string, and the rules that map logical axis names to mesh axes (MaxText
style): shardings, placement, batch splitting and activation constraints for any model.

A mesh has three named axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with
the base weights sharded over it) and ``tensor`` (attention heads and MLP channels split across
devices). Each model declares its parameters' *logical* axes next to its shapes
(``models.llama_params.logical_axes``: ``embed``, ``q_heads``, ``kv_heads``, ``mlp``,
``vocab``, ``layers``, ...) and which widths a mesh axis must divide; :data:`DEFAULT_RULES` maps
each logical axis to a mesh axis or to none. LoRA adapters, masks, scores and optimizer state are
small and replicated; batches are split over ``data`` and ``fsdp``.
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
    ("unit", None),  # an axis of size one (e.g. the input axis of per-channel scales)
    ("layers", None),
    ("seq", None),
)

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


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def _axis_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    sizes = mesh_sizes(mesh)
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(sizes[n] for n in names)


def check_divisible(widths: Sequence[tuple[int | None, str, str, int]], mesh: Mesh,
                    rules: Rules = DEFAULT_RULES, hint: str = "") -> None:
    """Raise :class:`ShardingError` when a width does not divide the mesh axis its logical axis
    maps to, saying what to change. ``widths`` lists ``(layer or None, what, logical axis,
    width)`` as a model declares them (e.g. ``(3, "MLP channels", "mlp", 1536)``); ``hint`` is
    added to the first per-layer complaint."""
    table = dict(rules)
    problems, layer_bad = [], []
    for layer, what, logical, width in widths:
        entry = table.get(logical)
        n = _axis_size(mesh, entry)
        if width % n == 0:
            continue
        axis = entry if isinstance(entry, str) else "x".join(entry or ())
        if layer is None:
            problems.append(f"the {what} {width} is not a multiple of the {axis} axis ({n})")
        else:
            layer_bad.append(f"layer {layer} has {width} {what}, not a multiple of the {axis} axis ({n})")
    if layer_bad:
        more = f" (and {len(layer_bad) - 1} more)" if len(layer_bad) > 1 else ""
        problems.append(layer_bad[0] + more + hint)
    if problems:
        raise ShardingError(
            f"mesh {describe(mesh)} does not fit the model: " + "; ".join(problems)
            + ". Change the mesh (e.g. mesh=fsdp:-1 or a smaller tensor axis)."
        )


def param_shardings(axes: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """``NamedSharding`` for every leaf of a tree of logical-axis tuples (a model's declaration of
    its parameters' axes, e.g. ``models.llama_params.logical_axes``), from the rules."""
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


def batch_multiple(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """The number of devices a batch is split over (``data`` x ``fsdp``): batches are padded to a
    multiple of it."""
    return _axis_size(mesh, dict(rules).get("batch"))


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


def place_tree(host: dict[str, Any], axes: dict[str, Any], mesh: Mesh, rules: Rules = DEFAULT_RULES,
               *, stacked: bool = False, dtype: Any = None) -> dict[str, Any]:
    """Place a host tree (numpy or jax leaves) on ``mesh`` by its logical ``axes`` (a tree like
    ``host``; with ``stacked``, like ``host`` with its ``"layers"`` list stacked).

    With ``stacked`` the list ``host["layers"]`` is stacked on a leading axis without ever
    building the whole stacked array on the host: each device's shard is read from the
    per-layer arrays. Leaves may be anything with ``.shape`` and slicing (numpy arrays, lazy
    file tensors); a node of several arrays (an int8 weight's values and scales) is placed child
    by child. ``dtype`` casts each plain leaf's shard as it is read, never a node's children.
    """
    shardings = param_shardings(axes, mesh, rules)

    def leaf(x: Any, sharding: NamedSharding, cast: Any) -> jax.Array:
        def read(idx: tuple[slice, ...]) -> np.ndarray:
            part = np.asarray(x[idx])
            return part if cast is None else part.astype(cast)

        return jax.make_array_from_callback(x.shape, sharding, read)

    def stacked_leaf(per_layer: list[Any], sharding: NamedSharding, cast: Any) -> jax.Array:
        def read(idx: tuple[slice, ...]) -> np.ndarray:
            rows = range(len(per_layer))[idx[0]]
            part = np.stack([np.asarray(per_layer[i][idx[1:]]) for i in rows])
            return part if cast is None else part.astype(cast)

        return jax.make_array_from_callback((len(per_layer),) + tuple(per_layer[0].shape),
                                            sharding, read)

    # A sharding subtree is one NamedSharding, or a node of several (a quantized weight's values
    # and scales), whose arrays are placed as they are: ``dtype`` casts plain leaves only.
    def is_one(s: Any) -> bool:
        return not isinstance(s, (dict, list, tuple))

    def put(sharding: Any, x: Any) -> Any:
        if isinstance(sharding, NamedSharding):
            return leaf(x, sharding, dtype)
        return jax.tree.map(lambda s, v: leaf(v, s, None), sharding, x)

    layers = host.get("layers")
    if not (stacked and isinstance(layers, list)):
        return jax.tree.map(put, shardings, host, is_leaf=is_one)
    out = {k: jax.tree.map(put, shardings[k], v, is_leaf=is_one)
           for k, v in host.items() if k != "layers"}
    stacked_layers = {}
    for name in layers[0]:
        sharding = shardings["layers"][name]
        per_layer = [layer[name] for layer in layers]
        if isinstance(sharding, NamedSharding):
            stacked_layers[name] = stacked_leaf(per_layer, sharding, dtype)
        else:
            stacked_layers[name] = jax.tree.map(lambda s, *xs: stacked_leaf(list(xs), s, None),
                                                sharding, *per_layer)
    out["layers"] = stacked_layers
    return out


def is_placed(tree: Any, mesh: Mesh) -> bool:
    """Whether every leaf of ``tree`` is a ``jax.Array`` laid out by a ``NamedSharding`` on
    ``mesh`` (a tree :func:`place_tree` made), so it need not be placed again."""
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(
        isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)
        and x.sharding.mesh == mesh for x in leaves)


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
