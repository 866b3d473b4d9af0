"""GroupNorm with per-channel sums and a closed-form backward pass (tdae_jax/models/fastnorm.py): the same function
and gradients as ``flax.linen.GroupNorm``, through second order, and what the surrogates actually run."""
import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdae_jax import models
from tdae_jax.models import fastnorm


def _flax_gn(groups, eps=1e-6, **kw):
    mod = nn.GroupNorm(groups, epsilon=eps, **kw)
    return lambda x, s, b: mod.apply({"params": {"scale": s, "bias": b}}, x)


def _inputs(shape, seed, mean=0.7, std=2.0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    return (jnp.asarray(rng.standard_normal(shape) * std + mean, jnp.float32),
            jnp.asarray(rng.standard_normal(c), jnp.float32), jnp.asarray(rng.standard_normal(c), jnp.float32),
            jnp.asarray(rng.standard_normal(shape), jnp.float32))


def _close(a, b, tol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.abs(a - b).max() <= tol * np.abs(b).max(), (np.abs(a - b).max(), np.abs(b).max())


@pytest.mark.parametrize("shape,groups", [((2, 8, 8, 64), 32), ((2, 5, 7, 32), 8), ((3, 10, 16), 4),
                                          ((1, 4, 6, 3, 12), 3)])
def test_value_and_all_gradients_match_flax(shape, groups):
    x, s, b, g = _inputs(shape, seed=len(shape) * 100 + groups)
    ref, new = _flax_gn(groups), (lambda x, s, b: fastnorm.group_norm(x, s, b, groups, 1e-6))
    _close(jax.jit(new)(x, s, b), ref(x, s, b), 1e-6)
    vjp_new = jax.jit(lambda x, s, b: jax.vjp(new, x, s, b)[1](g))(x, s, b)
    vjp_ref = jax.vjp(ref, x, s, b)[1](g)
    for a, r in zip(vjp_new, vjp_ref):  # dx, dscale, dbias
        _close(a, r, 1e-5)


def test_backward_rules_agree_cpu_and_default():
    """The CPU closed form and the autodiff rule that other backends run give the same cotangents."""
    x, s, b, g = _inputs((2, 6, 6, 16), seed=1, mean=-3.0, std=0.5)
    _, (mu, r) = fastnorm._forward(x, s, b, 4, 1e-6, jnp.float32)
    closed = fastnorm.closed_form_vjp(g, x, s, b, mu, r, 4)
    auto = fastnorm.autodiff_vjp(g, x, s, b, 4, 1e-6, jnp.float32)
    for a, r_ in zip(closed, auto):
        _close(a, r_, 1e-5)


def test_gradient_of_a_gradient_norm_matches_flax():
    """FDM's exact penalty differentiates the input gradient again: that goes through the closed-form backward."""
    x, s, b, g = _inputs((2, 6, 6, 16), seed=2)
    new = lambda x, s, b: fastnorm.group_norm(x, s, b, 8, 1e-6)  # noqa: E731

    def penalty(f):
        grad = jax.grad(lambda x: jnp.sum(jnp.sin(f(x, s, b)) * g))
        return lambda x: jnp.sum(jnp.square(grad(x)))

    _close(jax.jit(jax.grad(penalty(new)))(x), jax.grad(penalty(_flax_gn(8)))(x), 1e-5)


def test_bfloat16_keeps_dtypes():
    x, s, b, g = _inputs((1, 8, 8, 32), seed=3)
    xb, sb, bb = (a.astype(jnp.bfloat16) for a in (x, s, b))
    y = fastnorm.group_norm(xb, sb, bb, 32, 1e-6)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(_flax_gn(32)(xb, sb, bb), np.float32))
    grads = jax.grad(lambda x, s, b: jnp.sum(fastnorm.group_norm(x, s, b, 32, 1e-6).astype(jnp.float32) * g),
                     argnums=(0, 1, 2))(xb, s, bb)
    assert [a.dtype for a in grads] == [jnp.bfloat16, jnp.float32, jnp.bfloat16]
    # float32 master scale with bf16 activations: Flax promotes the output to float32, so do we
    assert fastnorm.group_norm(xb, s, b, 32, 1e-6).dtype == jnp.float32


@pytest.fixture
def routed(monkeypatch):
    """Shapes of the inputs that the interceptor sends to ``fastnorm.group_norm`` while tracing."""
    seen, orig = [], fastnorm.group_norm

    def counting(x, *a, **kw):
        seen.append(tuple(x.shape))
        return orig(x, *a, **kw)

    monkeypatch.setattr(fastnorm, "group_norm", counting)
    return seen


def test_interceptor_routes_only_eligible_groupnorms(routed):
    x, s, b, _ = _inputs((2, 4, 4, 16), seed=4)

    def uses_custom(fn):
        before = len(routed)
        jax.make_jaxpr(fn)(x)
        return len(routed) > before

    eligible = _flax_gn(4)
    other = [_flax_gn(None, group_size=4), _flax_gn(4, use_fast_variance=False)]
    with fastnorm.fast_group_norm():
        assert uses_custom(lambda x: eligible(x, s, b))
        _close(eligible(x, s, b), _flax_gn(4)(x, s, b), 1e-6)
        for f in other:  # group_size instead of num_groups, centered variance: Flax's own code
            assert not uses_custom(lambda x: f(x, s, b))
    assert not uses_custom(lambda x: eligible(x, s, b))
    # use_scale=False has no scale parameter: passed through
    mod = nn.GroupNorm(4, use_scale=False)
    with fastnorm.fast_group_norm():
        assert not uses_custom(lambda x: mod.apply({"params": {"bias": b}}, x))
        params = mod.init(jax.random.key(0), x)  # init traces the plain module
    assert set(params["params"]) == {"bias"}


def test_surrogate_gradients_are_unchanged(monkeypatch, routed):
    """A tiny InstructPix2Pix surrogate's VAE encoder, decoder and UNet: their gradients through the fast
    GroupNorm equal the plain Flax modules' gradients."""
    sur = models.tiny("ip2p")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0, 1, (2, 32, 32, 3)), jnp.float32)
    z = jnp.asarray(rng.standard_normal(sur.encode(x).shape), jnp.float32)
    emb = jnp.asarray(rng.standard_normal((2, 77, sur.static.unet.cross_attention_dim)), jnp.float32)

    def make_grads():  # a fresh function per trace (jit caches traces by function)
        def grads(x, z):
            enc = jax.grad(lambda x: jnp.sum(sur.encode(x) ** 2))(x)
            dec = jax.grad(lambda z: jnp.sum(sur.decode(z) ** 2))(z)
            unet = jax.grad(lambda z: jnp.sum(sur.eps(z, jnp.array([10, 500]), emb, image_latents=z) ** 2))(z)
            return enc, dec, unet
        return jax.jit(grads)

    fast = make_grads()(x, z)
    # the VAE's norms (at the image's 32 px) and the UNet's (at the latents' size) went through group_norm
    assert len(routed) >= 10 and {32, z.shape[2]} <= {shape[1] for shape in routed}
    monkeypatch.setattr(fastnorm, "fast_group_norm", contextlib.nullcontext)
    plain = make_grads()(x, z)
    for a, b in zip(fast, plain):  # float32 rounding through a whole network (the parity tests' 1e-4)
        _close(a, b, 1e-4)
