"""SD3 transformer over a ("data", "model") mesh of the 8 forced CPU devices (tests/conftest.py):
params split over "model" by ``sd3_transformer.param_shardings``, batch over "data"; the sharded
forward and gradient equal the single-device ones. Also: ``remat`` changes nothing numerically."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tdae_jax.models import sd3, sd3_transformer

CFG = dict(sd3.TINY_TRANSFORMER, num_layers=3, dual_attention_layers=(0,), qk_norm="rms_norm")


def _setup(remat=False):
    model = sd3_transformer.SD3Transformer2DModel(sd3_transformer.SD3Config.from_dict(CFG), remat=remat)
    params = sd3.random_params(sd3_transformer.init_shapes(model), jax.random.key(0))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(a.dtype), params)
    k = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(k[0], (4, 16, 12, 20))
    c = jax.random.normal(k[1], (4, 9, CFG["joint_attention_dim"]))
    pooled = jax.random.normal(k[2], (4, CFG["pooled_projection_dim"]))
    t = jnp.array([999.0, 700.0, 300.0, 20.0])
    return model, params, (x, c, pooled, t)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_model_axis_sharded_forward_and_grad_equal_unsharded():
    assert len(jax.devices()) >= 8, "tests/conftest.py should force 8 CPU devices"
    model, params, batch = _setup()
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    shardings = sd3_transformer.param_shardings(params, mesh)
    blk = shardings["transformer_blocks_0"]
    assert blk["attn"]["to_q"]["kernel"].spec == P(None, "model")
    assert blk["attn"]["to_out_0"]["kernel"].spec == P("model", None)
    assert blk["ff"]["net_0"]["proj"]["bias"].spec == P("model")
    assert blk["attn2"]["to_v"]["kernel"].spec == P(None, "model")
    assert blk["norm1"]["linear"]["kernel"].spec == P()
    sp = jax.device_put(params, shardings)
    q = sp["transformer_blocks_1"]["attn"]["to_q"]["kernel"]
    assert q.addressable_shards[0].data.shape == (32, 8)  # D=32 split 4 ways
    data = NamedSharding(mesh, P("data"))
    sb = jax.device_put(batch, data)

    def loss(p, x, c, pooled, t):
        out = model.apply({"params": p}, x, c, pooled, t)
        return jnp.sum(jnp.sin(out)), out

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), out_shardings=None)
    (_, out_s), (gp_s, gx_s) = f(sp, *sb)
    dev0 = jax.devices()[0]
    (_, out_r), (gp_r, gx_r) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        jax.device_put(params, dev0), *jax.device_put(batch, dev0))
    assert _rel(out_s, out_r) <= 1e-5
    assert _rel(gx_s, gx_r) <= 1e-5
    gq_s = gp_s["transformer_blocks_1"]["attn"]["to_q"]["kernel"]
    assert _rel(gq_s, gp_r["transformer_blocks_1"]["attn"]["to_q"]["kernel"]) <= 1e-5


def test_sd3_shard_places_params():
    m = sd3.tiny(jax.random.key(0))
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    ms = m.shard(mesh)
    assert ms.params["transformer"]["transformer_blocks_0"]["ff"]["net_2"]["kernel"].sharding.spec == P("model", None)
    assert ms.params["vae"]["encoder"]["conv_in"]["kernel"].sharding.spec == P()


def test_remat_is_numerically_identical():
    model, params, batch = _setup()
    model_r = sd3_transformer.SD3Transformer2DModel(model.config, remat=True)

    def g(m):
        return jax.jit(jax.grad(lambda x: jnp.sum(m.apply({"params": params}, x, *batch[1:]) ** 2)))(batch[0])

    assert _rel(g(model_r), g(model)) <= 1e-5  # recomputation may reassociate float32 sums


def test_protector_keeps_model_sharding_and_matches_replicated():
    """Model parallelism at the defense level: a surrogate placed with ``SD3.shard`` on a (2, 4) mesh goes
    through ``Protector`` with its transformer weights as "model"-split arguments (protect.py), and the
    AdvDM defense gives the same perturbation and losses as the replicated 1-D mesh."""
    from tdae_jax import configs, objectives, prng
    from tdae_jax.defenses import tdae
    from tdae_jax.parallel import mesh as meshlib
    from tdae_jax.protect import Protector

    sur = sd3.tiny(jax.random.key(0))
    x0 = np.random.default_rng(0).random((2, 32, 32, 3), np.float32)
    batch = {"x0": x0, "uid": prng.uids(["a", "b"]), **sur.text_batch(["a photo"] * 2)}
    results = {}
    for mp in (1, 4):
        mesh = meshlib.make_mesh(8, model_parallel=mp)
        s = sur.shard(mesh) if mp > 1 else sur
        def build(model):
            loss_fn = objectives.make_objective("advdm", model, configs.Objective(name="advdm", timesteps=1))
            return tdae.make_step(loss_fn, budget=configs.Budget(8 / 255), pgd=configs.PGD(step_size=2 / 255))

        p = Protector(build, s, mesh, 2)
        results[mp] = p.run(batch, 2, 2, prng.base_key(0))
        specs = [a.sharding.spec for a in jax.tree.leaves(p.model)]
        assert (P(None, "model") in specs) == (mp > 1), specs  # q/k/v kernels stay split over "model"
    np.testing.assert_allclose(results[4][1]["loss"], results[1][1]["loss"], rtol=1e-4)
    assert np.mean(np.abs(results[4][0] - results[1][0]) > 1e-6) < 1e-3
