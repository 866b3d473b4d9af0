"""tdae_jax.eot: the differentiable JPEG against PIL (libjpeg-turbo), non-zero gradients, the transforms
against their host references, and the EOT wrapper (empty set = the plain objective, averaging, keys,
per-image independence).

Tolerance of the differentiable JPEG (forward pass, on the shipped sample photos at 64x64, q in 95/75/50):
mean |ours - PIL| <= 1.5/255 per image, PSNR(ours, PIL) >= 35 dB, and the mismatch is < 1/3 of what JPEG
itself changes (mean |PIL - input|). It is not bit exact: libjpeg's integer DCT (islow) and its fixed-point
colour conversion flip a few quantized coefficients relative to float math (max |diff| up to ~16/255 on a
handful of pixels at q=50).
"""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tdae_jax import eot
from tdae_jax.data import io as dio


_jpeg = jax.jit(eot.jpeg, static_argnames=("quality", "rounding"))


def _pil_jpeg(u8, q):
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=q)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


@pytest.fixture(scope="module")
def photos():
    """[3, 64, 64, 3] uint8: the shipped sample photos, centre-cropped."""
    return np.stack([(dio.load_image(p, size=64, resize="center_crop").array * 255).round().astype(np.uint8)
                     for p in sorted(dio.sample_dir().glob("*.png"))])


@pytest.mark.parametrize("q", [95, 75, 50])
def test_differentiable_jpeg_close_to_pil(photos, q):
    ref = np.stack([_pil_jpeg(u, q) for u in photos]).astype(np.float64)
    ours = np.asarray(_jpeg(jnp.asarray(photos, jnp.float32) / 255.0, quality=q)) * 255.0
    assert np.allclose(ours, np.round(ours), atol=1e-3), "forward pass must land on the 8-bit grid"
    err = np.abs(ours - ref).mean(axis=(1, 2, 3))
    own = np.abs(ref - photos).mean(axis=(1, 2, 3))
    psnr = 10 * np.log10(255.0 ** 2 / ((ours - ref) ** 2).mean(axis=(1, 2, 3)))
    assert (err <= 1.5).all(), err
    assert (psnr >= 35).all(), psnr
    assert (err < own / 3).all(), (err, own)


def test_jpeg_quality_tables_match_ijg():
    lum, chrom = eot.quant_tables(50)
    assert lum[0, 0] == 16 and chrom[0, 0] == 17 and lum[7, 7] == 99  # q=50: the Annex K tables themselves
    lum, _ = eot.quant_tables(100)
    assert (lum == 1).all()
    lum, _ = eot.quant_tables(1)
    assert lum.max() == 255  # force_baseline clamp


@pytest.mark.parametrize("rounding", ["ste", "cubic"])
def test_jpeg_gradients_are_nonzero_and_finite(photos, rounding):
    x = jnp.asarray(photos[:2, :32, :32], jnp.float32) / 255.0 * 0.9 + 0.05
    w = jax.random.normal(jax.random.key(0), x.shape)
    g = jax.jit(jax.grad(lambda v: jnp.sum(eot.jpeg(v, 75, rounding) * w)))(x)
    g = np.asarray(g)
    assert np.isfinite(g).all()
    assert (np.abs(g).reshape(2, -1).max(axis=1) > 1e-3).all()  # every image gets a gradient
    assert (np.abs(g) > 0).mean() > 0.5


def test_other_transforms_have_gradients():
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3)) * 0.8 + 0.1
    keys = jax.random.split(jax.random.key(2), 2)
    ts = eot.parse_transforms("resize,blur,noise,identity")
    gs = jax.jit(lambda v: [jax.grad(lambda u, t=t: jnp.sum(t(u, keys) ** 2))(v) for t in ts])(x)
    for t, g in zip(ts, gs):
        g = np.asarray(g)
        assert np.isfinite(g).all() and np.abs(g).max() > 0, t.name


def test_resize_close_to_pil_bicubic(photos):
    resize = jax.jit(eot.resize_down_up, static_argnums=1)
    ours = np.asarray(resize(jnp.asarray(photos, jnp.float32) / 255.0, 0.5)) * 255
    ref = []
    for u in photos:
        small = Image.fromarray(u).resize((32, 32), Image.Resampling.BICUBIC)
        ref.append(np.asarray(small.resize((64, 64), Image.Resampling.BICUBIC)))
    assert np.abs(ours - np.stack(ref)).mean() < 1.0  # /255; PIL rounds to 8 bit twice


