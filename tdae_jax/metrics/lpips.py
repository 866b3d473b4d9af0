"""LPIPS, the learned perceptual image patch similarity (Zhang et al., "The Unreasonable Effectiveness
of Deep Features as a Perceptual Metric", CVPR 2018), version 0.1, as a Flax network (TDAE §IV-A).

``d(a, b) = sum_l mean_{h,w} w_l . (f_l(a) - f_l(b))^2`` where ``f_l`` are the trunk's ReLU feature maps
(AlexNet: relu1..relu5 of torchvision's ``features``; VGG16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3),
each unit-normalized along channels (``f / (||f||_2 + 1e-10)``), and ``w_l >= 0`` are the learned 1x1
linear heads. Inputs in [0, 1] are mapped to [-1, 1] and through the lpips ScalingLayer
(shift ``[-.030, -.088, -.188]``, scale ``[.458, .448, .450]``), exactly as ``lpips.LPIPS(...)(a, b,
normalize=True)`` does.

Weights load from local files only (nothing is downloaded): safetensors or ``.npz`` holding torch
tensor names, typically two files, the torchvision trunk (``features.{idx}.weight|bias``; lpips' own
``net.slice{k}.{idx}.*`` names work too) and the lpips heads (``lin{i}.model.1.weight``, ``[1, C, 1, 1]``).
Pickled checkpoints (``.pth``) are refused; convert them once with torch::

    import torch, safetensors.torch as st
    st.save_file(torch.load("alex.pth", weights_only=True), "alex_lin.safetensors")

Usage::

    params = load_lpips_params(["alexnet_features.safetensors", "alex_lin.safetensors"], net="alex")
    d = lpips(params, a, b)                    # a, b: [B, H, W, 3] float32 in [0, 1] -> [B]
    metrics = compute_all(a, b, lpips_fn=make_lpips_fn(params))
"""
from __future__ import annotations

import functools
import os
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["LPIPS", "TRUNKS", "load_lpips_params", "params_from_torch_state_dict", "lpips", "make_lpips_fn"]

_HI = lax.Precision.HIGHEST

# Trunk layouts by torchvision ``features`` index: ("conv", idx, in, out, kernel, stride, pad) /
# ("pool", kernel, stride) / ("tap",) (a ReLU output LPIPS compares). Every conv is followed by a ReLU.
TRUNKS: dict[str, tuple] = {
    "alex": (
        ("conv", 0, 3, 64, 11, 4, 2), ("tap",), ("pool", 3, 2),
        ("conv", 3, 64, 192, 5, 1, 2), ("tap",), ("pool", 3, 2),
        ("conv", 6, 192, 384, 3, 1, 1), ("tap",),
        ("conv", 8, 384, 256, 3, 1, 1), ("tap",),
        ("conv", 10, 256, 256, 3, 1, 1), ("tap",),
    ),
    "vgg": (
        ("conv", 0, 3, 64, 3, 1, 1), ("conv", 2, 64, 64, 3, 1, 1), ("tap",), ("pool", 2, 2),
        ("conv", 5, 64, 128, 3, 1, 1), ("conv", 7, 128, 128, 3, 1, 1), ("tap",), ("pool", 2, 2),
        ("conv", 10, 128, 256, 3, 1, 1), ("conv", 12, 256, 256, 3, 1, 1), ("conv", 14, 256, 256, 3, 1, 1),
        ("tap",), ("pool", 2, 2),
        ("conv", 17, 256, 512, 3, 1, 1), ("conv", 19, 512, 512, 3, 1, 1), ("conv", 21, 512, 512, 3, 1, 1),
        ("tap",), ("pool", 2, 2),
        ("conv", 24, 512, 512, 3, 1, 1), ("conv", 26, 512, 512, 3, 1, 1), ("conv", 28, 512, 512, 3, 1, 1),
        ("tap",),
    ),
}
TRUNKS["vgg16"] = TRUNKS["vgg"]
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def _channels(net: str) -> list[int]:
    layers, out = TRUNKS[net], []
    for i, layer in enumerate(layers):
        if layer[0] == "tap":
            out.append(next(l[3] for l in reversed(layers[:i]) if l[0] == "conv"))
    return out


