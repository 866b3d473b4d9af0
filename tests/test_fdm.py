"""FDM estimators (TDAE Eq. 5-9, and Eq. 5 differentiated): limits, equivalences, zero-gradient guard, per-image."""
import jax
import jax.numpy as jnp
import numpy as np

from tdae_jax import configs, prng
from tdae_jax.defenses import fdm, pgd, tdae

HW = 4


def make_mlp_loss(dtype=jnp.float32, hidden=16):
    """Smooth per-image objective with a dense (non-diagonal) Hessian and key-dependent noise xi."""
    n_in = HW * HW * 3
    w1 = (jax.random.normal(jax.random.key(11), (n_in, hidden)) / np.sqrt(n_in)).astype(dtype)
    w2 = jax.random.normal(jax.random.key(12), (hidden,)).astype(dtype)

    def loss_fn(delta, batch, emb, keys):
        x = batch["x0"] + delta
        flat = x.reshape(x.shape[0], -1)
        xi = jax.vmap(lambda k: jax.random.normal(k, flat.shape[1:], dtype))(keys)
        out = jnp.tanh(3.0 * flat @ w1) @ w2 + 0.5 * jnp.sum((flat - batch["t"].reshape(flat.shape)) ** 2, -1)
        return out + 0.05 * jnp.sum(xi * flat, -1)

    return loss_fn


def make_batch(b=4, seed=0, dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x0 = jax.random.uniform(k1, (b, HW, HW, 3), dtype)
    t = jnp.clip(x0 + 0.5 * jax.random.normal(k2, x0.shape, dtype), 0, 1)
    return {"x0": x0, "uid": jnp.arange(b, dtype=jnp.int32) * 3 + 1, "t": t}


def _args(batch, delta=None, step=0):
    keys = prng.image_keys(prng.base_key(0), batch["uid"], step)
    d = jnp.zeros_like(batch["x0"]) if delta is None else delta
    return d, batch, None, keys


def _rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def test_fd_converges_to_exact_hvp_as_h_to_0_float64():
    with jax.enable_x64(True):
        loss = make_mlp_loss(jnp.float64)
        batch = make_batch(dtype=jnp.float64)
        d, b, e, k = _args(batch, 0.01 * jnp.ones_like(batch["x0"]))
        lam = 0.015
        ex = jax.jit(lambda d: fdm.dir_exact_hvp(loss, d, b, e, k, lam=lam))(d)
        assert ex.direction.dtype == jnp.float64
        g = jax.jit(lambda d: fdm.dir_plain(loss, d, b, e, k).direction)(d)
        errs = []
        fd_fn = jax.jit(lambda h: fdm.dir_fd(loss, d, b, e, k, beta=lam / h, h=h))  # one compile, h traced
        for h in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
            fd = fd_fn(jnp.float64(h))
            assert bool(jnp.all(fd.z > 0))
            # relative error of the penalty part lam*H s (the part where the two forms differ)
            errs.append(_rel(fd.direction - g, ex.direction - g))
        # first-order convergence: the error shrinks ~10x per decade of h (measured: ~4.8*h, 4.8e-7 at h=1e-7)
        assert all(5 < a_ / b_ < 20 for a_, b_ in zip(errs[1:], errs[2:])), errs
        assert errs[0] > 1e-2 and errs[-1] < 1e-6, errs


def test_exact_hvp_equals_grad_of_grad():
    loss = make_mlp_loss()
    batch = make_batch()
    args = _args(batch, 0.02 * jnp.sign(jax.random.normal(jax.random.key(5), batch["x0"].shape)))
    lam = 0.015
    a = fdm.dir_exact_hvp(loss, *args, lam=lam)
    b = fdm.dir_exact_gog(loss, *args, lam=lam)
    g = fdm.dir_plain(loss, *args).direction
    assert _rel(a.direction, b.direction) < 1e-6
    assert _rel(a.direction - g, b.direction - g) < 1e-4  # the penalty terms alone
    np.testing.assert_allclose(np.asarray(a.loss), np.asarray(b.loss), rtol=1e-6)


def test_beta_zero_fdm_equals_plain_pgd_exactly():
    loss = make_mlp_loss()
    batch = make_batch()
    runs = {}
    for mode, beta in (("off", 0.3), ("finite_difference", 0.0)):
        init, step = tdae.make_step(loss, budget=configs.Budget(0.03), pgd=configs.PGD(step_size=0.004),
                                    fdm=configs.FDM(mode=mode, beta=beta))
        step = jax.jit(step)
        st = init(batch, prng.base_key(0))
        traj = []
        for _ in range(6):
            st, m = step(st, batch, prng.base_key(0))
            traj.append((np.asarray(st.delta), np.asarray(m["loss"])))
        runs[mode] = traj
    for (d1, l1), (d2, l2) in zip(runs["off"], runs["finite_difference"]):
        np.testing.assert_array_equal(d1, d2)
        np.testing.assert_array_equal(l1, l2)
    # and the exact forms with lam = 0 are plain PGD too
    for f in (fdm.dir_exact_hvp, fdm.dir_exact_gog):
        np.testing.assert_allclose(np.asarray(f(loss, *_args(batch), lam=0.0).direction),
                                   np.asarray(fdm.dir_plain(loss, *_args(batch)).direction), rtol=1e-6, atol=1e-7)


def test_fd_closed_form_and_shared_keys():
    """g_FDM = (1+beta) g1 - beta g2 when z > 0 (Eq. 9), with g2 at the paper's probe and the SAME keys."""
    loss = make_mlp_loss()
    batch = make_batch()
    d, b, e, k = _args(batch, step=3)
    beta, h = 0.3, 0.05
    out = fdm.dir_fd(loss, d, b, e, k, beta=beta, h=h)
    vg = fdm.value_and_grad(loss, b, e, k)
    l1, g1 = vg(d)
    s = g1 / jnp.linalg.norm(g1.reshape(4, -1), axis=1)[:, None, None, None]
    l2, g2 = vg(d - h * s)  # probe = delta + h*s_L with L = -O
    assert bool(jnp.all(out.z > 0))
    np.testing.assert_allclose(np.asarray(out.z), np.asarray(l1 - l2), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.direction), np.asarray((1 + beta) * g1 - beta * g2), rtol=1e-5, atol=1e-6)
    # keys from another step (a different xi) give a different estimate: keys really reach the loss
    other = fdm.dir_fd(loss, d, b, e, _args(batch, step=4)[3], beta=beta, h=h)
    assert not np.allclose(np.asarray(other.direction), np.asarray(out.direction))


