"""One run per workdir: a lock file naming its holder (pid, host, start time).

Restates the pid lock file of rtorrent (rakshasa/rtorrent ``src/utils/lockfile.cc``: ``Lockfile::try_lock``,
``is_stale``, ``locked_by``): the file is created with ``O_CREAT | O_EXCL`` (so two runs cannot both create it)
and holds the holder's host name and pid; a lock is *stale* only when it was written on this host and no process
with that pid is alive (``kill(pid, 0)`` fails with ESRCH; EPERM means alive). A stale lock is taken over with a
warning; a live one, or one from another host (its pid cannot be checked from here), refuses the run. zc.lockfile
(``content_template='{pid};{hostname}'``) records the same two fields for the same reason: pids alone are
ambiguous across machines and containers.

The file's content is JSON ``{pid, host, started, argv}``; it is created with mode 0o666, so the process umask
decides its permissions like every other output. Known limit (shared with rtorrent's): two runs that find the
same stale lock at the same instant can both take it over.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
from pathlib import Path

from tdae_jax.runs.errors import UsageError

log = logging.getLogger("tdae_jax")


def holder(path: Path) -> dict | None:
    """The lock's recorded holder, ``{}`` for an unreadable lock file, None when there is no lock."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
        return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else {}
    except ValueError:
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OSError:
        return True
    return True


def is_stale(info: dict) -> bool:
    """Written on this host by a process that is gone."""
    return bool(info) and info.get("host") == socket.gethostname() and not _alive(int(info["pid"]))


def describe(info: dict, path: Path) -> str:
    if not info:
        return f"an unreadable lock file {path} (remove it if no run is using this workdir)"
    return (f"pid {info['pid']} on host {info.get('host', '?')} (started {info.get('started', '?')}; lock file "
            f"{path})")


def check(path: Path, workdir) -> None:
    """Read-only: ``UsageError`` when a live run holds the lock (a stale lock is left for :func:`acquire`)."""
    info = holder(path)
    if info is not None and not is_stale(info):
        raise UsageError(f"workdir {workdir} is in use by {describe(info, path)}; wait for that run to finish or "
                         "use another --workdir")


def _create(path: Path) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "argv": sys.argv}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def acquire(path: Path, workdir) -> None:
    """Takes the lock (over a stale one, with a warning). ``UsageError`` when a live run holds it."""
    path = Path(path)
    for _ in range(2):
        try:
            _create(path)
            return
        except FileExistsError:
            info = holder(path)
            if info is None:  # released in the meantime
                continue
            if not is_stale(info):
                break
            log.warning("workdir %s: taking over the stale lock of %s: that process is gone", workdir,
                        describe(info, path))
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    check(path, workdir)
    raise UsageError(f"workdir {workdir}: could not take the lock {path} (another run took it at the same time)")


def release(path: Path) -> None:
    """Removes the lock if this process holds it."""
    info = holder(path)
    if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()


@contextlib.contextmanager
def held(path: Path, workdir):
    """``with held(lock_path, workdir):`` the body runs holding the lock; released on exit, also on exceptions."""
    acquire(path, workdir)
    try:
        yield
    finally:
        release(path)