class LPIPS(nn.Module):
    """LPIPS v0.1 distance. Params: ``features_{idx}`` (Conv: kernel ``[k, k, in, out]``, bias) and
    ``lin{l}`` (Dense without bias: kernel ``[C_l, 1]``).

    ``__call__(a, b)``: ``a, b: [B, H, W, 3] float32 in [0, 1]`` (H, W >= 32 for AlexNet, 16 for VGG)
    -> ``[B]`` float32, >= 0 for non-negative heads, exactly 0 for identical images.
    """

    net: str = "alex"

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        if self.net not in TRUNKS:
            raise ValueError(f"unknown LPIPS trunk {self.net!r}; choose one of {sorted(TRUNKS)}")
        convs = {l[1]: nn.Conv(l[3], (l[4], l[4]), strides=(l[5], l[5]), padding=[(l[6], l[6])] * 2,
                               precision=_HI, name=f"features_{l[1]}") for l in TRUNKS[self.net] if l[0] == "conv"}
        lins = [nn.Dense(1, use_bias=False, precision=_HI, name=f"lin{i}") for i in range(len(_channels(self.net)))]

        def features(x):  # unit-normalized tapped ReLU features of x in [0, 1]
            h = ((2.0 * x.astype(jnp.float32) - 1.0) - _SHIFT) / _SCALE
            taps = []
            for layer in TRUNKS[self.net]:
                if layer[0] == "conv":
                    h = jax.nn.relu(convs[layer[1]](h))
                elif layer[0] == "pool":
                    h = nn.max_pool(h, (layer[1], layer[1]), strides=(layer[2], layer[2]), padding="VALID")
                else:
                    taps.append(h / (jnp.sqrt(jnp.sum(h * h, axis=-1, keepdims=True)) + 1e-10))
            return taps

        n = a.shape[0]
        feats = features(jnp.concatenate([a, b], axis=0))  # one trunk pass over [a; b]
        d = sum(jnp.mean(lin(jnp.square(f[:n] - f[n:]))[..., 0], axis=(1, 2)) for lin, f in zip(lins, feats))
        # d(x, x) = 0 exactly: XLA CPU's channel reductions can differ in the last bit between batch rows,
        # which would leave ~1e-16 for bit-identical pairs. (The gradient there is 0 either way.)
        return jnp.where(jnp.all(a == b, axis=(1, 2, 3)), 0.0, d)


# ------------------------------------------------------------------------------------------ weights
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
_CONV_RE = re.compile(r"(?:^|\.)(?:features|slice\d+)\.(\d+)\.(weight|bias)$")
_LIN_RE = re.compile(r"(?:^|\.)lins?\.?(\d+)\.model\.\d+\.weight$")


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LPIPS weights file not found: {path}")
    low = path.lower()
    if low.endswith(_PICKLE_SUFFIXES):
        raise ValueError(
            f"{path}: pickled torch checkpoints are not loaded (never unpickle). Convert it once: python -c "
            f"\"import torch, safetensors.torch as st; st.save_file(torch.load('{path}', weights_only=True), "
            f"'{os.path.splitext(path)[0]}.safetensors')\"")
    if low.endswith(".safetensors"):
        from safetensors.flax import load_file  # handles bf16/fp16 too
        return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
    if low.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k], np.float32) for k in z.files}
    raise ValueError(f"{path}: unsupported LPIPS weights format (expected .safetensors or .npz)")


