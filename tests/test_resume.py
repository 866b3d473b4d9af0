"""A run interrupted after iteration j and resumed from its orbax checkpoint is bit-identical to an
uninterrupted run; AdvDM draws (t, eps) from the derived keys every step: keys derive from image id and step, never from call order."""
import numpy as np
import pytest

from tdae_jax import checkpoint, configs, models, objectives, prng
from tdae_jax.defenses import tdae
from tdae_jax.parallel import mesh as meshlib
from tdae_jax.protect import Protector

STEPS = 6


class Stop(Exception):
    pass


def _make(sur, n_dev):
    def build(model):
        loss_fn = objectives.make_objective("advdm", model, configs.Objective(name="advdm", timesteps=2))
        return tdae.make_step(loss_fn, budget=configs.Budget(8 / 255), pgd=configs.PGD(step_size=1 / 255, steps=STEPS),
                              fdm=configs.FDM(mode="off"))

    return Protector(build, sur, meshlib.make_mesh(n_dev), 2)


def test_resume_bit_identical(tmp_path):
    stop_after = 3
    sur = models.tiny("ip2p")
    rng = np.random.default_rng(0)
    ids = ["a", "b"]
    batch = {"x0": (rng.integers(0, 256, (2, 32, 32, 3)) / 255.0).astype(np.float32), "uid": prng.uids(ids)}
    emb = np.asarray(sur.embed_text(["make it red", "add snow"]))
    batch.update(emb=emb, uncond=np.asarray(sur.embed_text(["", ""])))
    key = prng.base_key(3)
    meta = {"fingerprint": "f1", "ids": ids}

    ref, ref_hist, _ = _make(sur, 2).run(batch, 2, STEPS, key)

    ck = checkpoint.UnitCheckpointer(tmp_path / "ck", every=2)

    def boom(it, info):
        if it == stop_after:
            raise Stop

    with pytest.raises(Stop):
        _make(sur, 2).run(batch, 2, STEPS, key, ckpt=ck, meta=meta, on_iter=boom)
    ck.close()
    ck2 = checkpoint.UnitCheckpointer(tmp_path / "ck", every=2)
    p = _make(sur, 2)
    out, hist, resumed = p.run(batch, 2, STEPS, key, ckpt=ck2, meta=meta)
    assert resumed == (stop_after // 2) * 2
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(hist["loss"], ref_hist["loss"])
    # a checkpoint made under other flags (another fingerprint) is not resumed
    abstract = checkpoint.abstract_like(p.abstract_state, p.state_sh)
    step, state, _ = ck2.restore(abstract, expect_meta=meta)
    ck2.maybe_save(100, state, meta, force=True)
    assert ck2.restore(abstract, expect_meta={"fingerprint": "other"}) is None
    assert ck2.restore(abstract, expect_meta=meta)[0] == 100
