"""Process-level settings for long CPU runs, and the format of the progress lines' durations.

``reuse_host_memory()``: on XLA:CPU every execution of a compiled step allocates its temporaries (3 GiB for the
PhotoGuard encoder step on the SD-1.5 VAE at 512 px) and frees them at the end. With glibc's defaults such
blocks are ``mmap``-ed and ``munmap``-ed each time, so every iteration page-faults and the kernel zeroes the
whole buffer again: about 0.9 M minor faults and 2-8 s of system time per iteration at 512 px on the 2-core dev
machine (``benchmarks/step_bench.py encoder --malloc``, docs/benchmarks.md). Serving large blocks from one
never-trimmed heap (``mallopt``: no ``mmap`` for blocks, no trimming, one arena) makes the second and later
iterations fault-free: the process keeps its peak resident size, which a protection job needs every iteration
anyway. Opt out with ``TDAE_MALLOC=default``. A no-op where glibc's ``mallopt`` is unavailable.

``format_duration`` (``h:mm:ss``) and ``Ticker`` (throttled ``i/n elapsed ETA`` lines) are what the commands
print for elapsed times and ETAs, so every log reads alike.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import time
from typing import Callable

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


def format_duration(seconds: float) -> str:
    """``seconds`` as ``h:mm:ss`` (``2437.4`` -> ``"0:40:37"``, rounded to the nearest second; hours are not
    wrapped at 24: ``"26:00:00"``). NaN or infinite (an ETA before any timed iteration) -> ``"?"``; a negative
    duration (clock skew) counts as 0. Every duration the experiments print goes through this, so logs read alike."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "?"
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Ticker:
    """Progress lines for a loop of ``total`` units: ``label i/total, elapsed h:mm:ss, ETA h:mm:ss[, extra]``,
    at the first unit, the last, and in between at most every ``every_s`` seconds (a slow loop prints every
    unit; a fast one is not flooded). The ETA uses the rate after the first unit, which includes compilation
    ("?" until then)."""

    def __init__(self, total: int, progress: Callable[[str], None], label: str, every_s: float = 5.0,
                 clock: Callable[[], float] = time.perf_counter):
        self.total, self.progress, self.label, self.every_s, self.clock = total, progress, label, every_s, clock
        self.start = clock()
        self.first = self.last = None
        self.done = 0

    def step(self, extra: str = "") -> None:
        """One more unit done."""
        self.done += 1
        self(self.done, extra)

    def __call__(self, done: int, extra: str = "") -> None:
        """``done`` units of ``total`` are done."""
        self.done, now = done, self.clock()
        if self.first is None:
            self.first = now
        rate = (now - self.first) / (done - 1) if done > 1 else float("nan")
        if self.last is not None and done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        remaining = 0.0 if done >= self.total else rate * (self.total - done)
        line = (f"{self.label} {done}/{self.total}, elapsed {format_duration(now - self.start)}, "
                f"ETA {format_duration(remaining)}")
        self.progress(line + (f", {extra}" if extra else ""))


def device_memory_bytes(device=None) -> tuple[int | None, str]:
    """``(bytes, what)``: the memory one compiled step may use on ``device`` (default: the first local one).

    GPU/TPU: the allocator's ``bytes_limit`` (``Device.memory_stats``). CPU (no device memory): the host's
    ``MemAvailable`` from ``/proc/meminfo``. ``(None, reason)`` when neither is known.
    """
    import jax

    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available host memory"
    except OSError:
        pass
    return None, "unknown"
