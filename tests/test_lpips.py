"""tdae_jax.metrics.lpips: weight loading and parity with a PyTorch LPIPS holding the same random weights.

No pretrained weights can be downloaded here, and the ``lpips`` package needs torchvision (which cannot
be installed beside torch 2.13.0 from PyPI), so the reference below is a transcription of lpips 0.1.4's
``LPIPS.forward(..., normalize=True)`` (ScalingLayer, ``normalize_tensor``, ``NetLinLayer`` 1x1 heads,
``spatial_average``) over torchvision's AlexNet / VGG16 ``features`` layout. (During development the JAX
port was also checked against the real lpips 0.1.4 code, with its shipped v0.1 heads and a random trunk:
max relative difference 6e-7.) Random weights are drawn with numpy and written with torch's tensor names,
so the loading tests run without torch; the parity tests need the [parity] extra.
"""
import contextlib
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from tdae_jax.metrics import compute_all
from tdae_jax.metrics.lpips import LPIPS, load_lpips_params, lpips, make_lpips_fn, params_from_torch_state_dict

try:  # the [parity] extra
    import torch
    import torch.nn as tnn
except ImportError:
    torch = tnn = None

# torchvision `features` conv layers: idx -> (in, out, kernel); lpips slice ends; head channels
NETS = {
    "alex": ({0: (3, 64, 11), 3: (64, 192, 5), 6: (192, 384, 3), 8: (384, 256, 3), 10: (256, 256, 3)},
             (2, 5, 8, 10, 12), (64, 192, 384, 256, 256)),
    "vgg": ({0: (3, 64, 3), 2: (64, 64, 3), 5: (64, 128, 3), 7: (128, 128, 3), 10: (128, 256, 3),
             12: (256, 256, 3), 14: (256, 256, 3), 17: (256, 512, 3), 19: (512, 512, 3), 21: (512, 512, 3),
             24: (512, 512, 3), 26: (512, 512, 3), 28: (512, 512, 3)},
            (4, 9, 16, 23, 30), (64, 128, 256, 512, 512)),
}


def _random_state(net, seed):
    """torch-default-like init (U(+-1/sqrt(fan_in))) under torch names; heads non-negative, as trained."""
    rng = np.random.default_rng(seed)
    convs, _, chns = NETS[net]
    trunk, heads = {}, {}
    for idx, (cin, cout, k) in convs.items():
        bound = 1 / np.sqrt(cin * k * k)
        trunk[f"features.{idx}.weight"] = rng.uniform(-bound, bound, (cout, cin, k, k)).astype(np.float32)
        trunk[f"features.{idx}.bias"] = rng.uniform(-bound, bound, (cout,)).astype(np.float32)
    for i, c in enumerate(chns):
        heads[f"lin{i}.model.1.weight"] = np.abs(rng.uniform(-1, 1, (1, c, 1, 1)) / np.sqrt(c)).astype(np.float32)
    return trunk, heads


@contextlib.contextmanager
def _torch_lpips(net, state):
    """lpips.LPIPS(net=..., version='0.1')(a, b, normalize=True) in eval mode, over torchvision's
    ``features`` (AlexNet: conv-relu-pool ..., VGG16: 13 convs, 5 max-pools), loaded from ``state``."""
    if torch is None:
        if os.environ.get("TDAE_REQUIRE_PARITY") == "1":
            pytest.fail("torch is required for the LPIPS parity checks (TDAE_REQUIRE_PARITY=1)")
        pytest.skip("torch not installed (pip install -e '.[parity]')")
    convs, ends, chns = NETS[net]
    layers = []
    for i in range(ends[-1]):
        if i in convs:
            cin, cout, k = convs[i]
            layers.append(tnn.Conv2d(cin, cout, k, stride=4 if k == 11 else 1, padding={11: 2, 5: 2, 3: 1}[k]))
        elif i - 1 in convs:
            layers.append(tnn.ReLU(True))
        else:
            layers.append(tnn.MaxPool2d(3, 2) if net == "alex" else tnn.MaxPool2d(2, 2))
    features = tnn.Sequential(*layers)
    lins = tnn.ModuleList([tnn.Sequential(tnn.Dropout(), tnn.Conv2d(c, 1, 1, bias=False)) for c in chns])
    features.load_state_dict({k[len("features."):]: torch.from_numpy(v) for k, v in state[0].items()})
    lins.load_state_dict({f"{k[3]}.1.weight": torch.from_numpy(v) for k, v in state[1].items()})
    features.eval(), lins.eval()
    shift = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]
    norm = lambda f: f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + 1e-10)

    def taps(x):
        h, start, out = (x - shift) / scale, 0, []
        for end in ends:
            h = features[start:end](h)
            out.append(h)
            start = end
        return out

    @torch.no_grad()
    def forward(a, b):  # NHWC numpy in [0, 1] -> [N]
        ta, tb = (torch.from_numpy(np.ascontiguousarray(z.transpose(0, 3, 1, 2))) for z in (a, b))
        fa, fb = taps(2 * ta - 1), taps(2 * tb - 1)
        return sum(lin((norm(x) - norm(y)) ** 2).mean([2, 3], keepdim=True)
                   for lin, x, y in zip(lins, fa, fb)).flatten().numpy()

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend
    try:
        yield forward
    finally:
        torch.set_num_threads(n)


