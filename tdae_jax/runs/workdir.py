"""The workdir contract of every protection command (docs/design.md convention 8).

Layout: ``protected/<id>.png``, ``curves/<id>.json``, ``manifest.json`` (``manifest.p<k>.json`` per process of a
multi-process run), ``metrics.jsonl``/``metrics.csv``, ``config.json``, ``report.html`` + ``report_assets/``,
``git_revision.txt``, ``ckpt/`` while a batch is in flight, and ``run.lock`` (``run.p<k>.lock``) while a run holds
it (runs/lock.py). Every file goes through ``data/io.py``'s atomic writers, which follow the process umask.

Order of a run, in the manner of Flax's ``train_and_evaluate`` (google/flax ``examples/imagenet/train.py``: set up,
restore, loop, write), with every refusal first:

1. :meth:`Workdir.preflight` (read-only): a workdir that is a file, a live lock, or a manifest that records other
   settings is a ``UsageError`` naming the holder or each difference (``budget.eps: 0.0314 -> 0.0627``). Nothing is
   created in the workdir before this point (nor before the caller's other checks and the surrogate's loading).
2. :meth:`Workdir.open` creates the folder, takes the lock, and with ``overwrite`` only then removes the previous
   outputs (so a refused run never deletes anything); it yields the manifest and releases the lock on exit.
3. Writes that fail with an ``OSError`` (disk full, quota, permissions) become one :class:`RunError` line.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
from pathlib import Path

from tdae_jax.data import io as dio
from tdae_jax.data.manifest import DataError, Manifest, read_meta, settings_diff
from tdae_jax.parallel import multihost
from tdae_jax.runs import lock
from tdae_jax.runs.errors import UsageError, write_failure

log = logging.getLogger("tdae_jax")
RUN_FILES = ("metrics.jsonl", "metrics.csv", "report.html", "config.json")  # removed by overwrite
RUN_DIRS = ("report_assets", "ckpt", "curves")


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - not a git checkout (installed package)
        return "unknown"


class Writes:
    """Writes under ``self.root`` whose ``OSError`` becomes a one-line :class:`RunError` (every output folder)."""

    root: Path

    @contextlib.contextmanager
    def writing(self, what: str):
        """``with wd.writing("protected/a.png"):`` an ``OSError`` inside becomes a one-line :class:`RunError`."""
        try:
            yield
        except OSError as e:
            raise write_failure(self.root, what, e) from e

    def write_bytes(self, relpath: str, data: bytes) -> Path:
        """Atomic write of a workdir file (folders created); ``OSError`` -> ``RunError``."""
        path = self.root / relpath
        with self.writing(relpath):
            path.parent.mkdir(parents=True, exist_ok=True)
            dio.atomic_write_bytes(path, data)
        return path


class Workdir(Writes):
    """Paths and lifecycle of one process's view of a workdir."""

    def __init__(self, path, proc: multihost.ProcessInfo | None = None):
        self.root = Path(path).expanduser().resolve()  # relative: relative to the current directory
        self.proc = proc or multihost.info()
        one = self.proc.count == 1
        self.manifest_path = self.root / ("manifest.json" if one else f"manifest.p{self.proc.index}.json")
        self.lock_path = self.root / ("run.lock" if one else f"run.p{self.proc.index}.lock")
        self.protected = self.root / "protected"
        self.curves = self.root / "curves"
        self.ckpt = self.root / "ckpt"

    def preflight(self, settings: dict, *, overwrite: bool = False) -> None:
        """Read-only checks (``UsageError``): the workdir is usable, unlocked, and made with ``settings``."""
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"workdir {self.root} exists and is not a folder")
        lock.check(self.lock_path, self.root)
        if overwrite:
            return
        try:
            old = read_meta(self.manifest_path)
        except DataError as e:
            raise UsageError(str(e)) from e
        diff = settings_diff(old, settings) if old else []  # {}: an older manifest without settings, adopted
        if diff:
            raise UsageError(f"workdir {self.root} holds outputs made with other settings ({'; '.join(diff)}); "
                             "re-run with the original settings to resume, use another --workdir, or --overwrite "
                             "to start this one afresh")

    @contextlib.contextmanager
    def open(self, settings: dict, *, overwrite: bool = False, revision: str | None = None):
        """Creates the workdir, takes the lock, clears it with ``overwrite``; yields the manifest (settings
        recorded). The lock is released on exit, also on an exception."""
        with self.writing("the workdir folder"):
            self.root.mkdir(parents=True, exist_ok=True)
        with self.writing(f"the lock file {self.lock_path.name}"):
            lock.acquire(self.lock_path, self.root)
        try:
            with self.writing("the workdir"):
                if overwrite:
                    self.clear()
                self.protected.mkdir(exist_ok=True)
                if self.proc.is_main:
                    rev = (revision or git_revision()) + "\n"
                    dio.atomic_write_bytes(self.root / "git_revision.txt", rev.encode())
                try:
                    manifest = Manifest(self.manifest_path, meta=settings)
                except DataError as e:  # changed between preflight and lock
                    raise UsageError(str(e)) from e
            yield manifest
        finally:
            lock.release(self.lock_path)

    def clear(self) -> None:
        """``overwrite``: removes the previous run's outputs (called with the lock held; originals are never here)."""
        old = [p for p in self.protected.glob("*.png")] if self.protected.is_dir() else []
        if old:
            log.warning("--overwrite: removing %d protected image(s) of the previous run in %s", len(old), self.root)
        for p in old + [self.root / f for f in RUN_FILES] + [self.manifest_path]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        for d in RUN_DIRS:
            shutil.rmtree(self.root / d, ignore_errors=True)
        multihost.barrier("tdae_jax/runs/overwrite", self.proc)  # no process writes before every one has cleared

