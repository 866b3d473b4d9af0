"""The two ways a run stops as a whole (a failing *input* is a failed manifest row, never an exception).

``UsageError``: the run cannot start (flags, weights, inputs, a workdir made with other settings or in use by
another run); raised before anything is created in the workdir; the experiments exit with code 2.
``RunError``: the run started but cannot go on (the workdir became unwritable: disk full, quota, permissions);
the manifest on disk stays consistent (the image being written is not marked done, every file is written
atomically), so re-running the same command resumes once the problem is fixed; the experiments exit with code 1.
"""
from __future__ import annotations

import errno


class UsageError(ValueError):
    """The run cannot start (bad flags, weights, inputs or workdir): exit code 2."""


class RunError(RuntimeError):
    """The workdir could not be written while the run was going on: exit code 1, re-run to resume."""


def io_error(err: BaseException) -> OSError | None:
    """The ``OSError`` that caused ``err`` (itself, or one in its ``__cause__``/``__context__`` chain), or None.

    Libraries that write for us (orbax checkpoints) may wrap the original error; a full disk is still a full disk.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def write_failure(workdir, what: str, err: OSError) -> RunError:
    """A one-line :class:`RunError` for an ``OSError`` met while writing ``what`` in ``workdir``."""
    reason = err.strerror or str(err)
    code = f" ({errno.errorcode.get(err.errno, err.errno)})" if err.errno else ""
    return RunError(f"cannot write {what} in workdir {workdir}: {reason}{code}; nothing half-written was kept and "
                    "the manifest is consistent: fix the problem (free space, permissions) and re-run the same "
                    "command to resume")
