"""Process-level settings for long CPU runs.

``reuse_host_memory()``: on XLA:CPU every execution of a compiled step allocates its temporaries (3 GiB for the
PhotoGuard encoder step on the SD-1.5 VAE at 512 px) and frees them at the end. With glibc's defaults such
blocks are ``mmap``-ed and ``munmap``-ed each time, so every iteration page-faults and the kernel zeroes the
whole buffer again: about 0.9 M minor faults and 2-8 s of system time per iteration at 512 px on the 2-core dev
machine (``benchmarks/step_bench.py encoder --malloc``, docs/benchmarks.md). Serving large blocks from one
never-trimmed heap (``mallopt``: no ``mmap`` for blocks, no trimming, one arena) makes the second and later
iterations fault-free: the process keeps its peak resident size, which a protection job needs every iteration
anyway. Opt out with ``TDAE_MALLOC=default``. A no-op where glibc's ``mallopt`` is unavailable.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>
_applied = False


def reuse_host_memory() -> bool:
    """Keep freed host memory for reuse (see the module docstring). Returns whether it was applied."""
    global _applied
    if _applied:
        return True
    if os.environ.get("TDAE_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, or no libc found
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in
             ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1)))  # -1: never trim (glibc manual)
    if ok:
        _applied = True
        log.debug("glibc malloc: no mmap for large blocks, no trimming, one arena")
    return ok
