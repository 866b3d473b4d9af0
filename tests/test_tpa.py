"""TPA baseline (TPA Eq. 10, spec §5): 2N+1 gradient evaluations, reduction to FDM, neighbour draws."""
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


def test_tpa_uses_2n_plus_1_gradients_per_step():
    counter = []
    loss = make_loss(counter)
    batch = make_batch()
    for n in (3,):
        init, step = tdae.make_step(loss, budget=configs.Budget(), pgd=configs.PGD(),
                                    tpa=configs.TPA(enabled=True, n=n))
        step = jax.jit(step)
        st = init(batch, prng.base_key(0))
        for _ in range(2):
            counter.clear()
            st, m = step(st, batch, prng.base_key(0))
            jax.block_until_ready(st)
            jax.effects_barrier()
            assert len(counter) == 2 * n + 1, (n, len(counter))
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
