"""A run's config from its sources: defaults, then a YAML file, then ``key=value`` arguments.

Every mistake in them is a :class:`ConfigError` of one line that names the file (with line and
column) or the key, and says what would be accepted; nothing else escapes. YAML here differs from
``yaml.safe_load`` in two ways: ``2:4`` (an N:M pattern) stays text instead of YAML 1.1's
base-60 integer 124, and a key given twice in one mapping is an error (PyYAML keeps the last
silently, so a second ``prune:`` section would drop the first one's keys).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from .errors import ConfigError, label, show
from .run import VISION_MODELS, ClassifierConfig, RunConfig

# what a value may be, for messages about values that are not YAML
VALUE_HINT = ("give a number, true/false, null, text or a list [a, b]; quote text that starts with "
              "@, ` or a quote")
FILE_HINT = "a config file is YAML: key: value lines, indented with spaces"


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with the two differences in the module docstring."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # merged keys may be overridden; unhashable keys are refused below
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {show(key)} is given twice; give each key once",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _int_or_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    value = loader.construct_scalar(node)
    if ":" in value:
        return value
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:int", _int_or_text)


def yaml_load(text: str) -> Any:
    """``text`` parsed as one YAML document (see the module docstring); a document that does not
    parse raises ConfigError ``"line L, column C: problem"``."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem, context = (" ".join(str(part or "").split()) for part in (e.problem, e.context))
        if context.startswith("while"):  # "expected ',' or ']' (while parsing a flow sequence)"
            problem = f"{problem} ({context})" if problem else context
        else:  # "expected a single document in the stream but found another document"
            problem = f"{context} {problem}".strip()
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{where}{problem or 'not YAML'}") from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (a control character)
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise ConfigError(f"line {line}, column {column}: character {show(chr(e.character))} is not "
                          "allowed in YAML") from None
    except RecursionError:
        raise ConfigError("nested too deeply") from None
    except (yaml.YAMLError, ValueError, OverflowError) as e:  # e.g. the date 2024-13-45
        raise ConfigError(" ".join(str(e).split()) or type(e).__name__) from None


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs as a dict, values parsed as YAML (``0.2``, ``true``, ``[q, v]``,
    ``2:4``, ``{ratio: 0.2}`` for a section); an empty value is the empty text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"expected key=value such as prune.ratio=0.2, got {show(item)}")
        try:
            out[key] = yaml_load(value) if value.strip() else ""
        except ConfigError as e:
            raise ConfigError(f"{label(key)}={show(value)} is not a YAML value ({e}); {VALUE_HINT}, "
                              f"e.g. {label(key)}=\"'@text'\"") from None
    return out


def flatten(tree: dict[Any, Any], prefix: str = "", levels: int = 2) -> dict[str, Any]:
    """Nested mapping -> dotted keys (``{"prune": {"ratio": 0.2}}`` -> ``{"prune.ratio": 0.2}``).

    Keys must be text. Only ``levels`` levels are opened (config keys are at most
    ``section.key``): a deeper mapping stays a value, which the config then refuses, so a YAML
    alias that contains itself cannot recurse forever."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if not isinstance(key, str):
            raise ConfigError(f"key {show(key)}{' under ' + label(prefix[:-1]) if prefix else ''} is not "
                              "a name; config keys are names such as prune.ratio")
        if isinstance(value, dict) and levels > 1:
            out.update(flatten(value, f"{prefix}{key}.", levels - 1))
        else:
            out[prefix + key] = value
    return out


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The dotted keys of a YAML config file (nested or dotted keys); an empty file sets none."""
    name = label(os.fspath(path))
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such config file; give the path of a YAML file") from None
    except IsADirectoryError:
        raise ConfigError(f"{name}: a directory, not a config file; give the path of a YAML file") from None
    except (OSError, ValueError) as e:  # permissions, a name with a NUL byte, ...
        why = getattr(e, "strerror", None) or e
        raise ConfigError(f"{name}: cannot read the config file ({why})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          "save the config file as UTF-8") from None
    try:
        loaded = yaml_load(text)
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}; {FILE_HINT}") from None
    if loaded is None:  # empty, or only comments
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{name}: expected a mapping of config keys (e.g. prune.ratio: 0.2), got "
                          f"{show(loaded)}")
    try:
        return flatten(loaded)
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None


def build_run_config(config_file: str | os.PathLike[str] | None,
                     overrides: Sequence[str]) -> RunConfig | ClassifierConfig:
    """RunConfig from defaults, then a YAML file, then ``key=value`` overrides (a
    ClassifierConfig when ``model`` is one of the bundled image classifiers); an empty ``out``
    becomes ``runs/<model>-<criterion>-<ratio>-<time>``."""
    updates = read_config_file(config_file) if config_file else {}
    updates.update(parse_overrides(overrides))
    if updates.get("model") in VISION_MODELS:  # an image classifier: its own config
        cfg = ClassifierConfig().override(updates)
        if not cfg.out:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            cfg = cfg.override({"out": f"runs/{cfg.model}-{cfg.prune.criterion}-{cfg.prune.ratio:g}-{stamp}"})
        return cfg
    cfg = RunConfig().override(updates)
    if not cfg.out:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = Path(str(cfg.model)).name or "model"
        p = cfg.prune
        what = {"structured": f"{p.ratio:g}", "unstructured": f"unstructured-{p.ratio:g}",
                "nm": "nm" + p.nm.replace(":", "-")}[p.granularity]
        cfg = cfg.override({"out": f"runs/{name}-{p.criterion}-{what}-{stamp}"})
    return cfg


__all__ = ["build_run_config", "flatten", "parse_overrides", "read_config_file", "yaml_load"]
