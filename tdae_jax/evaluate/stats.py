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

Cells whose unit is a cluster with a continuous outcome (a customization study: per subject, the share of the
attacker's samples that reproduce it) are compared by :func:`paired_units_ci`: the same paired bootstrap over
units, with the exact sign-flip permutation test (Fisher 1935, §21; Good, *Permutation Tests*, 2005, §3.1) on the
per-unit differences in place of McNemar's.

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


def _interval(x: np.ndarray, n_boot: int, seed: int, level: float) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(x)`` over its units."""
    boots = x[_boot_indices(x.size, n_boot, seed)].mean(axis=1)
    q = (1.0 - level) / 2.0
    lo, hi = np.quantile(boots, [q, 1.0 - q])
    return float(lo), float(hi)


def _vector(x, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D vector, got shape {x.shape}")
    return x


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.shape != b64.shape or a64.ndim != 1 or a64.size == 0:
        raise ValueError(f"paired outcomes must be equal non-empty 1-D vectors: {a64.shape} vs {b64.shape}")
    return a64, b64


def rate_ci(outcomes, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> Rate:
    """Rate of ``outcomes`` (bool ``[n]``) with a percentile bootstrap interval over pairs."""
    x = _vector(outcomes, "outcomes")
    return Rate(float(x.mean()), *_interval(x, n_boot, seed, level), int(x.sum()), int(x.size))


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
    a64, b64 = _pair(a, b)
    d = b64 - a64
    p, n01, n10 = mcnemar_exact(a, b)
    return Paired(float(d.mean()), *_interval(d, n_boot, seed, level), p, n01, n10, int(d.size))


def sign_flip_p(d, exact_max: int = 16, n_mc: int = 100_000, seed: int = 0) -> float:
    """Two-sided p of the paired sign-flip permutation test on differences ``d [n]``: the share of sign
    assignments whose |mean| is at least the observed one (exact up to ``exact_max`` units, else ``n_mc``
    Monte-Carlo draws with the observed assignment counted, Phipson & Smyth 2010)."""
    d = np.asarray(d, np.float64)
    obs = abs(d.mean()) - 1e-12
    if d.size <= exact_max:
        signs = 1 - 2 * ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1)
        return float(np.mean(np.abs(signs @ d) / d.size >= obs))
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_mc, d.size))
    return float((1 + np.sum(np.abs(signs @ d) / d.size >= obs)) / (n_mc + 1))


def paired_units_ci(a, b, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> Paired:
    """``mean(b - a)`` over units with continuous outcomes in [0, 1] (e.g. per-subject rates), a paired bootstrap
    interval over units and the sign-flip p; ``n01`` / ``n10`` count the units where b is above / below a."""
    a64, b64 = _pair(a, b)
    d = b64 - a64
    return Paired(float(d.mean()), *_interval(d, n_boot, seed, level), sign_flip_p(d, seed=seed),
                  int((d > 0).sum()), int((d < 0).sum()), int(d.size))


def mean_ci(x, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> Rate:
    """Mean of per-unit values in [0, 1] with a percentile bootstrap interval over units (``k`` = units > 0)."""
    x = _vector(x, "values")
    return Rate(float(x.mean()), *_interval(x, n_boot, seed, level), int((x > 0).sum()), int(x.size))


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
