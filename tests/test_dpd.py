"""DPD (TDAE §III-D, Eq. 11): the text-side loss falls, eps_p and the range clamp hold, rounds every S."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tdae_jax import configs, prng
from tdae_jax.defenses import dpd, tdae

B, HW, T, D = 4, 4, 5, 6


def make_loss():
    """O(delta, e): image-side quadratic whose scale depends smoothly on the text embedding (and on xi)."""
    p = jax.random.normal(jax.random.key(31), (D, 3)) / np.sqrt(D)

    def loss_fn(delta, batch, emb, keys):
        x = batch["x0"] + delta
        xi = jax.vmap(lambda k: jax.random.normal(k, (T, D)))(keys)
        e = emb + 0.01 * xi
        txt = jnp.mean(jnp.tanh(e @ p), axis=1)  # [B,3]
        dist = jnp.mean((x - batch["t"]) ** 2, axis=(1, 2))  # [B,3]
        return jnp.sum(dist * (1.0 + 0.5 * txt), -1) + jnp.sum(txt, -1)

    return loss_fn


def make_batch(b=B):
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    x0 = jax.random.uniform(k1, (b, HW, HW, 3))
    return {"x0": x0, "uid": jnp.arange(b, dtype=jnp.int32) * 5 + 2,
            "t": jnp.clip(x0 + 0.4 * jax.random.normal(k2, x0.shape), 0, 1),
            "emb": 0.1 * jax.random.normal(k3, (b, T, D))}


LOSS = make_loss()


@functools.lru_cache(maxsize=None)
def _round_fn(cfg):
    return jax.jit(functools.partial(dpd.run_round, LOSS, dpd=cfg))  # one compile per config


def _round(cfg, batch, delta=None, step=0):
    keys = prng.image_keys(prng.base_key(0), batch["uid"], step)
    d = jnp.zeros_like(batch["x0"]) if delta is None else delta
    return _round_fn(cfg)(d, batch, batch["emb"], keys), keys


def test_text_loss_falls_and_eps_p_holds():
    batch = make_batch()
    for resample in (False, True):
        cfg = configs.DPD(enabled=True, steps=20, step_size=2 / 255, eps=8 / 255, resample_noise=resample)
        r, keys = _round(cfg, batch)
        assert bool(jnp.all(r.loss_after < r.loss_before)), (resample, r.loss_before, r.loss_after)
        lin = float(jnp.max(jnp.abs(r.text_delta)))
        assert lin <= 8 / 255 + 1e-6 and lin > 0.5 * 8 / 255
        # loss_before is -O at text_delta = 0 on the round's step-0 keys
        k0 = dpd.round_keys(keys)
        if resample:
            k0 = jax.vmap(lambda k: jax.random.fold_in(k, 0))(k0)
        ref = -LOSS(jnp.zeros_like(batch["x0"]), batch, batch["emb"], k0)
        np.testing.assert_allclose(np.asarray(r.loss_before), np.asarray(ref), rtol=1e-6)


def test_text_loss_falls_over_the_m_steps():
    """Monotone on this smooth objective: more steps, lower text-side loss (fixed xi)."""
    batch = make_batch()
    losses = []
    for m in (1, 8):
        r, _ = _round(configs.DPD(enabled=True, steps=m, step_size=0.5 / 255, eps=8 / 255), batch)
        losses = losses or [np.asarray(r.loss_before)]
        losses.append(np.asarray(r.loss_after))
    assert all(bool(np.all(b < a)) for a, b in zip(losses, losses[1:])), losses


def test_range_clamp_per_image():
    batch = make_batch()
    batch = {**batch, "emb": batch["emb"].at[:, 0, 0].set(0.0)}
    cfg = configs.DPD(enabled=True, steps=10, step_size=0.05, eps=10.0, clamp_to_range=True)
    r, _ = _round(cfg, batch)
    e = np.asarray(batch["emb"] + r.text_delta)
    lo, hi = np.asarray(batch["emb"]).min((1, 2)), np.asarray(batch["emb"]).max((1, 2))
    assert np.all(e.min((1, 2)) >= lo - 1e-7) and np.all(e.max((1, 2)) <= hi + 1e-7)
    assert np.abs(np.asarray(r.text_delta)).max() > 0.1  # the eps_p ball is loose here: the clamp binds
    r2, _ = _round(configs.DPD(enabled=True, steps=10, step_size=0.05, eps=10.0, clamp_to_range=False), batch)
    e2 = np.asarray(batch["emb"] + r2.text_delta)
    assert np.any(e2.max((1, 2)) > hi + 1e-3)


def test_rounds_every_s_iterations_and_text_delta_is_kept():
    loss = LOSS
    batch = make_batch()
    s = 3
    cfg = configs.DPD(enabled=True, period=s, steps=4, step_size=2 / 255, eps=8 / 255)
    init, step = tdae.make_step(loss, budget=configs.Budget(), pgd=configs.PGD(),
                                fdm=configs.FDM(mode="finite_difference"), dpd=cfg)
    step = jax.jit(step)
    st = init(batch, prng.base_key(0))
    prev_td = np.asarray(st.text_delta)
    for n in range(1, 3 * s + 1):
        keys = prng.image_keys(prng.base_key(0), batch["uid"], n - 1)
        delta_before = st.delta
        st, m = step(st, batch, prng.base_key(0))
        td = np.asarray(st.text_delta)
        if n % s == 0:
            assert np.all(np.asarray(m["dpd/round"]) == 1.0)
            assert np.all(np.isfinite(np.asarray(m["dpd/loss_before"])))
            assert np.all(np.asarray(m["dpd/loss_after"]) < np.asarray(m["dpd/loss_before"]))
            # the round starts from text_delta = 0, not from the previous round
            ref, _ = _round(cfg, batch, delta_before, step=n - 1)
            np.testing.assert_allclose(td, np.asarray(ref.text_delta), atol=1e-7)
        else:
            assert np.all(np.asarray(m["dpd/round"]) == 0.0)
            assert np.all(np.isnan(np.asarray(m["dpd/loss_before"]))) and np.all(np.isnan(np.asarray(m["dpd/loss_after"])))
            np.testing.assert_array_equal(td, prev_td)  # e = c + dp is kept until the next round
            if n < s:
                assert np.abs(td).max() == 0.0  # before the first round e = c
        # the image step used e = emb + text_delta
        np.testing.assert_allclose(np.asarray(m["loss"]),
                                   np.asarray(loss(delta_before, batch, batch["emb"] + st.text_delta, keys)),
                                   rtol=1e-6)
        assert np.abs(td).max() <= 8 / 255 + 1e-6
        prev_td = td