def _images(h, w, seed, b=4, noise=0.2):  # b = 4 everywhere: shares compilations with test_metrics
    g = np.random.default_rng(seed)
    x = g.random((b, h, w, 3)).astype(np.float32)
    return x, np.clip(x + noise * g.standard_normal(x.shape), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def alex(tmp_path_factory):
    """Random AlexNet LPIPS written as the two files one would use: trunk + heads (safetensors)."""
    state = _random_state("alex", 0)
    d = tmp_path_factory.mktemp("lpips")
    save_file(state[0], str(d / "alexnet_features.safetensors"))
    save_file(state[1], str(d / "alex_lin.safetensors"))
    params = load_lpips_params([d / "alexnet_features.safetensors", d / "alex_lin.safetensors"], net="alex")
    return state, params, d


@pytest.mark.parametrize("h,w,seed", [(64, 64, 0), (48, 64, 1)])
def test_alex_matches_torch_reference(alex, h, w, seed):
    state, params, _ = alex
    with _torch_lpips("alex", state) as ref:
        x, y = _images(h, w, seed)
        got = np.asarray(lpips(params, x, y))
        np.testing.assert_allclose(got, ref(x, y), rtol=1e-4, atol=0)
        assert got.shape == (4,) and np.all(got > 0)


def test_vgg_matches_torch_reference(tmp_path):
    state = _random_state("vgg", 1)
    path = tmp_path / "vgg.npz"  # the .npz route, one file
    np.savez(path, **state[0], **state[1])
    params = load_lpips_params(str(path), net="vgg")
    with _torch_lpips("vgg", state) as ref:
        x, y = _images(32, 32, 2)
        np.testing.assert_allclose(np.asarray(lpips(params, x, y, net="vgg")), ref(x, y), rtol=1e-4, atol=0)


def test_identical_images_give_zero_and_batch_is_per_image(alex):
    _, params, _ = alex
    x, y = _images(64, 64, 3)
    y[1] = x[1]
    d = np.asarray(lpips(params, x, y))
    assert d[1] == 0.0 and np.all(np.delete(d, 1) > 0)
    np.testing.assert_array_equal(np.asarray(lpips(params, x, x.copy())), 0.0)
    for i in range(4):
        np.testing.assert_allclose(np.asarray(lpips(params, x[i:i + 1], y[i:i + 1]))[0], d[i], rtol=1e-5, atol=0)


def test_lpips_grows_with_noise(alex):
    _, params, _ = alex
    g = np.random.default_rng(4)
    x = g.random((1, 64, 64, 3)).astype(np.float32)
    z = g.standard_normal(x.shape).astype(np.float32)
    a = np.concatenate([np.clip(x + s * z, 0, 1) for s in (0.02, 0.05, 0.1, 0.3)])
    d = np.asarray(lpips(params, a, np.repeat(x, 4, axis=0)))
    assert np.all(np.diff(d) > 0), d


def test_lpips_package_names_load_identically(alex):
    """lpips.LPIPS.state_dict() names: net.slice{k}.{idx}.*, lin{i}.model.1.*, lins.{i}.model.1.*, buffers."""
    (trunk, heads), params, _ = alex
    state = {}
    for k, v in trunk.items():
        _, idx, leaf = k.split(".")
        state[f"net.slice{sum(int(idx) >= e for e in NETS['alex'][1]) + 1}.{idx}.{leaf}"] = v
    for k, v in heads.items():
        state[k] = state["lins." + k[3:]] = v
    state["scaling_layer.shift"] = np.zeros((1, 3, 1, 1), np.float32)
    got = params_from_torch_state_dict(state, net="alex")
    for name in params:
        for leaf in params[name]:
            np.testing.assert_array_equal(got[name][leaf], params[name][leaf])


def test_flax_module_and_compute_all(alex):
    _, params, _ = alex
    x, y = _images(48, 64, 5)
    init = jax.eval_shape(LPIPS("alex").init, jax.random.key(0), x, y)["params"]  # loaded tree == module's
    assert jax.tree_util.tree_map(np.shape, init) == jax.tree_util.tree_map(np.shape, params)
    out = compute_all(x, y, lpips_fn=make_lpips_fn(params))
    assert set(out) == {"psnr", "ssim", "vifp", "fsim", "lpips"}
    np.testing.assert_allclose(np.asarray(out["lpips"]), np.asarray(lpips(params, x, y)), rtol=1e-6)


def test_loading_errors_name_file_and_tensor(alex, tmp_path):
    (_, heads), _, d = alex
    trunk_f, heads_f = str(d / "alexnet_features.safetensors"), str(d / "alex_lin.safetensors")
    with pytest.raises(KeyError, match=r"lin0\.model\.1\.weight.*alexnet_features\.safetensors"):
        load_lpips_params(trunk_f, net="alex")
    with pytest.raises(KeyError, match=r"features\.0\.weight.*alex_lin\.safetensors"):
        load_lpips_params(heads_f, net="alex")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_lpips_params([trunk_f, str(tmp_path / "nope.safetensors")])
    save_file({**heads, "lin2.model.1.weight": heads["lin2.model.1.weight"][:, :100].copy()},
              str(tmp_path / "bad_lin.safetensors"))
    with pytest.raises(ValueError, match=r"lin2\.model\.1\.weight.*bad_lin\.safetensors.*\(1, 100, 1, 1\)"):
        load_lpips_params([trunk_f, str(tmp_path / "bad_lin.safetensors")])
    with pytest.raises(ValueError, match="both"):
        load_lpips_params([trunk_f, trunk_f])
    pth = tmp_path / "alex.pth"
    pth.write_bytes(b"never read")
    with pytest.raises(ValueError, match="never unpickle"):
        load_lpips_params(str(pth))
    with pytest.raises(ValueError, match="unknown LPIPS trunk"):
        load_lpips_params([trunk_f, heads_f], net="squeeze")
