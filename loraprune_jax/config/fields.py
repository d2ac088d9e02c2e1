"""Config dataclasses from nested dicts and dotted-key updates: each value given the type of its
field (from the annotation), unknown keys and sections set to values refused, every mistake a
one-line :class:`ConfigError` naming the dotted key."""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import ConfigError, show


def apply_updates(cfg: Any, updates: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """``cfg`` (a config dataclass) as a dict with dotted-key updates applied (``{"prune.ratio":
    0.2}``), and the dotted keys set. Unknown keys are errors; a section's key (``prune``) takes a
    mapping of its keys or null (none), never a value."""
    data = cfg.to_dict()
    given: set[str] = set()
    for key, value in updates.items():
        _apply(cfg, data, key, value, given)
    return data, given


def _apply(cfg: Any, data: dict[str, Any], key: str, value: Any, given: set[str]) -> None:
    """Set dotted ``key`` of ``data`` (``cfg`` as a dict) to ``value``; a mapping given to a
    section sets its keys one by one. Adds the keys set to ``given``. What is a key and what a
    section comes from the dataclasses, not from ``data`` (whose values may be mappings)."""
    node, section, parts = data, cfg, key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = _field(section, part)
        if not dataclasses.is_dataclass(child):
            leaf = ".".join(parts[: i + 1]) if child is not _MISSING else None
            raise ConfigError(_unknown(cfg, key, leaf))
        node, section = node[part], child
    last = parts[-1]
    current = _field(section, last)
    if current is _MISSING:
        raise ConfigError(_unknown(cfg, key))
    if not dataclasses.is_dataclass(current):
        node[last] = value
        given.add(key)
        return
    if value is None:  # a section with nothing under it (``prune:`` in a file)
        return
    first = dataclasses.fields(current)[0].name
    if not isinstance(value, dict):
        raise ConfigError(f"{key} is a section; set its keys, e.g. {key}.{first}="
                          f"{getattr(current, first)}, not {key}={show(value)}")
    for sub, sub_value in value.items():
        if not isinstance(sub, str):
            raise ConfigError(f"{key}: key {show(sub)} is not a name; give {key}'s keys, e.g. "
                              f"{key}.{first}")
        _apply(cfg, data, f"{key}.{sub}", sub_value, given)


_MISSING = object()


def _field(obj: Any, name: str) -> Any:
    """Field ``name`` of dataclass ``obj``, or ``_MISSING`` when it has none by that name."""
    names = {f.name for f in dataclasses.fields(obj)}
    return getattr(obj, name) if name in names else _MISSING


def _unknown(cfg: Any, key: str, leaf: str | None = None) -> str:
    """The message for an unknown dotted ``key`` (``leaf``: the part of it that is a value)."""
    why = f" ({leaf} takes a value, not keys)" if leaf else ""
    return f"unknown config key {show(key)}{why}; known: {', '.join(known_keys(cfg))}"


def known_keys(cfg: Any, prefix: str = "") -> list[str]:
    """The dotted keys of config dataclass ``cfg``'s values (``prune.ratio``, ...)."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += known_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


_KINDS = {"bool": bool, "int": int, "float": float, "str": str}
_WANTED = {bool: "true or false", int: "a whole number", float: "a number", str: "text",
           tuple: "a list of text such as [a, b]"}


def _kind(annotation: Any, current: Any) -> tuple[type, bool]:
    """The type a field holds and whether it may be null, from its annotation (``"float | None"``;
    the modules use postponed annotations, so these are strings)."""
    parts = [p.strip() for p in str(annotation).split("|")]
    base = next((p for p in parts if p != "None"), "")
    kind = tuple if base.startswith("tuple") else _KINDS.get(base, type(current))
    return kind, "None" in parts


def _coerce(value: Any, current: Any, where: str, annotation: Any) -> Any:
    """Give a parsed value the type of field ``where`` (annotated ``annotation``, default
    ``current``), or raise ConfigError naming the key and the type it takes."""
    kind, optional = _kind(annotation, current)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} cannot be null; give {_WANTED.get(kind, kind.__name__)}")
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {show(value)}")
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float's range
            raise ConfigError(f"{where} is too large a number, got {show(value)}") from None
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(item, str) for item in items):
            raise ConfigError(f"{where} expects {_WANTED[tuple]}, got {show(value)}")
        return tuple(items)
    if kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where} expects {kind.__name__} ({_WANTED.get(kind, kind.__name__)}), "
                      f"got {show(value)}")


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """``cls`` from a nested dict of its fields (missing ones: defaults), types checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {show(data)}")
    default = cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [prefix + str(k) for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(map(show, sorted(unknown)))}; known: "
                          f"{', '.join(known_keys(default, prefix))}")
    kwargs = {}
    for name, value in data.items():
        current = getattr(default, name)
        if dataclasses.is_dataclass(current):
            kwargs[name] = build(type(current), value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, current, prefix + name, fields[name].type)
    return cls(**kwargs)
