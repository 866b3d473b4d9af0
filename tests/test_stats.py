"""The study statistics: exact McNemar against the binomial test, bootstrap intervals, verdict wording, the
sign-flip test and paired intervals over units (subjects)."""
import itertools
import math

import numpy as np
import pytest

from tdae_jax.evaluate import stats


def test_mcnemar_exact_matches_binomial_tail():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.random(60) < 0.6, rng.random(60) < 0.4
        p, n01, n10 = stats.mcnemar_exact(a, b)
        assert n01 == int((~a & b).sum()) and n10 == int((a & ~b).sum())
        ref = scipy_stats.binomtest(min(n01, n10), n01 + n10, 0.5).pvalue if n01 + n10 else 1.0
        assert p == pytest.approx(ref, rel=1e-9)


def test_mcnemar_hand_cases():
    a = np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
    b = np.zeros(8, bool)  # 5 discordant pairs, all one way: p = 2 * 0.5**5
    assert stats.mcnemar_exact(a, b)[0] == pytest.approx(2 * 0.5 ** 5)
    assert stats.mcnemar_exact(a, a)[0] == 1.0  # no discordant pair


def test_rate_ci_brackets_rate_and_is_reproducible():
    x = np.r_[np.ones(30, bool), np.zeros(98, bool)]
    r = stats.rate_ci(x)
    assert (r.k, r.n) == (30, 128) and r.lo < r.rate < r.hi
    # a normal-approximation interval of width +-1.96 sqrt(p(1-p)/n) is the bootstrap's limit
    half = 1.96 * math.sqrt(r.rate * (1 - r.rate) / r.n)
    assert r.hi - r.lo == pytest.approx(2 * half, rel=0.15)
    assert stats.rate_ci(x) == r


def test_paired_interval_and_verdict():
    a = np.r_[np.ones(100, bool), np.zeros(28, bool)]
    b = a.copy()
    b[:50] = False  # 50 pairs lose the edit, none gain it
    d = stats.paired_diff_ci(a, b)
    assert d.diff == pytest.approx(-50 / 128) and d.hi < 0 and d.p < 1e-10
    assert stats.verdict(d) == "lower"
    c = b.copy()
    c[100:102] = True  # 2 gained, 0 lost vs b: no evidence
    assert stats.verdict(stats.paired_diff_ci(b, c)) == "no measurable effect"
    with pytest.raises(ValueError):
        stats.paired_diff_ci(a, b[:-1])


def test_sign_flip_p_is_exact():
    d = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    assert stats.sign_flip_p(d) == pytest.approx(2 / 32)  # only all-plus and all-minus reach |mean|
    d = np.array([0.5, -0.1, 0.2, 0.0])
    brute = np.mean([abs(np.dot(s, d)) >= abs(d.sum()) - 1e-12 for s in itertools.product([-1, 1], repeat=4)])
    assert stats.sign_flip_p(d) == pytest.approx(brute)
    assert stats.sign_flip_p(np.zeros(6)) == 1.0
    big = np.full(20, 0.3)  # Monte-Carlo branch: (1 + hits) / (n_mc + 1), hits ~ 2 / 2^20 * n_mc
    assert stats.sign_flip_p(big, n_mc=1000) == pytest.approx(1 / 1001, abs=2e-3)


def test_paired_units_ci():
    a = np.array([0.6, 0.5, 0.9, 0.4, 0.7, 0.8])
    c = stats.paired_units_ci(a, a - 0.3)
    assert c.diff == pytest.approx(-0.3) and c.lo == pytest.approx(-0.3) and c.hi == pytest.approx(-0.3)
    assert (c.n01, c.n10, c.n) == (0, 6, 6) and c.p == pytest.approx(2 / 64)
    assert stats.verdict(c) == "lower"
    r = stats.mean_ci(a)
    assert r.lo <= r.rate <= r.hi and r.n == 6
    with pytest.raises(ValueError):
        stats.paired_units_ci(a, a[:3])
