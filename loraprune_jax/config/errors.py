"""The project's error for bad config input, and how values are quoted in its messages."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """Bad config input (a ``key=value`` argument, a YAML config file, a field's value): one line
    that names the key or the file and says what would be accepted.

    A ``ValueError``, so callers that already report those (the CLI: ``error: ...``, exit 2)
    need nothing new."""


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: a user's value quoted on one line (``repr``
    escapes newlines and unprintable characters) however long or odd it is."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long for str()
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def label(text: str) -> str:
    """A key or file name as given when it prints on one line, else quoted like :func:`show`."""
    return text if text.isprintable() and text.strip() == text and text else show(text)
