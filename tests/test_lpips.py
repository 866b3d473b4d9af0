"""tdae_jax.metrics.lpips against a PyTorch LPIPS with the same (random) weights.

No pretrained weights can be downloaded here, and the ``lpips`` package needs torchvision (which cannot
be installed beside torch 2.13.0 from PyPI), so the reference below is a transcription of lpips 0.1.4's
``LPIPS.forward(..., normalize=True)`` (ScalingLayer, ``normalize_tensor``, ``NetLinLayer`` 1x1 heads,
``spatial_average``) over torchvision's AlexNet / VGG16 ``features`` layout. (During development the JAX
port was also checked against the real lpips 0.1.4 code, with its shipped v0.1 heads and a random trunk:
max relative difference 6e-7.)
"""
import os

import numpy as np
import pytest
import torch
import torch.nn as tnn
from safetensors.torch import save_file

from tdae_jax.metrics import compute_all
from tdae_jax.metrics.lpips import LPIPS, load_lpips_params, lpips, make_lpips_fn, params_from_torch_state_dict


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend (2 shared cores)
    yield
    torch.set_num_threads(n)


def _alexnet_features():  # torchvision.models.alexnet().features
    return tnn.Sequential(
        tnn.Conv2d(3, 64, 11, 4, 2), tnn.ReLU(True), tnn.MaxPool2d(3, 2),
        tnn.Conv2d(64, 192, 5, padding=2), tnn.ReLU(True), tnn.MaxPool2d(3, 2),
        tnn.Conv2d(192, 384, 3, padding=1), tnn.ReLU(True), tnn.Conv2d(384, 256, 3, padding=1), tnn.ReLU(True),
        tnn.Conv2d(256, 256, 3, padding=1), tnn.ReLU(True), tnn.MaxPool2d(3, 2))


def _vgg16_features():  # torchvision.models.vgg16().features
    layers, c = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(tnn.MaxPool2d(2, 2))
        else:
            layers += [tnn.Conv2d(c, v, 3, padding=1), tnn.ReLU(True)]
            c = v
    return tnn.Sequential(*layers)


# (features, slice ends as in lpips.pretrained_networks, channels)
NETS = {"alex": (_alexnet_features, (2, 5, 8, 10, 12), (64, 192, 384, 256, 256)),
        "vgg": (_vgg16_features, (4, 9, 16, 23, 30), (64, 128, 256, 512, 512))}


class TorchLPIPS(tnn.Module):
    """lpips.LPIPS(net=..., version='0.1') forward with normalize=True, eval mode (dropout off)."""

    def __init__(self, net):
        super().__init__()
        make, self.ends, chns = NETS[net]
        self.features = make()
        self.lins = tnn.ModuleList(
            [tnn.Sequential(tnn.Dropout(), tnn.Conv2d(c, 1, 1, bias=False)) for c in chns])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        for lin in self.lins:  # trained heads are non-negative
            lin[1].weight.data.abs_()
        self.eval()

    def taps(self, x):
        h, start, out = (x - self.shift) / self.scale, 0, []
        for end in self.ends:
            h = self.features[start:end](h)
            out.append(h)
            start = end
        return out

    @torch.no_grad()
    def forward(self, a, b):  # [N, 3, H, W] in [0, 1]
        norm = lambda f: f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + 1e-10)
        fa, fb = self.taps(2 * a - 1), self.taps(2 * b - 1)
        return sum(lin((norm(x) - norm(y)) ** 2).mean([2, 3], keepdim=True)
                   for lin, x, y in zip(self.lins, fa, fb)).flatten()

    def trunk_state(self):  # torchvision names: features.{idx}.weight|bias
        return {f"features.{k}": v.clone() for k, v in self.features.state_dict().items()}

    def head_state(self):  # lpips names: lin{i}.model.1.weight
        return {f"lin{i}.model.1.weight": lin[1].weight.detach().clone() for i, lin in enumerate(self.lins)}


def _images(h, w, seed, b=3, noise=0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h, w, generator=g)
    y = (x + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy().copy()
    return x, y, nhwc(x), nhwc(y)


@pytest.fixture(scope="module")
def alex(tmp_path_factory):
    """Random AlexNet LPIPS, written as the two files one would use: trunk + heads (safetensors)."""
    torch.manual_seed(0)
    ref = TorchLPIPS("alex")
    d = tmp_path_factory.mktemp("lpips")
    save_file(ref.trunk_state(), str(d / "alexnet_features.safetensors"))
    save_file(ref.head_state(), str(d / "alex_lin.safetensors"))
    params = load_lpips_params([d / "alexnet_features.safetensors", d / "alex_lin.safetensors"], net="alex")
    return ref, params, d


@pytest.mark.parametrize("h,w,seed", [(64, 64, 0), (48, 64, 1)])
def test_alex_matches_torch_reference(alex, h, w, seed):
    ref, params, _ = alex
    tx, ty, x, y = _images(h, w, seed)
    want = ref(tx, ty).numpy()
    got = np.asarray(lpips(params, x, y))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=0)
    assert got.shape == (3,) and np.all(got > 0)


