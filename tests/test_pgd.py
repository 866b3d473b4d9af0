"""Sign-PGD chain, PhotoGuard's linear decay, the budget projection and the seeded random start."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tdae_jax import configs, prng
from tdae_jax.defenses import pgd, tdae


def _batch(b=4, hw=4, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x0 = jax.random.uniform(k1, (b, hw, hw, 3))
    # include exact range edges so the [0,1] clip is exercised
    x0 = x0.at[:, 0, 0, :].set(0.0).at[:, -1, -1, :].set(1.0)
    target = x0 + 3.0 * jnp.sign(jax.random.normal(k2, x0.shape))  # far outside the budget
    return {"x0": x0, "uid": jnp.arange(b, dtype=jnp.int32) + 7, "t": target}


def _quad(delta, batch, emb, keys):
    del emb, keys
    return jnp.sum((batch["x0"] + delta - batch["t"]) ** 2, axis=(1, 2, 3))


def test_sign_pgd_constant_step_is_minus_alpha_sign():
    opt = pgd.sign_pgd(0.01, 5)
    g = jnp.array([[-2.0, 0.0, 3e-9]])
    st = opt.init(g)
    for _ in range(3):
        u, st = opt.update(g, st, g)
        np.testing.assert_array_equal(np.asarray(u), np.array([[0.01, 0.0, -0.01]], np.float32))


def test_linear_decay_matches_photoguard_formula():
    a, n = 0.06, 7
    opt = pgd.sign_pgd(a, n, "linear")
    g = jnp.ones((3,))
    st = opt.init(g)
    for i in range(n):
        u, st = opt.update(g, st, g)
        expected = a - (a - a / 100) / n * i  # MadryLab/photoguard: step_size - (step_size - step_size/100)/iters*i
        np.testing.assert_allclose(np.asarray(u), -expected, rtol=1e-6, atol=0)
    assert abs(float(-u[0]) - a / 100 - (a - a / 100) / n) < 1e-7  # the last step is a/100 + one decrement
    for _ in range(3):  # past the horizon the step stays at its floor a/100 (never 0 or negative)
        u, st = opt.update(g, st, g)
        np.testing.assert_allclose(np.asarray(u), -a / 100, rtol=1e-6)


def test_project_budget_and_range():
    b = _batch()
    d = jax.random.uniform(jax.random.key(3), b["x0"].shape, minval=-1, maxval=1)
    p = pgd.project(d, b["x0"], 0.03)
    assert float(jnp.max(jnp.abs(p))) <= 0.03 + 1e-7
    x = b["x0"] + p
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # inside the feasible set the projection is the identity
    small = 0.01 * jnp.sign(d) * (b["x0"] > 0.02) * (b["x0"] < 0.98)
    np.testing.assert_allclose(np.asarray(pgd.project(small, b["x0"], 0.03)), np.asarray(small), atol=1e-7)


def test_budget_holds_after_every_step():
    batch = _batch()
    eps = 0.03
    for mode in ("off", "finite_difference"):
        init, step = tdae.make_step(_quad, budget=configs.Budget(eps), pgd=configs.PGD(step_size=0.02, steps=8),
                                    fdm=configs.FDM(mode=mode))
        step = jax.jit(step)
        st = init(batch, prng.base_key(0))
        for _ in range(8):
            st, m = step(st, batch, prng.base_key(0))
            assert float(jnp.max(jnp.abs(st.delta))) <= eps + 1e-7
            x = batch["x0"] + st.delta
            assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
            np.testing.assert_allclose(np.asarray(m["budget/linf"]), np.abs(np.asarray(st.delta)).max((1, 2, 3)))
        # the target is outside the ball: every pixel that can move sits on the boundary
        assert float(jnp.max(m["budget/linf"])) > eps - 1e-6


def test_random_start_seeded_in_budget_and_layout_free():
    batch = _batch()
    cfg = configs.PGD(random_start=0.25)
    s = pgd.init_state(batch, budget=configs.Budget(0.03), pgd=cfg, base_key=prng.base_key(1))
    d = np.asarray(s.delta)
    assert np.abs(d).max() <= 0.25 * 0.03 + 1e-7 and np.abs(d).max() > 0.1 * 0.03
    x = np.asarray(batch["x0"]) + d
    assert x.min() >= 0.0 and x.max() <= 1.0
    # same uid -> same start, wherever it sits in the batch
    rev = jax.tree.map(lambda a: a[::-1], batch)
    s2 = pgd.init_state(rev, budget=configs.Budget(0.03), pgd=cfg, base_key=prng.base_key(1))
    np.testing.assert_array_equal(np.asarray(s2.delta)[::-1], d)
    # a different seed gives a different start
    s3 = pgd.init_state(batch, budget=configs.Budget(0.03), pgd=cfg, base_key=prng.base_key(2))
    assert not np.array_equal(np.asarray(s3.delta), d)
    try:
        pgd.init_state(batch, budget=configs.Budget(0.03), pgd=cfg)
    except ValueError as e:
        assert "base_key" in str(e)
    else:
        raise AssertionError("random start without a key must fail")


def test_zero_start_and_state_shapes():
    batch = _batch()
    s = pgd.init_state(batch, budget=configs.Budget(), pgd=configs.PGD())
    assert s.delta.shape == batch["x0"].shape and float(jnp.abs(s.delta).max()) == 0.0
    assert s.text_delta.shape == (4, 1, 1) and s.step.dtype == jnp.int32 and int(s.step) == 0
    emb = jnp.ones((4, 5, 6))
    s = pgd.init_state({**batch, "emb": emb}, budget=configs.Budget(), pgd=configs.PGD())
    assert s.text_delta.shape == emb.shape


def test_apply_updates_moves_by_alpha_against_the_gradient():
    batch = _batch(b=2)
    opt = pgd.sign_pgd(0.004)
    d0 = jnp.zeros_like(batch["x0"])
    g = jax.grad(lambda d: _quad(d, batch, None, None).sum())(d0)
    u, _ = opt.update(g, opt.init(d0), d0)
    d1 = optax.apply_updates(d0, u)
    np.testing.assert_allclose(np.asarray(d1), -0.004 * np.sign(np.asarray(g)), atol=0)
    assert float(_quad(d1, batch, None, None).sum()) < float(_quad(d0, batch, None, None).sum())
