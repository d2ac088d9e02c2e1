"""Orbax checkpoints for training runs: one array pytree plus JSON metadata per step.

A step directory holds two items, written together by one ``orbax`` Composite save:

* ``state``: a pytree of arrays (LoRA params, optax state, masks, EMA scores, PRNG keys,
  step counter), saved with ``StandardSave`` and restored against a target's
  shapes/dtypes/shardings with ``StandardRestore``;
* ``meta``: a JSON-serialisable dict (run config, data position, metrics history), saved
  with ``JsonSave``/``JsonRestore``.

Orbax writes each step into ``<step>.orbax-checkpoint-tmp*`` and renames it to ``<step>``
once every item is written, so a save that is interrupted (exception, SIGKILL,
preemption) never shows up as a step; stale temporary directories are removed when a
new :class:`RunCheckpointer` is created on the directory, and so are the old steps beyond
``max_to_keep`` that a process killed while deleting them left behind.

A save that runs out of disk space raises :class:`DiskFullError` (an ``OSError``, ``ENOSPC``)
naming the directory and the step, with the noise of orbax's failed write kept off stderr
(:mod:`.diskfull`); the steps committed before stay.

``restore`` checks the stored leaves against the target *before* reading anything and
the restored tree against the target afterwards, and raises a :class:`ValueError`
naming the first mismatching path; orbax itself would silently cast a dtype that
differs from the stored one.

PRNG keys: new-style typed keys (``jax.random.key``) can be stored directly; orbax
stores their ``key_data`` (uint32) plus the key implementation and restores a typed
key. Legacy raw keys (``jax.random.PRNGKey``) or ``jax.random.key_data(key)`` are
plain uint32 arrays and round-trip as such.

JSON gotchas for ``meta``: tuples come back as lists and non-string dict keys as strings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from .diskfull import DiskFullError, one_disk_full_error

PyTree = Any

__all__ = ["CheckpointMismatchError", "DiskFullError", "RunCheckpointer"]

_STATE = "state"
_META = "meta"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not match the restore target (structure, shape or dtype)."""


def _key_name(k: Any) -> str:
    """One path entry as plain text, the same for dict keys, list indices and fields."""
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_str(path: tuple) -> str:
    return "/".join(_key_name(k) for k in path) or "<root>"


def _flatten(tree: PyTree) -> list[tuple[str, Any]]:
    """(path, leaf) pairs in tree order; NamedTuple fields and list indices both become
    path components, so a target's ``ScaleByAdamState.mu`` matches the ``mu`` entry that
    orbax's metadata tree (which stores NamedTuples as dicts) has for it."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(_path_str(p), x) for p, x in leaves]


def _is_key_dtype(dtype: Any) -> bool:
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _spec(leaf: Any, path: str, what: str) -> tuple[tuple[int, ...], Any]:
    """(shape, dtype) of an array-like leaf, or a TypeError naming the path."""
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(
            f"{what} leaf '{path}' is a {type(leaf).__name__}, not an array or "
            "jax.ShapeDtypeStruct; wrap scalars with jnp.asarray(x, dtype=...)"
        )
    return tuple(shape), dtype


def _stored_spec(shape: tuple[int, ...], dtype: Any) -> tuple[tuple[int, ...], np.dtype]:
    """What orbax writes to disk for a leaf: typed PRNG keys are stored as key data."""
    if _is_key_dtype(dtype):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
        return tuple(data.shape), np.dtype(data.dtype)
    return shape, np.dtype(dtype)


def _same_dtype(a: Any, b: Any) -> bool:
    if _is_key_dtype(a) or _is_key_dtype(b):
        return _is_key_dtype(a) and _is_key_dtype(b) and str(a) == str(b)
    return np.dtype(a) == np.dtype(b)


def _dtype_str(dtype: Any) -> str:
    return str(dtype) if _is_key_dtype(dtype) else np.dtype(dtype).name


def _to_abstract(leaf: Any) -> Any:
    """A restore target leaf: ShapeDtypeStruct keeping sharding (and typed-key dtype)."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf  # keeps its sharding (or None) and a typed-key dtype as given
    if isinstance(leaf, jax.Array) and _is_key_dtype(leaf.dtype):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return ocp.utils.to_shape_dtype_struct(leaf)


