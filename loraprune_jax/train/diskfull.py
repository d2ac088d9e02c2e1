"""A full disk as one error: :class:`DiskFullError`, :func:`no_space_left` to recognise one in
whatever orbax, tensorstore or safetensors raised, and :func:`one_disk_full_error` to keep the
noise of orbax's failed writes (log records from its writer threads, tracebacks of writes that
finish after their event loop closed) off stderr."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any


class DiskFullError(OSError):
    """No space left on the device while writing ``path`` (``errno.ENOSPC``); one line saying
    what was being written and, in ``then``, how to go on."""

    def __init__(self, path: str | os.PathLike[str], doing: str, then: str = "") -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
        self.doing, self.then = doing, then

    def __str__(self) -> str:
        then = f"; {self.then}" if self.then else ""
        return f"{self.filename}: no space left on device while {self.doing}{then}"

    def __reduce__(self):  # keep pickling working (OSError's would pass errno, strerror)
        return (type(self), (self.filename, self.doing, self.then))


_NO_SPACE = re.compile(r"No space left on device|os error 28\b|os_error_code='28'")


def no_space_left(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full disk: ``ENOSPC``, or the
    message tensorstore and safetensors give for it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "errno", None) == errno.ENOSPC or _NO_SPACE.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class _DropDiskFull(logging.Filter):
    """Drops log records of a write that ran out of space (orbax's writer threads log their
    exceptions, asyncio its unretrieved futures): the save raises it as one DiskFullError."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        return not (_NO_SPACE.search(record.getMessage()) or (err and no_space_left(err)))


class _Quiet:
    """While a save runs, and for good once one ran out of space, the noise of orbax's abandoned
    writes stays off stderr: their log records (:class:`_DropDiskFull`) and the bare
    ``RuntimeError: Event loop is closed`` tracebacks that tensorstore reports (through
    ``sys.unraisablehook``) when a write finishes after orbax closed its event loop."""

    def __init__(self) -> None:
        self.filter, self.depth, self.for_good, self.hook = _DropDiskFull(), 0, False, None

    def unraisablehook(self, unraisable: Any) -> None:
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            (self.hook or sys.__unraisablehook__)(unraisable)

    def enter(self) -> None:
        self.depth += 1
        if self.depth == 1 and not self.for_good:
            for name in ("absl", "asyncio"):
                logging.getLogger(name).addFilter(self.filter)
            self.hook, sys.unraisablehook = sys.unraisablehook, self.unraisablehook

    def exit(self, disk_full: bool) -> None:
        self.depth -= 1
        self.for_good |= disk_full
        if self.depth == 0 and not self.for_good:
            for name in ("absl", "asyncio"):
                logging.getLogger(name).removeFilter(self.filter)
            if sys.unraisablehook == self.unraisablehook:
                sys.unraisablehook = self.hook


_QUIET = _Quiet()
_WRITERS_TIMEOUT_S = 10.0  # at most this long for a failed save's writer threads to end


def _join_new_threads(old: set[threading.Thread], timeout: float) -> None:
    """Wait (at most ``timeout`` seconds) until the threads not in ``old`` have ended."""
    deadline = time.monotonic() + timeout
    while (new := set(threading.enumerate()) - old) and time.monotonic() < deadline:
        try:  # the plain join: orbax's threads override it to raise their exception
            threading.Thread.join(next(iter(new)), min(0.1, max(deadline - time.monotonic(), 0)))
        except RuntimeError:  # not started yet
            time.sleep(0.01)


@contextlib.contextmanager
def one_disk_full_error(directory: str, doing: str) -> Iterator[None]:
    """Run an orbax save (``doing``, into ``directory``): a full disk comes out as one
    :class:`DiskFullError` and nothing else, once the writer threads the save started have
    ended (so none dies noisily at interpreter exit)."""
    _QUIET.enter()
    before, full = set(threading.enumerate()), False
    try:
        yield
    except Exception as e:
        full = no_space_left(e)
        if isinstance(e, DiskFullError) or not full:
            raise
        _join_new_threads(before | {threading.current_thread()}, _WRITERS_TIMEOUT_S)
        raise DiskFullError(directory, doing) from e
    finally:
        _QUIET.exit(full)


__all__ = ["DiskFullError", "no_space_left", "one_disk_full_error"]