def test_fd_probe_and_difference_in_float32():
    """A narrow perturbation cannot round the probe away: ``dir_fd`` holds delta, the probe delta - h*s, both
    gradients, z and g2 - g1 in float32 (a bf16 delta is promoted exactly), so a bf16 delta gives the float32
    result bit for bit. The probe here is as small per pixel as h = 0.05 at 512 px; subtracted in bf16 it would
    leave delta unchanged (the same rounding the pipeline refuses for a bf16 surrogate: ``pipeline.validate``)."""
    loss = make_mlp_loss()
    batch = make_batch()
    h = 0.05 * np.sqrt(HW * HW / (512 * 512))  # per-pixel probe h/sqrt(HWC) of h = 0.05 at 512 px
    d16 = (0.03 * jnp.sign(jax.random.normal(jax.random.key(5), batch["x0"].shape))).astype(jnp.bfloat16)
    _, b, e, k = _args(batch)
    out = fdm.dir_fd(loss, d16, b, e, k, beta=0.015 / h, h=h)
    ref = fdm.dir_fd(loss, d16.astype(jnp.float32), b, e, k, beta=0.015 / h, h=h)
    assert out.direction.dtype == out.z.dtype == out.loss.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out.direction), np.asarray(ref.direction))
    np.testing.assert_array_equal(np.asarray(out.z), np.asarray(ref.z))
    assert bool(jnp.all(ref.z != 0)) and bool(jnp.all(jnp.isfinite(ref.direction)))  # the probe moved the loss
    # ... whereas a bf16 surrogate casts its input x0 + delta - h*s to bf16, which mostly undoes the probe
    x = b["x0"] + d16.astype(jnp.float32)
    probe_seen = (x - h * fdm.unit(ref.direction)).astype(jnp.bfloat16) != x.astype(jnp.bfloat16)
    assert np.mean(np.asarray(probe_seen)) < 0.1


