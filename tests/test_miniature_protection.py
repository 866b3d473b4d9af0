"""Protection really stops the edit, on pairs of their own: on held-out pairs of the editors' distribution
(world seed 4242: no table in docs/ and no training run uses it), the PhotoGuard diffusion attack (the ``pgd``
host, back-propagated through the editor's sampler) at 16/255 makes the surrogate's own edit fail: the
instructed-edit success at least halves, and the paired test against the clean edits (exact McNemar) says so.
The tables with intervals live in docs/reproduction.md (``python -m experiments.reproduce``)."""
import numpy as np
import pytest

from tdae_jax import models
from tdae_jax.data import io as dio
from tdae_jax.evaluate import stats
from tdae_jax.miniature import oracle, shipped
from tdae_jax.miniature import protection as mp
from tdae_jax.miniature import train as T

pytestmark = pytest.mark.skipif("ip2p_a" not in shipped.names(), reason="no shipped miniature editor")

SEED = 4242  # disjoint from docs/reproduction.md (31337), the editors' evaluations (1000) and training (0-12)


def _success(sur, images, pairs):
    return np.array([r["success"] for r in oracle.evaluate(mp.edit(sur, images, pairs["instruction"], 10),
                                                           pairs)["rows"]])


def test_intra_model_edit_success_drops_by_half():
    sur = models.load("ip2p", shipped.path("ip2p_a"))
    pairs = T.pairs(SEED, 16, 32, ("recolour", "remove"), 2)
    clean = _success(sur, pairs["source"], pairs)
    prot = mp.protect(sur, pairs["source"], pairs["instruction"], 16 / 255, "pgd", steps=40)
    assert dio.linf_uint8(prot, pairs["source"]) <= 16
    assert not np.array_equal(prot, pairs["source"])
    after = _success(sur, prot, pairs)
    d = stats.paired_diff_ci(clean, after)
    print(f"ip2p_a edit success on 16 pairs (seed {SEED}): clean {clean.mean():.3f}, protected {after.mean():.3f}, "
          f"{stats.fmt_paired(d)}")
    assert clean.mean() >= 0.6, clean.mean()  # the editor works on these pairs before protection
    assert after.mean() <= 0.5 * clean.mean(), (clean.mean(), after.mean())
    assert stats.verdict(d) == "lower", d