def params_from_torch_state_dict(state: Mapping[str, Any], net: str = "alex",
                                 source: str = "<state dict>") -> dict[str, Any]:
    """Converts torch tensor names/layouts to the :class:`LPIPS` params tree.

    Args:
      state: name -> array (``[out, in, k, k]`` conv weights, ``[out]`` biases, ``[1, C, 1, 1]`` heads).
        Recognized names: ``[prefix.]features.{idx}.weight|bias`` (torchvision), ``[prefix.]slice{k}.{idx}.*``
        (lpips' trunk), ``[prefix.]lin{l}.model.{j}.weight`` / ``lins.{l}.model.{j}.weight`` (lpips heads).
        Other names (classifier, scaling-layer buffers) are ignored.
      net: ``"alex"`` or ``"vgg"``.
      source: file name(s), for error messages.
    Returns:
      ``{"features_{idx}": {"kernel", "bias"}, "lin{l}": {"kernel"}}`` float32 numpy arrays.
    Raises:
      KeyError naming the missing tensor and the source; ValueError on a shape mismatch.
    """
    if net not in TRUNKS:
        raise ValueError(f"unknown LPIPS trunk {net!r}; choose one of {sorted(TRUNKS)}")
    convs: dict[tuple[int, str], tuple[str, np.ndarray]] = {}
    lins: dict[int, tuple[str, np.ndarray]] = {}
    for name, value in state.items():
        if m := _CONV_RE.search(name):
            convs.setdefault((int(m.group(1)), m.group(2)), (name, np.asarray(value, np.float32)))
        elif m := _LIN_RE.search(name):
            lins.setdefault(int(m.group(1)), (name, np.asarray(value, np.float32)))

    def take(table, key, want, shape):
        if key not in table:
            raise KeyError(f"LPIPS-{net}: tensor {want!r} not found in {source}")
        name, value = table[key]
        if value.shape != shape:
            raise ValueError(f"LPIPS-{net}: tensor {name!r} in {source} has shape {value.shape}, expected {shape}")
        return value

    params: dict[str, Any] = {}
    for layer in TRUNKS[net]:
        if layer[0] == "conv":
            _, idx, cin, cout, k, _, _ = layer
            w = take(convs, (idx, "weight"), f"features.{idx}.weight", (cout, cin, k, k))
            bias = take(convs, (idx, "bias"), f"features.{idx}.bias", (cout,))
            params[f"features_{idx}"] = {"kernel": w.transpose(2, 3, 1, 0), "bias": bias}
    for i, c in enumerate(_channels(net)):
        w = take(lins, i, f"lin{i}.model.1.weight", (1, c, 1, 1))
        params[f"lin{i}"] = {"kernel": w[0, :, 0, 0][:, None]}
    return params


def load_lpips_params(paths: str | Sequence[str], net: str = "alex") -> dict[str, Any]:
    """Reads LPIPS weights from local ``.safetensors`` / ``.npz`` files (e.g. trunk + heads) and converts
    them with :func:`params_from_torch_state_dict` to a params tree of float32 ``jax.Array``s (on the
    default device). A name present in two files is an error."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    merged: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for p in map(str, paths):
        for k, v in _read_tensors(p).items():
            if k in merged:
                raise ValueError(f"tensor {k!r} appears in both {origin[k]} and {p}")
            merged[k], origin[k] = v, p
    params = params_from_torch_state_dict(merged, net, source=", ".join(map(str, paths)))
    return jax.tree_util.tree_map(jnp.asarray, params)


def lpips(params: Mapping[str, Any], a: jax.Array, b: jax.Array, net: str = "alex") -> jax.Array:
    """LPIPS distance per image: ``a, b: [B, H, W, 3] float32 in [0, 1]`` -> ``[B]`` (lower = more similar).
    Jit-compiled once per shape and trunk (also callable inside a jit)."""
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected two [B, H, W, 3] image batches of equal shape, got {a.shape} and {b.shape}")
    return _lpips(params, a, b, net=net)


@functools.partial(jax.jit, static_argnames=("net",))
def _lpips(params, a, b, net):
    return LPIPS(net).apply({"params": params}, a, b)


def make_lpips_fn(params: Mapping[str, Any], net: str = "alex") -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``(a, b) -> [B]`` closure over loaded params, for :func:`tdae_jax.metrics.image.compute_all`."""
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return lambda a, b: lpips(params, a, b, net=net)
