"""TPA baseline (TPA Eq. 10): 2N+1 gradient evaluations, reduction to FDM, neighbour draws; the official
code's estimator (fmy266/TPA TAEFEP: sign probes, alpha mix, momentum) against a numpy restatement."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tdae_jax import configs, prng
from tdae_jax.defenses import fdm, tdae, tpa

HW = 4


def make_loss(counter=None):
    """Dense-Hessian per-image objective; if ``counter`` is a list, every runtime forward evaluation of the
    loss (one per gradient: the backward pass does not re-run the forward) appends 1 via a debug callback."""
    n_in = HW * HW * 3
    w1 = jax.random.normal(jax.random.key(21), (n_in, 8)) / np.sqrt(n_in)

    def loss_fn(delta, batch, emb, keys):
        if counter is not None:
            jax.debug.callback(lambda: counter.append(1), ordered=True)
        flat = (batch["x0"] + delta).reshape(delta.shape[0], -1)
        xi = jax.vmap(lambda k: jax.random.normal(k, flat.shape[1:]))(keys)
        return jnp.sum(jnp.sin(2.0 * flat @ w1), -1) + jnp.sum((flat - 0.3) ** 2, -1) + 0.05 * jnp.sum(xi * flat, -1)

    return loss_fn


def make_batch(b=4):
    x0 = jax.random.uniform(jax.random.key(3), (b, HW, HW, 3))
    return {"x0": x0, "uid": jnp.arange(b, dtype=jnp.int32) + 100}


def _keys(batch, step=0):
    return prng.image_keys(prng.base_key(0), batch["uid"], step)


def _counted_steps(step, st, batch, counter, times):
    """Runs ``step`` ``times`` times; returns the state, the gradients counted in each call, the last metrics."""
    counts, m = [], None
    for _ in range(times):
        counter.clear()
        st, m = step(st, batch, prng.base_key(0))
        jax.block_until_ready(st)
        jax.effects_barrier()
        counts.append(len(counter))
    return st, counts, m


def test_tpa_uses_2n_plus_1_gradients_per_step():
    counter = []
    loss = make_loss(counter)
    batch = make_batch()
    for n in (3,):
        init, step = tdae.make_step(loss, budget=configs.Budget(), pgd=configs.PGD(),
                                    tpa=configs.TPA(enabled=True, n=n))
        _, counts, _ = _counted_steps(jax.jit(step), init(batch, prng.base_key(0)), batch, counter, 2)
        assert counts == [2 * n + 1] * 2, (n, counts)
    # the same counter gives 2 for FDM and 1 for plain PGD (the counting is honest)
    for mode, expect in (("finite_difference", 2), ("off", 1)):
        init, step = tdae.make_step(loss, budget=configs.Budget(), pgd=configs.PGD(), fdm=configs.FDM(mode=mode))
        st = init(batch, prng.base_key(0))
        counter.clear()
        jax.block_until_ready(jax.jit(step)(st, batch, prng.base_key(0)))
        jax.effects_barrier()
        assert len(counter) == expect, (mode, len(counter))


def test_tpa_n1_b0_is_fdm_finite_difference():
    loss = make_loss()
    batch = make_batch()
    delta = 0.01 * jax.random.normal(jax.random.key(4), batch["x0"].shape)
    beta, h = 0.3, 0.05
    a = jax.jit(functools.partial(tpa.dir_tpa, loss, n=1, b=0.0, k=h, beta=beta))(delta, batch, None, _keys(batch))
    f = jax.jit(functools.partial(fdm.dir_fd, loss, beta=beta, h=h))(delta, batch, None, _keys(batch))
    assert bool(jnp.all(f.z > 0))  # so sign(z) = +1 and the two coincide
    np.testing.assert_allclose(np.asarray(a.direction), np.asarray(f.direction), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(a.z), np.asarray(f.z), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(a.loss), np.asarray(f.loss))


def test_tpa_matches_reference_loop_and_neighbours_in_box():
    loss = make_loss()
    batch = make_batch()
    delta = jnp.zeros_like(batch["x0"])
    keys = _keys(batch, 2)
    n, b, k, beta = 3, 0.03, 0.05, 0.3
    out = jax.jit(functools.partial(tpa.dir_tpa, loss, n=n, b=b, k=k, beta=beta))(delta, batch, None, keys)
    vg = jax.jit(fdm.value_and_grad(loss, batch, None, keys))
    _, g0 = vg(delta)
    acc = 0.0
    nbs = []
    for i in range(n):
        nb = tpa.neighbours(keys, i, delta.shape[1:], delta.dtype, b)
        nbs.append(np.asarray(nb))
        _, gi = vg(delta + nb)
        _, gp = vg(delta + nb - k * fdm.unit(gi))
        acc = acc + (gp - gi)
    ref = g0 - beta / n * acc
    np.testing.assert_allclose(np.asarray(out.direction), np.asarray(ref), rtol=1e-5, atol=1e-6)
    nbs = np.stack(nbs)
    assert np.abs(nbs).max() <= b and np.abs(nbs).max() > 0.5 * b
    assert not np.allclose(nbs[0], nbs[1])  # distinct neighbours
    assert not np.allclose(nbs[0][0], nbs[0][1])  # distinct per image


def test_tpa_per_image_independence_and_b_default():
    loss = make_loss()
    batch = make_batch()
    init, step = tdae.make_step(loss, budget=configs.Budget(0.02), pgd=configs.PGD(step_size=0.004),
                                tpa=configs.TPA(enabled=True, n=2))
    step = jax.jit(step)
    st = init(batch, prng.base_key(0))
    for _ in range(3):
        st, m = step(st, batch, prng.base_key(0))
    for i in range(4):
        one = jax.tree.map(lambda a: a[i : i + 1], batch)
        s1 = init(one, prng.base_key(0))
        for _ in range(3):
            s1, m1 = step(s1, one, prng.base_key(0))
        np.testing.assert_allclose(np.asarray(st.delta)[i : i + 1], np.asarray(s1.delta), atol=1e-7)
    # the TPA/FDM combination is rejected rather than silently resolved
    try:
        tdae.make_step(loss, budget=configs.Budget(), pgd=configs.PGD(), fdm=configs.FDM(mode="exact"),
                       tpa=configs.TPA(enabled=True))
    except ValueError:
        pass
    else:
        raise AssertionError("TPA + FDM must be rejected")


# --- the official code's estimator (fmy266/TPA toolkit/adv/attack.py, TAEFEP.step / get_optim) ---------------

def make_analytic(b=4):
    """Per-image O(d) = 1/2 y^T A y + w.y + sum(y^4)/4 with y = x0 + d (flattened), and its numpy gradient."""
    n_in = HW * HW * 3
    rng = np.random.default_rng(7)
    m = rng.standard_normal((n_in, n_in)) / np.sqrt(n_in)
    a_np, w_np = (m + m.T) / 2, rng.standard_normal(n_in)
    a_j, w_j = jnp.asarray(a_np, jnp.float32), jnp.asarray(w_np, jnp.float32)

    def loss_fn(delta, batch, emb, keys):
        y = (batch["x0"] + delta).reshape(delta.shape[0], -1)
        return 0.5 * jnp.einsum("bi,ij,bj->b", y, a_j, y) + y @ w_j + 0.25 * jnp.sum(y**4, -1)

    def grad_np(x0, d):  # [B,...] float64 -> [B,...]
        y = (x0 + d).reshape(x0.shape[0], -1)
        return (y @ a_np + w_np + y**3).reshape(x0.shape)

    return loss_fn, grad_np


def official_np(grad_np, x0, d, draws, k, alpha):
    """numpy restatement of TAEFEP.step: (1-alpha) g(d) + alpha/N sum_i g(d + D_i + k sign(g(d + D_i)))."""
    fwd = np.zeros_like(d)
    for nb in draws:
        fwd += grad_np(x0, d + nb + k * np.sign(grad_np(x0, d + nb)))
    return (1 - alpha) * grad_np(x0, d) + alpha * fwd / len(draws)


def test_official_estimate_and_momentum_match_numpy_restatement():
    loss, grad_np = make_analytic()
    batch = make_batch()
    x0 = np.asarray(batch["x0"], np.float64)
    n, b, k, alpha, mu, eps, a = 3, 0.03, 0.01, 0.8, 0.9, 0.03, 0.004
    keys = _keys(batch, 1)
    delta = 0.01 * jax.random.normal(jax.random.key(5), batch["x0"].shape)
    est = jax.jit(functools.partial(tpa.dir_tpa_official, loss, n=n, b=b, k=k, alpha=alpha))(delta, batch, None, keys)
    draws = [np.asarray(tpa.neighbours(keys, i, delta.shape[1:], delta.dtype, b), np.float64) for i in range(n)]
    ref = official_np(grad_np, x0, np.asarray(delta, np.float64), draws, k, alpha)
    np.testing.assert_allclose(np.asarray(est.direction), ref, rtol=1e-4, atol=1e-4)
    # three full steps through make_step: sign -> m = mu m + sign(g) -> delta - a m -> L_inf ball and [0, 1]
    cfg = configs.TPA(enabled=True, n=n, b=b, k=k, estimator="official", alpha=alpha, momentum=mu)
    init, step = tdae.make_step(loss, budget=configs.Budget(eps), pgd=configs.PGD(step_size=a), tpa=cfg)
    st, d_np, m_np = init(batch), np.zeros_like(x0), np.zeros_like(x0)
    step = jax.jit(step)
    for it in range(3):
        kk = _keys(batch, it)
        draws = [np.asarray(tpa.neighbours(kk, i, x0.shape[1:], jnp.float32, b), np.float64) for i in range(n)]
        m_np = mu * m_np + np.sign(official_np(grad_np, x0, d_np, draws, k, alpha))
        d_np = np.clip(x0 + np.clip(d_np - a * m_np, -eps, eps), 0, 1) - x0
        st, _ = step(st, batch, prng.base_key(0))
    np.testing.assert_allclose(np.asarray(st.delta), d_np, atol=1e-6)
    assert np.abs(m_np).max() > 1.5  # the momentum really accumulated (|m| reaches 1 + mu somewhere)


def test_official_per_image_traces_once_and_2n_plus_1_gradients():
    counter = []
    loss = make_loss(counter)
    batch = make_batch()
    traces = []
    cfg = configs.TPA(enabled=True, n=2, estimator="official", k=0.005)
    init, step = tdae.make_step(loss, budget=configs.Budget(0.02), pgd=configs.PGD(step_size=0.004), tpa=cfg)

    def counted(s, bt, key):
        traces.append(1)
        return step(s, bt, key)

    step_j = jax.jit(counted)
    st, counts, m = _counted_steps(step_j, init(batch, prng.base_key(0)), batch, counter, 3)
    assert counts == [2 * cfg.n + 1] * 3, counts
    assert len(traces) == 1  # the momentum state keeps its structure and dtypes: one compilation for the run
    assert bool(jnp.any(st.opt_state[1].trace != 0))  # the trace is carried in ProtectState.opt_state
    for i in range(4):
        one = jax.tree.map(lambda v: v[i : i + 1], batch)
        s1 = init(one, prng.base_key(0))
        for _ in range(3):
            s1, m1 = jax.jit(step)(s1, one, prng.base_key(0))
        np.testing.assert_allclose(np.asarray(st.delta)[i : i + 1], np.asarray(s1.delta), atol=1e-7)
        np.testing.assert_allclose(np.asarray(m["loss"])[i : i + 1], np.asarray(m1["loss"]), rtol=1e-6)


def test_official_alpha0_mu0_is_plain_pgd_and_flag_wiring():
    loss = make_loss()
    batch = make_batch()
    runs = {}
    for name, tcfg in (("off", None), ("official", configs.TPA(enabled=True, n=1, estimator="official", alpha=0.0,
                                                              momentum=0.0))):
        init, step = tdae.make_step(loss, budget=configs.Budget(), pgd=configs.PGD(), tpa=tcfg)
        st = init(batch)
        for _ in range(2):
            st, _ = jax.jit(step)(st, batch, prng.base_key(0))
        runs[name] = np.asarray(st.delta)
    np.testing.assert_array_equal(runs["official"], runs["off"])
    try:
        tpa.estimator(configs.TPA(estimator="nope"), 0.03)
    except ValueError:
        pass
    else:
        raise AssertionError("an unknown estimator must be rejected")
    from experiments import common
    from experiments import tdae as cli

    cli.FLAGS.unparse_flags()
    cli.FLAGS(["tdae", "--defense=tpa", "--tpa_estimator=official"])
    cfg = common.run_config_from_flags(cli.FLAGS)
    assert cfg.tpa.estimator == "official" and cfg.defense_configs()[1].enabled
    assert cli.run_cli(["tdae", "--tpa_estimator=nope"]) == 2  # a usage error, before anything runs
    cli.FLAGS.unparse_flags()