def test_zero_gradient_guard():
    """At a stationary point every mode returns a zero direction, no NaN, grad_norm == 0."""

    def flat_at_zero(delta, batch, emb, keys):
        return jnp.sum(delta**2, axis=(1, 2, 3)) * 1.0

    batch = make_batch()
    args = _args(batch)
    for est in (fdm.dir_plain(flat_at_zero, *args), fdm.dir_fd(flat_at_zero, *args, beta=0.3, h=0.05),
                fdm.dir_exact_hvp(flat_at_zero, *args, lam=0.015), fdm.dir_exact_gog(flat_at_zero, *args, lam=0.015)):
        assert bool(jnp.all(jnp.isfinite(est.direction))) and float(jnp.abs(est.direction).max()) == 0.0
        assert float(jnp.abs(est.grad_norm).max()) == 0.0
    # the step cannot move from 0 ... unless a random start is used
    for r, moved in ((0.0, False), (0.25, True)):
        init, step = tdae.make_step(flat_at_zero, budget=configs.Budget(), pgd=configs.PGD(random_start=r),
                                    fdm=configs.FDM(mode="finite_difference"))
        st0 = init(batch, prng.base_key(0))
        st, m = jax.jit(step)(st0, batch, prng.base_key(0))
        assert bool(jnp.all(m["grad_norm"] > 0)) == moved
        assert (not np.array_equal(np.asarray(st.delta), np.asarray(st0.delta))) == moved


def test_safe_norm_gradient_at_zero_is_zero():
    g = jax.grad(lambda x: fdm.safe_norm(x).sum())(jnp.zeros((2, 3, 3, 3)))
    assert bool(jnp.all(g == 0))
    x = jnp.arange(54.0).reshape(2, 3, 3, 3)
    np.testing.assert_allclose(np.asarray(fdm.safe_norm(x)), np.linalg.norm(np.asarray(x).reshape(2, -1), axis=1),
                               rtol=1e-6)


def test_per_image_independence_all_modes():
    loss = make_mlp_loss()
    batch = make_batch(b=4)
    delta = 0.01 * jax.random.normal(jax.random.key(9), batch["x0"].shape)
    fns = {
        "fd": lambda *a: fdm.dir_fd(loss, *a, beta=0.3, h=0.05),
        "hvp": lambda *a: fdm.dir_exact_hvp(loss, *a, lam=0.015),
        "gog": lambda *a: fdm.dir_exact_gog(loss, *a, lam=0.015),
    }
    for name, f in fns.items():
        full = jax.jit(f)(*_args(batch, delta))
        for i in range(4):
            one = jax.tree.map(lambda a: a[i : i + 1], batch)
            single = jax.jit(f)(*_args(one, delta[i : i + 1]))
            for a, b in zip(full, single):
                # batch 4 vs batch 1 are different programs (XLA:CPU may vectorise the reductions differently:
                # 6e-6 relative seen on an AVX-512 machine); a row leaking into another would be far larger
                np.testing.assert_allclose(np.asarray(a)[i : i + 1], np.asarray(b), rtol=2e-5, atol=2e-5,
                                           err_msg=name)


def test_loss_decreases_plain_and_fdm():
    loss = make_mlp_loss()
    batch = make_batch()
    for mode in ("off", "finite_difference", "exact"):
        init, step = tdae.make_step(loss, budget=configs.Budget(0.05), pgd=configs.PGD(step_size=0.005),
                                    fdm=configs.FDM(mode=mode))
        step = jax.jit(step)
        st = init(batch, prng.base_key(0))
        curve = []
        for _ in range(10):
            st, m = step(st, batch, prng.base_key(0))
            curve.append(np.asarray(m["loss"]))
        assert np.all(curve[-1] < curve[0] - 0.05), (mode, curve)  # the logged curve falls (xi varies per step)
        # evaluate at a common key so the noise term does not blur the comparison
        d, b, e, k = _args(batch)
        end = loss(st.delta, b, e, k)
        start = loss(jnp.zeros_like(st.delta), b, e, k)
        assert bool(jnp.all(end < start - 0.05)), (mode, start, end)
        assert pgd.per_image_linf(st.delta).max() <= 0.05 + 1e-7
