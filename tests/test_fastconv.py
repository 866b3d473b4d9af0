"""Polyphase input gradient of the stride-2 downsampling convolutions (tdae_jax/models/fastconv.py): the same
function and gradients as ``lax.conv_general_dilated``, and what the surrogates actually run on CPU."""
import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from tdae_jax import models
from tdae_jax.models import fastconv

PADS = [((0, 1), (0, 1)),   # diffusers' VAE Downsample2D (explicit pad, then VALID)
        ((1, 1), (1, 1)),   # the UNet's Downsample2D
        ((0, 0), (0, 0)),
        ((2, 1), (0, 2))]   # asymmetric, more than one pixel


@pytest.mark.parametrize("hw", [(8, 8), (9, 7), (6, 11)])
@pytest.mark.parametrize("pads", PADS)
def test_value_and_gradients_match_lax(hw, pads):
    rng = np.random.default_rng(hash((hw, pads)) % 2**32)
    x = jnp.asarray(rng.standard_normal((2, *hw, 3)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 3, 5)), jnp.float32)

    def ref(x, k):
        return lax.conv_general_dilated(x, k, (2, 2), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def new(x, k):
        return fastconv.conv3x3_s2(x, k, pads)

    y_ref, y_new = ref(x, k), new(x, k)
    np.testing.assert_array_equal(np.asarray(y_new), np.asarray(y_ref))  # forward is lax's own
    g = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)
    dx_ref, dk_ref = jax.vjp(ref, x, k)[1](g)
    dx_new, dk_new = jax.jit(lambda x, k: jax.vjp(new, x, k)[1](g))(x, k)
    scale = float(jnp.abs(dx_ref).max())
    assert float(jnp.abs(dx_new - dx_ref).max()) <= 1e-5 * scale
    np.testing.assert_allclose(np.asarray(dk_new), np.asarray(dk_ref), rtol=1e-5, atol=1e-5)
    # every input pixel that a window touches gets a gradient; the rest (beyond the last window) none
    assert dx_new.shape == x.shape


def test_bfloat16_inputs_keep_their_dtype():
    x = jnp.ones((1, 8, 8, 4), jnp.bfloat16)
    k = jnp.full((3, 3, 4, 4), 0.1, jnp.bfloat16)
    dx, dk = jax.grad(lambda x, k: fastconv.conv3x3_s2(x, k, ((0, 1), (0, 1))).astype(jnp.float32).sum(),
                      argnums=(0, 1))(x, k)
    assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16
    ref = jax.grad(lambda x: lax.conv_general_dilated(x.astype(jnp.float32), k.astype(jnp.float32), (2, 2),
                                                      ((0, 1), (0, 1)),
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC")).sum())(x)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(ref), rtol=1e-2)


@pytest.mark.parametrize("family", ["ip2p"])  # its VAE and 8-channel UNet both downsample
def test_surrogate_gradients_use_polyphase_and_are_unchanged(family, monkeypatch):
    """The VAE encoder and the UNet of a tiny surrogate: on CPU their input gradients run without any
    lhs-dilated convolution, and equal the plain modules' gradients."""
    sur = models.tiny(family)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0, 1, (2, 32, 32, 3)), jnp.float32)
    z = jnp.asarray(rng.standard_normal(sur.encode(x).shape), jnp.float32)
    emb = jnp.asarray(rng.standard_normal((2, 77, sur.static.unet.cross_attention_dim)), jnp.float32)
    img = jnp.asarray(rng.standard_normal(z.shape), jnp.float32) if family == "ip2p" else None

    def make_grads():  # a fresh function per trace (jit caches traces by function)
        def grads(x, z):
            enc = jax.grad(lambda x: jnp.sum(sur.encode(x) ** 2))(x)
            unet = jax.grad(lambda z: jnp.sum(sur.eps(z, jnp.array([10, 500]), emb, image_latents=img) ** 2))(z)
            return enc, unet
        return jax.jit(grads)

    f = make_grads()
    assert "lhs_dilate" not in f.lower(x, z).compile().as_text()
    with_poly = f(x, z)
    monkeypatch.setattr(fastconv, "polyphase_downsampling", contextlib.nullcontext)
    f_plain = make_grads()
    # the plain modules' transposed strided convolutions (VAE and UNet downsampling)
    assert len(re.findall("lhs_dilate", f_plain.lower(x, z).compile().as_text())) >= 2
    plain = f_plain(x, z)
    for a, b in zip(with_poly, plain):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max()))


def test_input_is_saved_only_when_the_kernel_gradient_is_wanted():
    """An attack differentiates w.r.t. the image only: the convolution's input is then not kept for the backward
    pass (the input gradient of a convolution needs only the kernel); a training step (kernel gradient) keeps it."""
    from jax._src import ad_checkpoint

    x, k = jnp.ones((1, 16, 16, 8)), jnp.ones((3, 3, 8, 8))

    def f(x, k):
        return jnp.sum(jnp.sin(fastconv.conv3x3_s2(x, k, ((0, 1), (0, 1)))))

    def saved(fn, *args):
        return [tuple(a.shape) for a, _ in ad_checkpoint.saved_residuals(fn, *args)]

    assert x.shape not in saved(lambda x: f(x, k), x)
    assert x.shape in saved(f, x, k)
    dx_only = jax.grad(lambda x: f(x, k))(x)
    np.testing.assert_array_equal(np.asarray(dx_only), np.asarray(jax.grad(f, argnums=0)(x, k)))
