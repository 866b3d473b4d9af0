"""File-system primitives shared by ``data/io.py`` and ``data/manifest.py`` (both import this module, neither
imports the other's internals): the base error type of user data and the atomic write every output uses
(docs/design.md convention 7: outputs are written atomically). No jax, no Pillow.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


class DataError(ValueError):
    """A problem with the user's data or paths; the message says what and where."""


def _umask_from_proc() -> int | None:
    """The process umask from ``/proc/self/status`` (Linux >= 4.7), or None where that line is not available."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_at_import() -> int:
    """``os.umask`` can only be read by setting it: set and restored once, at import (before any worker thread
    of this library exists), for systems without ``/proc``."""
    old = os.umask(0o022)
    os.umask(old)
    return old


_IMPORT_UMASK = _umask_from_proc()
if _IMPORT_UMASK is None:
    _IMPORT_UMASK = _umask_at_import()


def new_file_mode() -> int:
    """Permission bits of a new output file: ``0o666 & ~umask``, as ``open(path, "w")`` would give.

    The umask is read from ``/proc/self/status`` at each call (no race: nothing is changed), else the value read
    once at import is used (``os.umask`` set-and-restore, racy only while other threads create files).
    ``tempfile.mkstemp`` alone would leave every output at 0600 whatever the user's umask.
    """
    mask = _umask_from_proc()
    return 0o666 & ~(_IMPORT_UMASK if mask is None else mask)


def atomic_write_bytes(path, data: bytes) -> None:
    """Writes ``data`` to a temp file in the same folder, fsyncs, then ``os.replace`` onto ``path``.

    The file gets the mode a plain ``open(path, "w")`` would give (:func:`new_file_mode`: ``0o666 & ~umask``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), new_file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