def test_blur_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = np.random.default_rng(0).random((1, 24, 20, 3)).astype(np.float32)
    ours = np.asarray(eot.gaussian_blur(jnp.asarray(x), 1.0))
    ref = ndimage.gaussian_filter(x[0].astype(np.float64), sigma=(1.0, 1.0, 0), mode="reflect", truncate=4.0)
    np.testing.assert_allclose(ours[0], ref, atol=1e-5)


def test_parse_names_and_errors():
    ts = eot.parse_transforms("jpeg,jpeg50,resize0.25,blur1.5,noise8,identity")
    assert [t.name for t in ts] == ["jpeg75", "jpeg50", "resize0.25", "blur1.5", "noise8", "identity"]
    assert eot.parse_transforms("") == ()
    for bad in ("jpg", "jpeg0", "resize2", "identity3", "noise-1"):
        with pytest.raises(ValueError):
            eot.parse_transforms(bad)


# ------------------------------------------------------------------------------------------------ the wrapper
def _toy_loss(delta, batch, emb, keys):
    """A per-image objective with its own randomness (like the hosts' timestep draws)."""
    x = batch["x0"] + delta
    r = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), ()))(keys)
    return jnp.mean((x - 0.3) ** 2, axis=(1, 2, 3)) * (1.0 + 0.1 * r)


@pytest.fixture(scope="module")
def toy():
    x0 = jax.random.uniform(jax.random.key(3), (3, 16, 16, 3))
    delta = 0.03 * jax.random.uniform(jax.random.key(4), x0.shape, minval=-1, maxval=1)
    keys = jax.random.split(jax.random.key(5), 3)
    return delta, {"x0": x0}, keys


def test_empty_transform_set_is_the_plain_objective(toy):
    delta, batch, keys = toy
    assert eot.wrap_objective(_toy_loss, ()) is _toy_loss
    plain = np.asarray(_toy_loss(delta, batch, None, keys))
    ident = np.asarray(eot.wrap_objective(_toy_loss, eot.parse_transforms("identity"))(delta, batch, None, keys))
    np.testing.assert_array_equal(ident, plain)


def test_wrapper_averages_transforms_with_derived_keys(toy):
    delta, batch, keys = toy
    ts = eot.parse_transforms("jpeg75,noise4")
    f = eot.wrap_objective(_toy_loss, ts, n_samples=2)
    got = np.asarray(jax.jit(f)(delta, batch, None, keys))

    @jax.jit
    def manual(delta, batch, keys):
        x0, acc = batch["x0"], 0.0
        for ti, t in enumerate(ts):
            for s in range(2):
                tk = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, eot.EOT_STREAM), ti * 1000 + s))(keys)
                lk = keys if s == 0 else jax.vmap(lambda k: jax.random.fold_in(k, eot.OBJ_STREAM + s))(keys)
                acc = acc + _toy_loss(t(x0 + delta, tk) - x0, batch, None, lk)
        return acc / 4

    manual = manual(delta, batch, keys)
    np.testing.assert_allclose(got, np.asarray(manual), rtol=1e-5)
    again = np.asarray(jax.jit(f)(delta, batch, None, keys))
    np.testing.assert_array_equal(got, again)  # same keys, same transforms (FDM's g1 / g2 see the same draws)
    other = np.asarray(jax.jit(f)(delta, batch, None, jax.random.split(jax.random.key(9), 3)))
    assert not np.allclose(other, got)
    g = jax.jit(jax.grad(lambda d: jnp.sum(f(d, batch, None, keys))))(delta)
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0


def test_wrapper_is_per_image(toy):
    delta, batch, keys = toy
    f = jax.jit(eot.wrap_objective(_toy_loss, eot.parse_transforms("jpeg50,noise"), n_samples=2))
    full = np.asarray(f(delta, batch, None, keys))
    ones = [np.asarray(f(delta[i:i + 1], {"x0": batch["x0"][i:i + 1]}, None, keys[i:i + 1]))[0] for i in range(3)]
    np.testing.assert_allclose(full, ones, rtol=1e-5)
