"""The PhotoGuard encoder defense through the compiled, sharded Protector on the tiny surrogate.

Checked: 8 forced CPU devices == 1 device; a batch of 8 == 8 batches of 1; one trace for the
whole run; the budget holds; the loss decreases.
"""
import jax
import numpy as np
import pytest

from tdae_jax import configs, models, objectives, prng
from tdae_jax.defenses import tdae
from tdae_jax.parallel import mesh as meshlib
from tdae_jax.protect import Protector

EPS = 8 / 255
STEPS = 4


@pytest.fixture(scope="module")
def setup():
    sur = models.tiny("ip2p")
    rng = np.random.default_rng(0)
    x0 = (rng.integers(0, 256, (8, 32, 32, 3)) / 255.0).astype(np.float32)
    ids = [f"img{i}" for i in range(8)]
    return sur, x0, ids


def _build(model, traces=None):
    """PGE + sign-PGD built from the surrogate ``model`` (inside the trace: the weights are arguments)."""
    loss_fn = objectives.make_objective("pge", model, configs.Objective(name="pge"))
    init_fn, step_fn = tdae.make_step(loss_fn, budget=configs.Budget(EPS),
                                      pgd=configs.PGD(step_size=2 / 255, steps=STEPS))
    if traces is None:
        return init_fn, step_fn

    def counted(*args):
        traces.append(1)
        return step_fn(*args)

    return init_fn, counted


def _protector(sur, n_dev, batch_size, traces=None):
    return Protector(lambda m: _build(m, traces), sur, meshlib.make_mesh(n_dev), batch_size)


def _run(p, x0, ids, key):
    return p.run({"x0": x0, "uid": prng.uids(ids)}, len(ids), STEPS, key)


def test_sharded_equals_single_device_and_batch_equals_singles(setup):
    sur, x0, ids = setup
    assert len(jax.devices()) == 8
    key = prng.base_key(0)
    d8, h8, _ = _run(_protector(sur, 8, 8), x0, ids, key)
    d1, h1, _ = _run(_protector(sur, 1, 8), x0, ids, key)
    np.testing.assert_allclose(d8, d1, atol=1e-6)
    np.testing.assert_allclose(h8["loss"], h1["loss"], rtol=1e-5)
    single = _protector(sur, 1, 1)
    for i in range(8):
        di, hi, _ = _run(single, x0[i:i + 1], ids[i:i + 1], key)
        # sign-PGD: a gradient entry at ~0 may flip sign between batch layouts, so compare per pixel
        # with a budget-step tolerance on a tiny fraction of pixels
        mismatch = np.mean(np.abs(di[0] - d8[i]) > 1e-6)
        assert mismatch < 1e-3, (i, mismatch)
        np.testing.assert_allclose(hi["loss"][0], h8["loss"][i], rtol=1e-4)


def test_traces_once_budget_holds_loss_decreases(setup):
    sur, x0, ids = setup
    traces = []
    p = _protector(sur, 8, 8, traces)
    key = prng.base_key(1)
    d, h, _ = _run(p, x0, ids, key)
    d2, _, _ = _run(p, x0[:5], ids[:5], key)  # a partial batch reuses the same compiled step
    assert len(traces) == 1, traces
    assert np.all(np.abs(d) <= EPS + 1e-6) and np.all(np.abs(d2) <= EPS + 1e-6)
    assert np.all(x0 + d >= -1e-6) and np.all(x0 + d <= 1 + 1e-6)
    loss = h["loss"]
    assert loss.shape == (8, STEPS)
    assert np.all(loss[:, -1] < loss[:, 0])  # PGE latent norm falls on every image
    np.testing.assert_allclose(d2, d[:5], atol=1e-6)


def test_weights_are_arguments_not_constants(setup):
    """The surrogate is an argument of the compiled step, placed on the step's mesh, and its weights are not
    literals of the program: the step lowered with the surrogate closed over instead is larger by at least the
    weights PGE reads."""
    sur, x0, ids = setup
    p = _protector(sur, 8, 8)
    _run(p, x0, ids, prng.base_key(0))
    assert all(a.sharding.mesh == p.mesh for a in jax.tree.leaves(p.model))
    vae = sur.params["vae"]  # PGE reads the VAE encoder only
    param_bytes = sum(a.nbytes for a in jax.tree.leaves((vae["encoder"], vae["quant_conv"])))
    batch = {"x0": x0, "uid": prng.uids(ids)}
    kd = np.asarray(jax.random.key_data(prng.base_key(0)))
    text = p._jit_step.lower(p.abstract_state, batch, kd, p.model).as_text()
    closed = jax.jit(lambda st, b, k: p._step_fn(st, b, k, sur))  # what a closure over the weights would build
    embedded = closed.lower(p.abstract_state, batch, kd).as_text()
    assert len(embedded) - len(text) > param_bytes, (len(embedded), len(text), param_bytes)
