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


def atomic_write_bytes(path, data: bytes) -> None:
    """Writes ``data`` to a temp file in the same folder, fsyncs, then ``os.replace`` onto ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
