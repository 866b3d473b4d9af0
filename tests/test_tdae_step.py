"""TDAE Algorithm 1 step: traced once with DPD on, per-image independence, sharded == unsharded."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tdae_jax import configs, prng
from tdae_jax.defenses import tdae
from tdae_jax.parallel import mesh as meshlib

HW, T, D = 4, 3, 4


def make_loss():
    n_in = HW * HW * 3
    w1 = jax.random.normal(jax.random.key(41), (n_in, 8)) / np.sqrt(n_in)
    p = jax.random.normal(jax.random.key(42), (D, 8)) / np.sqrt(D)

    def loss_fn(delta, batch, emb, keys):
        flat = (batch["x0"] + delta).reshape(delta.shape[0], -1)
        xi = jax.vmap(lambda k: jax.random.normal(k, flat.shape[1:]))(keys)
        gate = 1.0 + 0.3 * jnp.mean(jnp.tanh(emb @ p), axis=1)  # [B,8]
        h = jnp.tanh(2.0 * flat @ w1) * gate
        target = batch["t"].reshape(flat.shape)
        return jnp.sum(h, -1) + jnp.sum((flat - target) ** 2, -1) + 0.05 * jnp.sum(xi * flat, -1)

    return loss_fn


def make_batch(b, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x0 = jax.random.uniform(k1, (b, HW, HW, 3))
    return {"x0": x0, "uid": (jnp.arange(b, dtype=jnp.int32) * 7919) % 1000,
            "t": jnp.clip(x0 + 0.5 * jnp.sign(jax.random.normal(k2, x0.shape)), 0, 1),
            "emb": 0.2 * jax.random.normal(k3, (b, T, D))}


DPD = configs.DPD(enabled=True, period=2, steps=3)
CFGS = dict(budget=configs.Budget(0.03), pgd=configs.PGD(step_size=0.006, steps=8, step_decay="linear"),
            fdm=configs.FDM(mode="finite_difference"), dpd=DPD)


def _run(step, init, batch, n):
    st = init(batch, prng.base_key(0))
    ms = []
    for _ in range(n):
        st, m = step(st, batch, prng.base_key(0))
        ms.append(m)
    return st, jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *ms)


def test_step_traces_once_over_two_dpd_periods():
    for fdm_mode in ("finite_difference", "exact"):
        init, step = tdae.make_step(make_loss(), **{**CFGS, "fdm": configs.FDM(mode=fdm_mode)})
        traced = jax.jit(chex.assert_max_traces(step, n=1), donate_argnums=0)
        st, m = _run(traced, init, make_batch(4), 2 * DPD.period + 1)  # >= 2*S iterations, 2 DPD rounds
        assert int(st.step) == 2 * DPD.period + 1
        np.testing.assert_array_equal(m["dpd/round"][:, 0], [0, 1, 0, 1, 0])
        chex.clear_trace_counter()


def test_metrics_shapes_and_keys():
    init, step = tdae.make_step(make_loss(), **CFGS)
    _, m = _run(jax.jit(step), init, make_batch(4), 2)
    assert set(m) == set(tdae.METRIC_KEYS)
    for k, v in m.items():
        assert v.shape == (2, 4) and v.dtype == np.float32, k
    assert np.all(np.isfinite(m["fdm/z"])) and np.all(m["grad_norm"] > 0)


def test_batch_of_4_equals_4_batches_of_1():
    init, step = tdae.make_step(make_loss(), **CFGS)
    step = jax.jit(step)
    batch = make_batch(4)
    st, m = _run(step, init, batch, 5)
    for i in range(4):
        one = jax.tree.map(lambda a: a[i : i + 1], batch)
        s1, m1 = _run(step, init, one, 5)
        np.testing.assert_allclose(np.asarray(st.delta)[i], np.asarray(s1.delta)[0], atol=1e-7)
        np.testing.assert_allclose(np.asarray(st.text_delta)[i], np.asarray(s1.text_delta)[0], atol=1e-7)
        for k in m:
            np.testing.assert_allclose(m[k][:, i], m1[k][:, 0], rtol=1e-6, atol=1e-6, err_msg=k)


def test_uid_keys_make_results_batch_order_free():
    init, step = tdae.make_step(make_loss(), **CFGS)
    step = jax.jit(step)
    batch = make_batch(4)
    st, _ = _run(step, init, batch, 3)
    rev = jax.tree.map(lambda a: a[::-1], batch)
    sr, _ = _run(step, init, rev, 3)
    np.testing.assert_allclose(np.asarray(sr.delta)[::-1], np.asarray(st.delta), atol=1e-7)


def test_sharded_over_8_devices_equals_unsharded():
    assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
    mesh = meshlib.make_mesh()
    init, step = tdae.make_step(make_loss(), **CFGS)
    batch = make_batch(8)
    n = 3
    ref_state, ref_m = _run(jax.jit(step), init, batch, n)

    data, repl = meshlib.batch_sharding(mesh), meshlib.replicated(mesh)
    abstract = jax.eval_shape(init, batch, prng.base_key(0))
    state_sh = jax.tree.map(lambda a: data if a.ndim >= 1 and a.shape[0] == 8 else repl, abstract)
    batch_sh = jax.tree.map(lambda _: data, batch)
    metrics_sh = {k: data for k in tdae.METRIC_KEYS}
    sinit = jax.jit(init, in_shardings=(batch_sh, repl), out_shardings=state_sh)
    sstep = jax.jit(step, in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, metrics_sh),
                    donate_argnums=0)
    sbatch = meshlib.shard_batch(batch, mesh)
    st = sinit(sbatch, prng.base_key(0))
    ms = []
    for _ in range(n):
        st, m = sstep(st, sbatch, prng.base_key(0))
        ms.append(m)
    assert st.delta.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 4)
    assert len(st.delta.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(st.delta), np.asarray(ref_state.delta), atol=1e-7)
    np.testing.assert_allclose(np.asarray(st.text_delta), np.asarray(ref_state.text_delta), atol=1e-7)
    for k in tdae.METRIC_KEYS:
        got = np.stack([np.asarray(x[k]) for x in ms])
        np.testing.assert_allclose(got, ref_m[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_dpd_requires_emb():
    init, step = tdae.make_step(make_loss(), **CFGS)
    batch = {k: v for k, v in make_batch(2).items() if k != "emb"}
    try:
        jax.eval_shape(step, jax.eval_shape(init, batch), batch, prng.base_key(0))
    except ValueError as e:
        assert "emb" in str(e)
    else:
        raise AssertionError("DPD without emb must fail")
