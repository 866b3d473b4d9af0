"""tdae_jax.purify: names, the identity purifiers, JPEG = PIL, seeded noise, 8-bit outputs, diffusion
purification on a tiny model, and the worst case = max / min over the set (per metric)."""
import io
import math
import types

import jax
import numpy as np
import pytest
from PIL import Image

from tdae_jax import evaluate, purify


@pytest.fixture(scope="module")
def images():
    return (np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.float32) / 255.0)


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def test_parse():
    specs = purify.parse("none,jpeg95,jpeg75,jpeg50,resize,blur,noise,diffpure,noisyup")
    assert [p.name for p in specs] == ["none", "jpeg95", "jpeg75", "jpeg50", "resize0.5", "blur1", "noise4",
                                      "diffpure0.1", "noisyup0.2"]
    assert [p.needs_model for p in specs].count(True) == 2
    for bad in ("jpeg75,jpeg75", "gif", "diffpure2", "jpeg0", "none1"):
        with pytest.raises(ValueError):
            purify.parse(bad)


@pytest.mark.parametrize("name", ["none", "blur0", "noise0", "resize1"])
def test_identity_purifiers_leave_8bit_images_unchanged(images, name):
    out = purify.Purifier(name)(images, _keys(3))
    np.testing.assert_array_equal(out, images)


def test_jpeg_is_pil(images):
    out = purify.Purifier("jpeg75")(images, None)
    u8 = np.round(images * 255).astype(np.uint8)
    for o, u in zip(out, u8):
        buf = io.BytesIO()
        Image.fromarray(u).save(buf, format="JPEG", quality=75)
        np.testing.assert_array_equal(np.round(o * 255).astype(np.uint8),
                                      np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))


def test_outputs_are_8bit_and_noise_is_seeded(images):
    p = purify.Purifier("noise4")
    a, b, c = p(images, _keys(3, 1)), p(images, _keys(3, 1)), p(images, _keys(3, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for name in ("noise4", "blur1", "resize", "jpeg50"):
        out = purify.Purifier(name)(images, _keys(3))
        assert out.shape == images.shape and out.dtype == np.float32
        np.testing.assert_array_equal(out, np.round(out * 255) / 255)
        assert not np.array_equal(out, images)
    # per image: the draw of image 0 does not depend on the others
    np.testing.assert_array_equal(p(images[:1], _keys(3, 1)[:1]), a[:1])


def test_diffusion_purifiers_on_a_tiny_model(images):
    sd = evaluate.load_model("sd", "tiny")  # models.tiny("sd"), built once per session (shared with test_evaluate)
    fast = {"xla_backend_optimization_level": 0}
    with pytest.raises(ValueError, match="sd"):
        purify.Purifier("diffpure", types.SimpleNamespace(family="ip2p"))
    with pytest.raises(ValueError, match="needs a diffusion model"):
        purify.Purifier("noisyup")
    p = purify.Purifier("diffpure0.5", sd, steps=2, compiler_options=fast)
    out = p(images, _keys(3))
    assert out.shape == images.shape and np.isfinite(out).all()
    np.testing.assert_array_equal(out, np.round(out * 255) / 255)
    np.testing.assert_array_equal(p(images, _keys(3)), out)  # keyed


def test_worst_case_is_max_or_min_per_metric():
    scores = {"none": {"psnr": 20.0, "ssim": 0.5, "lpips": 0.40, "fsim": math.nan},
              "jpeg75": {"psnr": 25.0, "ssim": 0.4, "lpips": 0.30, "fsim": 0.7},
              "blur1": {"psnr": 22.0, "ssim": 0.6, "lpips": 0.35, "fsim": 0.8}}
    value, which = purify.worst_case(scores)
    assert value == {"psnr": 25.0, "ssim": 0.6, "lpips": 0.30, "fsim": 0.8}
    assert which == {"psnr": "jpeg75", "ssim": "blur1", "lpips": "jpeg75", "fsim": "blur1"}
    value, which = purify.worst_case({"none": {"psnr": math.nan}})
    assert math.isnan(value["psnr"]) and which["psnr"] == ""
    # a set of one purifier: its own scores
    assert purify.worst_case({"none": scores["jpeg75"]})[0] == scores["jpeg75"]
