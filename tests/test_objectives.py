"""Each host objective, optimised by sign-PGD on the tiny surrogates, moves the way its paper says:
the minimized objective O falls (PhotoGuard: latent/edit pulled to the target; AdvDM/eps-discrepancy:
the denoising error grows; SA: the prompt's cross-attention mass shrinks; Mist/ACE: towards the
target pattern; SDS(-): the SDS surrogate falls). Evaluated before/after with the SAME keys (same t, eps)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdae_jax import configs, models, objectives, prng
from tdae_jax.defenses import tdae

HOSTS = ["pge", "pge_untargeted", "pgd", "advdm", "tdae_v1", "sds", "mist", "ace", "sa"]
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}  # directions and values, not speed: compile cheaply


_SURS = {}


def _world(family):
    if family in _SURS:
        return _SURS[family]
    sur = models.tiny(family)
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.integers(0, 256, (2, 16, 16, 3)) / 255.0, jnp.float32)  # 8 x 8 latents
    ids = sur.tokenize(["make the circle red", "add snow"])
    batch = {"x0": x0, "uid": jnp.asarray(prng.uids(["a", "b"])), "emb": sur.embed_ids(ids),
             "uncond": sur.embed_ids(sur.tokenize(["", ""])),
             "token_mask": jnp.asarray(objectives.semantic_attention.content_token_mask(ids, sur.static.tokenizer))}
    _SURS[family] = (sur, batch)
    return sur, batch


@pytest.fixture(scope="module")
def world():
    return _world("ip2p")


# every host on the InstructPix2Pix surrogate; the SD img2img family for the hosts whose path differs
CASES = [(h, "ip2p") for h in HOSTS] + [("pgd", "sd"), ("advdm", "sd")]


@pytest.mark.parametrize("host,family", CASES)
def test_objective_falls_under_pgd(host, family):
    sur, batch = _world(family)
    # 2 passes (reps averaged in a scan); 1 unrolled sampler step (the chain itself: test_photoguard.py)
    cfg = configs.Objective(name=host, timesteps=2, denoise_steps=1, pgd_grad_reps=2)
    stochastic = objectives.make_objective(host, sur, cfg)
    # One fixed (t, eps) draw: the objective becomes a deterministic function of delta, so "it falls" is a
    # property of the optimiser's direction (a sign error would make it rise), not of Monte-Carlo luck.
    fixed = prng.image_keys(prng.base_key(100), batch["uid"], 0)
    loss_fn = lambda d, b, e, k: stochastic(d, b, e, fixed)  # noqa: E731
    steps = 4
    init_fn, step_fn = tdae.make_step(loss_fn, budget=configs.Budget(16 / 255),
                                      pgd=configs.PGD(step_size=1 / 255, steps=steps,
                                                      random_start=0.25 if objectives.needs_random_start(host) else 0))
    key = prng.base_key(0)
    state = init_fn(batch, key)
    step = jax.jit(step_fn, compiler_options=FAST)
    losses = []  # a step reports O at its starting delta: step 0 = before, step N (not applied) = after N steps
    for i in range(steps + 1):
        new, m = step(state, batch, key)
        losses.append(np.asarray(m["loss"]))
        assert np.all(np.isfinite(losses[-1]))
        assert np.all(np.asarray(m["grad_norm"]) > 0), "zero gradient: the host would never move"
        state = new if i < steps else state
    before, after = losses[0], losses[-1]
    assert np.all(after < before), (host, before, after)  # per image: the reduction is per-image
    assert float(jnp.max(jnp.abs(state.delta))) <= 16 / 255 + 1e-6


def test_sa_attention_maps_are_probabilities(world):
    sur, batch = world

    def attention_maps(batch):
        z = sur.encode(batch["x0"])
        t = jnp.array([500, 500])
        return sur.unet_out(z, t, batch["emb"], attention=lambda p: True,
                            **objectives.common.conditioning(sur, batch["x0"], batch))[1]

    maps = jax.jit(attention_maps, compiler_options=FAST)(batch)
    assert any(k.endswith("attn2") for k in maps) and any(k.endswith("attn1") for k in maps)
    for k, m in maps.items():
        np.testing.assert_allclose(np.asarray(m.sum(-1)), 1.0, rtol=1e-5)  # rows of a softmax


def test_unknown_objective_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown objective"):
        objectives.make_objective("nope", None)


def test_sds_plus_is_sds_minus_negated_on_the_same_draws(world):
    """Diff-Protect (``attacks.py`` ``Linf_PGD.pgd_sds``) steps x along J_E^T (eps_theta - eps) for g_mode "+" and
    against it for "-": as minimized objectives SDS(+) = -SDS(-), value and gradient, on the same draws."""
    sur, batch = world
    keys = prng.image_keys(prng.base_key(3), batch["uid"], 0)
    delta = jnp.asarray(np.random.default_rng(1).uniform(-4, 4, batch["x0"].shape) / 255.0, jnp.float32)

    def value_and_grad(name):
        f = objectives.make_objective(name, sur, configs.Objective(name=name, timesteps=2))
        return f(delta, batch, batch["emb"], keys), jax.grad(lambda d: f(d, batch, batch["emb"], keys).sum())(delta)

    (v_plus, g_plus), (v_minus, g_minus) = jax.jit(lambda: (value_and_grad("sds_plus"), value_and_grad("sds")),
                                                   compiler_options=FAST)()
    for a in (v_plus, g_plus, v_minus, g_minus):
        assert np.all(np.isfinite(np.asarray(a)))
    assert np.all(np.linalg.norm(np.asarray(g_minus).reshape(2, -1), axis=1) > 0)  # per image: a real direction
    np.testing.assert_allclose(np.asarray(v_plus), -np.asarray(v_minus), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_plus), -np.asarray(g_minus), rtol=1e-6, atol=1e-12)