def test_vgg_matches_torch_reference(tmp_path):
    torch.manual_seed(1)
    ref = TorchLPIPS("vgg")
    path = tmp_path / "vgg.npz"  # the .npz route, one file
    np.savez(path, **{k: v.numpy() for k, v in {**ref.trunk_state(), **ref.head_state()}.items()})
    tx, ty, x, y = _images(32, 32, 2)
    np.testing.assert_allclose(np.asarray(lpips(load_lpips_params(str(path), net="vgg"), x, y, net="vgg")),
                               ref(tx, ty).numpy(), rtol=1e-4, atol=0)


def test_identical_images_give_zero_and_batch_is_per_image(alex):
    ref, params, _ = alex
    _, _, x, y = _images(64, 64, 3)
    y[1] = x[1]
    d = np.asarray(lpips(params, x, y))
    assert d[1] == 0.0 and d[0] > 0 and d[2] > 0
    np.testing.assert_array_equal(np.asarray(lpips(params, x, x.copy())), 0.0)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(lpips(params, x[i:i + 1], y[i:i + 1]))[0], d[i], rtol=1e-5, atol=0)


def test_lpips_grows_with_noise(alex):
    _, params, _ = alex
    g = np.random.default_rng(4)
    x = g.random((1, 64, 64, 3)).astype(np.float32)
    z = g.standard_normal(x.shape).astype(np.float32)
    a = np.concatenate([np.clip(x + s * z, 0, 1) for s in (0.02, 0.1, 0.3)])
    d = np.asarray(lpips(params, a, np.repeat(x, 3, axis=0)))
    assert np.all(np.diff(d) > 0), d


def test_lpips_package_names_load_identically(alex):
    """lpips.LPIPS.state_dict() names: net.slice{k}.{idx}.*, lin{i}.model.1.*, lins.{i}.model.1.*, buffers."""
    ref, params, _ = alex
    state = {}
    for k, v in ref.trunk_state().items():
        idx = int(k.split(".")[1])
        state[f"net.slice{sum(idx >= e for e in NETS['alex'][1]) + 1}.{idx}.{k.split('.')[2]}"] = v.numpy()
    for k, v in ref.head_state().items():
        state[k] = state["lins." + k[3:]] = v.numpy()
    state["scaling_layer.shift"] = np.zeros((1, 3, 1, 1), np.float32)
    got = params_from_torch_state_dict(state, net="alex")
    for name in params:
        for leaf in params[name]:
            np.testing.assert_array_equal(got[name][leaf], params[name][leaf])


def test_flax_module_and_compute_all(alex):
    _, params, _ = alex
    _, _, x, y = _images(48, 64, 5)
    direct = np.asarray(LPIPS("alex").apply({"params": params}, x, y))
    out = compute_all(x, y, lpips_fn=make_lpips_fn(params))
    np.testing.assert_allclose(np.asarray(out["lpips"]), direct, rtol=1e-6)


def test_loading_errors_name_file_and_tensor(alex, tmp_path):
    ref, _, d = alex
    trunk, heads = str(d / "alexnet_features.safetensors"), str(d / "alex_lin.safetensors")
    with pytest.raises(KeyError, match=r"lin0\.model\.1\.weight.*alexnet_features\.safetensors"):
        load_lpips_params(trunk, net="alex")
    with pytest.raises(KeyError, match=r"features\.0\.weight.*alex_lin\.safetensors"):
        load_lpips_params(heads, net="alex")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_lpips_params([trunk, str(tmp_path / "nope.safetensors")])
    bad = ref.head_state()
    bad["lin2.model.1.weight"] = bad["lin2.model.1.weight"][:, :100].clone()
    save_file(bad, str(tmp_path / "bad_lin.safetensors"))
    with pytest.raises(ValueError, match=r"lin2\.model\.1\.weight.*bad_lin\.safetensors.*\(1, 100, 1, 1\)"):
        load_lpips_params([trunk, str(tmp_path / "bad_lin.safetensors")])
    with pytest.raises(ValueError, match="both"):
        load_lpips_params([trunk, trunk])
    pth = tmp_path / "alex.pth"
    pth.write_bytes(b"not read")
    with pytest.raises(ValueError, match="never unpickle"):
        load_lpips_params(str(pth))
    with pytest.raises(ValueError, match="unknown LPIPS trunk"):
        load_lpips_params([trunk, heads], net="squeeze")
    assert os.path.exists(trunk)