def _local_path(directory: str | os.PathLike) -> str:
    d = os.fspath(directory)
    return d if "://" in d else os.path.abspath(d)


class RunCheckpointer:
    """Save and restore ``(state, meta)`` pairs of a training run with orbax.

    Args:
      directory: run checkpoint directory (local path or any ``etils.epath`` URL).
      max_to_keep: keep the newest N steps (``None`` keeps all).
      save_interval_steps: ``save`` without ``force`` writes only steps that are a
        multiple of this (and, orbax policy, the first save into an empty directory).
      async_save: write in a background thread; ``save`` returns after the arrays
        are copied off the device. Call :meth:`wait` before relying on the files.

    Usable as a context manager (``close`` on exit). Not thread-safe; in a multi-host
    job every process must make the same calls (orbax coordinates the writes).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        max_to_keep: int | None = 2,
        save_interval_steps: int = 1,
        async_save: bool = False,
    ) -> None:
        self.directory = _local_path(directory)
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        std, js = ocp.handlers.StandardCheckpointHandler, ocp.handlers.JsonCheckpointHandler
        registry.add(_STATE, ocp.args.StandardSave, std)
        registry.add(_STATE, ocp.args.StandardRestore, std)
        registry.add(_META, ocp.args.JsonSave, js)
        registry.add(_META, ocp.args.JsonRestore, js)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # drop what an interrupted save left behind
            create=True,
        )
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )
        steps = self.all_steps()
        if max_to_keep is not None and len(steps) > max_to_keep:  # a killed save's deletions
            for step in steps[: len(steps) - max_to_keep]:
                self._mngr.delete(step)

    # -- steps -------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Committed steps, ascending (an interrupted save never appears)."""
        return sorted(int(s) for s in self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None for an empty directory."""
        return self._mngr.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` without ``force`` would write."""
        return self._mngr.should_save(step)

    # -- save --------------------------------------------------------------------------
    def save(self, step: int, state: PyTree, meta: Mapping[str, Any], force: bool = False) -> bool:
        """Save ``state`` (pytree of arrays) and ``meta`` (JSON) as ``step``.

        Returns whether a checkpoint was written (False when the save policy skips
        ``step`` or ``step`` is not newer than the latest one). ``force=True`` skips the
        policy, but orbax still refuses to overwrite an existing step.
        Raises TypeError for a non-array leaf or a meta that is not JSON-serialisable,
        before anything is written, and :class:`DiskFullError` when the disk fills up.
        """
        for path, leaf in _flatten(state):
            if not isinstance(leaf, (jax.Array, np.ndarray)):
                _spec(None, path, "state")  # raises the TypeError naming the path
        if not isinstance(meta, Mapping):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        try:
            json.dumps(meta, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise TypeError(f"meta is not JSON-serialisable: {e}") from e
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(dict(meta))}
        )
        doing = f"saving the checkpoint of step {int(step)}"
        with one_disk_full_error(self.directory, doing):
            return bool(self._mngr.save(int(step), args=args, force=force))

    # -- restore -----------------------------------------------------------------------
    def _resolve_step(self, step: int | None) -> int:
        self._mngr.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
        elif int(step) not in self.all_steps():
            raise FileNotFoundError(
                f"no checkpoint step {step} in {self.directory} (have {self.all_steps()})"
            )
        return int(step)

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """Only the JSON metadata of ``step`` (default: latest), e.g. to rebuild the config
        and from it the restore target."""
        step = self._resolve_step(step)
        out = self._mngr.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
        return out[_META]

    def restore(self, step: int | None = None, target: PyTree | None = None) -> tuple[PyTree, dict]:
        """Restore ``(state, meta)`` of ``step`` (default: the latest committed step).

        ``target`` has the saved state's structure; its leaves are concrete arrays or
        ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``), whose shardings, if any,
        place the restored arrays. Every leaf's shape and dtype must equal the stored
        one: a mismatch (or a leaf only one side has) raises
        :class:`CheckpointMismatchError` naming the path. With ``target=None`` the raw
        tree is returned unchecked (NamedTuples come back as lists/dicts).
        """
        step = self._resolve_step(step)
        if target is None:
            out = self._mngr.restore(
                step,
                args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardRestore(), _META: ocp.args.JsonRestore()}
                ),
            )
            return out[_STATE], out[_META]

        self._check_stored(step, target)
        abstract = jax.tree.map(_to_abstract, target)
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardRestore(abstract), _META: ocp.args.JsonRestore()}
            ),
        )
        state = out[_STATE]
        self._check_restored(step, state, target)
        return state, out[_META]

    def _mismatch(self, step: int, path: str, detail: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(
            f"checkpoint step {step} in {self.directory} does not match the restore "
            f"target at '{path}': {detail}"
        )

    def _check_stored(self, step: int, target: PyTree) -> None:
        """Compare the target against the stored metadata, leaf by leaf, before reading."""
        md = self._mngr.item_metadata(step)[_STATE]
        if md is None:
            raise FileNotFoundError(f"checkpoint step {step} in {self.directory} has no state")
        stored = dict(_flatten(getattr(md, "tree", md)))
        seen = set()
        for path, leaf in _flatten(target):
            shape, dtype = _spec(leaf, path, "target")
            if path not in stored:
                raise self._mismatch(step, path, "the target has this leaf, the checkpoint does not")
            seen.add(path)
            s_shape, s_dtype = tuple(stored[path].shape), np.dtype(stored[path].dtype)
            want_shape, want_dtype = _stored_spec(shape, dtype)
            if s_shape != want_shape:
                raise self._mismatch(
                    step, path, f"shape {s_shape} in the checkpoint, {shape} in the target"
                )
            if s_dtype != want_dtype:
                raise self._mismatch(
                    step,
                    path,
                    f"dtype {s_dtype.name} in the checkpoint, {_dtype_str(dtype)} in the target",
                )
        for path in stored:
            if path not in seen:
                raise self._mismatch(step, path, "the checkpoint has this leaf, the target does not")

    def _check_restored(self, step: int, state: PyTree, target: PyTree) -> None:
        """The restored tree must have the target's structure, shapes and dtypes."""
        got, want = _flatten(state), _flatten(target)
        for (gp, g), (wp, w) in zip(got, want):
            if gp != wp:
                raise self._mismatch(step, wp, f"restored tree has '{gp}' here instead")
            g_spec, w_spec = _spec(g, gp, "restored"), _spec(w, wp, "target")
            if g_spec[0] != w_spec[0] or not _same_dtype(g_spec[1], w_spec[1]):
                raise self._mismatch(
                    step,
                    wp,
                    f"restored {g_spec[0]} {_dtype_str(g_spec[1])}, "
                    f"target {w_spec[0]} {_dtype_str(w_spec[1])}",
                )
        if len(got) != len(want) or jax.tree.structure(state) != jax.tree.structure(target):
            n = min(len(got), len(want))
            path = (got[n:] or want[n:] or [("<root>", None)])[0][0]
            raise self._mismatch(step, path, "restored tree structure differs from the target")

    # -- lifecycle ---------------------------------------------------------------------
    def wait(self) -> None:
        """Block until an async save has been committed (:class:`DiskFullError` when the disk
        filled up meanwhile)."""
        with one_disk_full_error(self.directory, "saving a checkpoint"):
            self._mngr.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and deletions and release orbax resources."""
        self._mngr.close()

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
