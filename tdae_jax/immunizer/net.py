"""The immunizer network g(x) -> delta: a small, fully convolutional U-Net whose output is inside the budget
by construction (amortized protection; DiffVax, Ozden et al., arXiv:2411.17957, §3: a feed-forward
"immunizer" trained once, then one forward pass per image).

Reference: ozdentarikcan/DiffVax ``src/diffvax/model.py`` (``NestedUNet``, a UNet++ with VGG blocks of 32-512
channels and BatchNorm) and ``src/diffvax/immunization/diffvax_immunization.py``
(``DiffVaxImmunization.immunize_img``: ``clamp(img + unet(img) * (1 - mask), -1, 1)``, with the budget only
encouraged by an L1 term, not enforced). Here, restated for a CPU-sized miniature world:

- 3 levels by default (16, 32, 64 channels; ~0.12 M parameters), two 3x3 conv + GroupNorm + SiLU per block,
  2x2 average pooling down, nearest-neighbour upsampling and skip concatenation up, a 1x1 conv to 3 channels.
  GroupNorm normalizes each image on its own (no batch statistics, unlike DiffVax's BatchNorm), so an image's
  delta never depends on the other images of its batch, and the network has no mutable state.
- Resolution-agnostic: only convolutions, pooling and upsampling; an input whose sides are not multiples of
  ``2 ** (levels - 1)`` is edge-padded to the next multiple and the output cropped back.
- The budget holds by construction, for any parameters: with ``u`` the network's output and ``x`` clipped to
  [0, 1], ``delta = clip(x + eps * tanh(u), 0, 1) - x``. Since ``|eps * tanh(u)| <= eps`` and clipping
  ``x + r`` into [0, 1] (where x already lies) only moves it towards x, ``|delta| <= eps`` and
  ``x + delta`` is in [0, 1]; a last ``clip(delta, -eps, eps)`` removes the float rounding of ``x + r - x``.

Images: ``[B, H, W, 3] float32 in [0, 1]`` (NHWC, as the data layer produces them).
"""
from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import serialization


@dataclasses.dataclass(frozen=True)
class NetConfig:
    """Architecture and budget of the immunizer. ``eps``: L_inf budget in [0, 1] units (part of the network:
    the output is bounded by it); ``features``: channels per level (levels = len(features)); ``groups``:
    GroupNorm groups (capped at the channel count)."""

    eps: float = 16.0 / 255.0
    features: tuple[int, ...] = (16, 32, 64)
    groups: int = 8

    def __post_init__(self):
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps must be in (0, 1) (a fraction of the [0,1] range), got {self.eps}")
        if not self.features or min(self.features) < 1:
            raise ValueError(f"features must be a non-empty list of positive channel counts, got {self.features}")
        if self.groups < 1 or any(f % min(self.groups, f) for f in self.features):
            raise ValueError(f"groups={self.groups} must divide every channel count of {self.features}")


class ConvBlock(nn.Module):
    """Two (3x3 conv, GroupNorm, SiLU) layers."""

    features: int
    groups: int

    @nn.compact
    def __call__(self, h):
        for _ in range(2):
            h = nn.Conv(self.features, (3, 3), padding="SAME")(h)
            h = nn.GroupNorm(num_groups=min(self.groups, self.features))(h)
            h = nn.silu(h)
        return h


class UNet(nn.Module):
    """``[B, H, W, 3]`` in [0, 1] -> ``[B, H, W, 3]`` unbounded logits ``u`` (H, W multiples of 2**(levels-1))."""

    features: tuple[int, ...]
    groups: int

    @nn.compact
    def __call__(self, x):
        h = 2.0 * x - 1.0
        skips = []
        for i, f in enumerate(self.features):
            if i:
                h = nn.avg_pool(h, (2, 2), strides=(2, 2))
            h = ConvBlock(f, self.groups)(h)
            skips.append(h)
        for f, skip in zip(reversed(self.features[:-1]), reversed(skips[:-1])):
            h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
            h = ConvBlock(f, self.groups)(jnp.concatenate([h, skip], axis=-1))
        return nn.Conv(3, (1, 1))(h)


def bounded_delta(u: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """``clip(clip(x + eps*tanh(u), 0, 1) - x, -eps, eps)`` with x clipped to [0, 1] (module docstring)."""
    x = jnp.clip(x, 0.0, 1.0)
    d = jnp.clip(x + eps * jnp.tanh(u), 0.0, 1.0) - x
    return jnp.clip(d, -eps, eps)


class Immunizer(nn.Module):
    """g(x) -> delta, ``|delta| <= eps`` and ``x + delta`` in [0, 1] for any parameters and any input size."""

    cfg: NetConfig

    @nn.compact
    def __call__(self, x):
        x = jnp.asarray(x, jnp.float32)
        m = 2 ** (len(self.cfg.features) - 1)
        h, w = x.shape[1:3]
        ph, pw = -h % m, -w % m
        xp = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else x
        u = UNet(tuple(self.cfg.features), self.cfg.groups)(xp)[:, :h, :w]
        return bounded_delta(u, x, self.cfg.eps)


def init_params(cfg: NetConfig, key: jax.Array):
    """Parameters of :class:`Immunizer` (they do not depend on the image size; initialized on 8x8)."""
    return Immunizer(cfg).init(key, jnp.zeros((1, 8, 8, 3), jnp.float32))


def count_params(params) -> int:
    return int(sum(a.size for a in jax.tree.leaves(params)))


def to_bytes(cfg: NetConfig, params) -> tuple[bytes, bytes]:
    """``(params as Flax msgpack, config as JSON)``: the trained immunizer's two files (never pickled)."""
    meta = {"eps": cfg.eps, "features": list(cfg.features), "groups": cfg.groups}
    return serialization.to_bytes(jax.device_get(params)), json.dumps(meta, indent=1).encode()


def from_bytes(params_bytes: bytes, config_bytes: bytes):
    """Inverse of :func:`to_bytes`: ``(NetConfig, params)``."""
    meta = json.loads(config_bytes)
    cfg = NetConfig(eps=float(meta["eps"]), features=tuple(meta["features"]), groups=int(meta["groups"]))
    template = init_params(cfg, jax.random.key(0))
    return cfg, serialization.from_bytes(template, params_bytes)
