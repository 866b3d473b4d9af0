"""Statistics for protection studies: per-cell rates with intervals and paired comparisons.

A study cell is a vector of per-pair binary outcomes (the oracle says the edit succeeded or not). Two cells
measured on the **same pairs** (same scenes, instructions and editor noise) are compared pairwise:

- :func:`rate_ci`: the success rate with a 95 % percentile bootstrap interval (Efron & Tibshirani 1993, §13.3),
  resampling pairs.
- :func:`paired_diff_ci`: the mean paired difference ``mean(b - a)`` with a 95 % paired bootstrap interval
  (the same resampled pair indices for both cells).
- :func:`mcnemar_exact`: the exact two-sided McNemar test (McNemar 1947; the exact binomial form of
  Fagerland, Lydersen & Laake, BMC Med. Res. Methodol. 2013): under H0 the discordant pairs split 50/50, so
  ``p = min(1, 2 * P[Binom(n01 + n10, 1/2) <= min(n01, n10)])``.

A difference is "supported" (:func:`verdict`) only when the paired interval excludes 0 **and** McNemar's p
is below alpha; otherwise the text says "no measurable effect". Resampling draws come from a fixed seed, so
a table is reproducible bit for bit.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

N_BOOT = 10_000


class Rate(NamedTuple):
    """Success rate of one cell: ``k`` of ``n`` pairs, ``lo..hi`` the 95 % bootstrap interval."""

    rate: float
    lo: float
    hi: float
    k: int
    n: int


class Paired(NamedTuple):
    """``b - a`` on the same pairs: mean difference, its 95 % paired bootstrap interval, McNemar's exact p and
    the discordant counts (``n01``: a failed, b succeeded; ``n10``: a succeeded, b failed)."""

    diff: float
    lo: float
    hi: float
    p: float
    n01: int
    n10: int
    n: int


def _boot_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def rate_ci(outcomes, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> Rate:
    """Rate of ``outcomes`` (bool ``[n]``) with a percentile bootstrap interval over pairs."""
    x = np.asarray(outcomes, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"outcomes must be a non-empty 1-D vector, got shape {x.shape}")
    boots = x[_boot_indices(x.size, n_boot, seed)].mean(axis=1)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(boots, [a, 1.0 - a])
    return Rate(float(x.mean()), float(lo), float(hi), int(x.sum()), int(x.size))


def mcnemar_exact(a, b) -> tuple[float, int, int]:
    """Exact two-sided McNemar p for paired binary outcomes ``a``, ``b``; returns ``(p, n01, n10)``."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes differ in shape: {a.shape} vs {b.shape}")
    n01, n10 = int((~a & b).sum()), int((a & ~b).sum())
    m = n01 + n10
    if m == 0:
        return 1.0, n01, n10
    tail = sum(math.comb(m, i) for i in range(min(n01, n10) + 1)) / 2.0 ** m
    return float(min(1.0, 2.0 * tail)), n01, n10


def paired_diff_ci(a, b, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> Paired:
    """``mean(b) - mean(a)`` on the same pairs with a paired bootstrap interval and McNemar's exact p."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.shape != b64.shape or a64.ndim != 1 or a64.size == 0:
        raise ValueError(f"paired outcomes must be equal non-empty 1-D vectors: {a64.shape} vs {b64.shape}")
    d = b64 - a64
    boots = d[_boot_indices(d.size, n_boot, seed)].mean(axis=1)
    q = (1.0 - level) / 2.0
    lo, hi = np.quantile(boots, [q, 1.0 - q])
    p, n01, n10 = mcnemar_exact(a, b)
    return Paired(float(d.mean()), float(lo), float(hi), p, n01, n10, int(d.size))


def verdict(c: Paired, alpha: float = 0.05) -> str:
    """Words a table may use for ``c``: "lower" / "higher" only when the interval excludes 0 and p < alpha."""
    if c.p < alpha and (c.hi < 0 or c.lo > 0):
        return "lower" if c.diff < 0 else "higher"
    return "no measurable effect"


def fmt_rate(r: Rate) -> str:
    return f"{100 * r.rate:.1f} [{100 * r.lo:.1f}, {100 * r.hi:.1f}]"


def fmt_paired(c: Paired) -> str:
    """``-12.5 [-20.3, -4.7] pp, p=0.003`` (percentage points)."""
    return f"{100 * c.diff:+.1f} [{100 * c.lo:+.1f}, {100 * c.hi:+.1f}] pp, p={_fmt_p(c.p)}"


def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"
