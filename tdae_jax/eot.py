"""Expectation over Transformation (Athalye, Engstrom, Ilyas & Kwok, ICML 2018, "Synthesizing Robust
Adversarial Examples", §2, Eq. 1): optimize the protection against the *transformed* image, averaged
over a set of transforms, so it survives purification (``tdae_jax.purify``; MetaCloak and EditShield do
the same with blur / flip / resize).

Differentiable transforms (all ``x: [B,H,W,3] float32 in [0,1] -> [B,H,W,3] in [0,1]``, ``keys: [B]``):

- ``jpeg<q>`` (default q = 75): a JPEG round trip as libjpeg/PIL does it at quality q (baseline, 4:2:0):
  RGB -> YCbCr (JFIF full range, rounded to 8 bit), 2x2 chroma averaging (libjpeg's biased integer mean),
  level shift, 8x8 DCT-II, quantization with the IJG tables scaled by q (``jpeg_quality_scaling``, clamped to
  [1, 255]), dequantization, IDCT, chroma "fancy" (triangle) upsampling to 8 bit, YCbCr -> RGB, 8 bit.
  Every rounding is ``round_ste`` (forward: exact rounding; backward: identity, Bengio et al. 2013) or,
  with ``rounding="cubic"``, ``round(x) + (x - round(x))^3`` (Shin & Song 2017, "JPEG-resistant
  adversarial images"). Edges are replicated to whole 16x16 MCUs, as libjpeg does.
- ``resize<f>`` (default f = 0.5): down to ``round(f*H) x round(f*W)`` and back up, bicubic
  (Keys a = -0.5, antialiased on the way down: ``jax.image.resize``, as PIL's BICUBIC).
- ``blur<sigma>`` (default 1): Gaussian, separable, radius ``int(4 sigma + 0.5)``, symmetric padding
  (scipy.ndimage's defaults).
- ``noise<s>`` (default 4): additive Gaussian noise with std ``s/255``, per image from its key, clipped.
- ``identity``: the image itself (include it to keep the plain objective in the average).

Names take their parameter as a suffix (``jpeg50``, ``resize0.25``, ``blur1.5``, ``noise8``); a bare
name uses the default. ``wrap_objective(loss_fn, transforms, n_samples)`` returns
``loss_fn'(delta, batch, emb, keys) = mean_{T, s} loss_fn(T(x0 + delta; k_{T,s}) - x0, batch, emb, k'_s)``:
the reference image ``batch["x0"]`` stays clean (the victim edits the transformed protected image and is
compared with the edit of the clean one, TDAE §IV-A); ``k_{T,s} = fold_in(fold_in(keys, 0xE07),
T*1000 + s)`` drives the transform's randomness, and the objective's own keys are ``keys`` for the first
sample and ``fold_in(keys, 0xE08 + s)`` for the others, so two calls with the same keys (FDM's g1 and g2)
see the same transforms. Cost: ``len(transforms) * n_samples`` objective evaluations per call.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["KINDS", "DEFAULTS", "Transform", "parse_name", "parse_transforms", "wrap_objective",
           "jpeg", "resize_down_up", "gaussian_blur", "gaussian_noise", "quant_tables", "round_ste"]

KINDS = ("identity", "jpeg", "resize", "blur", "noise")
DEFAULTS = {"jpeg": 75.0, "resize": 0.5, "blur": 1.0, "noise": 4.0}
_HI = lax.Precision.HIGHEST
_NAME = re.compile(r"^([a-z_]+?)(\d+(?:\.\d*)?|\.\d+)?$")
EOT_STREAM, OBJ_STREAM = 0xE07, 0xE08


def parse_name(name: str, kinds: Sequence[str], defaults: dict) -> tuple[str, float | None]:
    """``"jpeg75" -> ("jpeg", 75.0)``, ``"blur" -> ("blur", defaults["blur"])``; ValueError naming the
    known kinds otherwise. Shared by :mod:`tdae_jax.purify`."""
    m = _NAME.match(name.strip().lower())
    if not m or m.group(1) not in kinds:
        raise ValueError(f"unknown transform {name!r}; known: {', '.join(kinds)} (parameter as a suffix, "
                         f"e.g. jpeg75, resize0.5, blur1, noise4)")
    kind, param = m.group(1), m.group(2)
    if param is None:
        return kind, defaults.get(kind)
    if kind not in defaults:
        raise ValueError(f"transform {kind!r} takes no parameter, got {name!r}")
    return kind, float(param)


# ----------------------------------------------------------------------------------------------- rounding
def round_ste(x: jax.Array) -> jax.Array:
    """Exact rounding forward, identity gradient (straight-through estimator)."""
    return x + lax.stop_gradient(jnp.round(x) - x)


def round_cubic(x: jax.Array) -> jax.Array:
    """Shin & Song (2017): ``round(x) + (x - round(x))^3``, gradient ``3 (x - round(x))^2``."""
    r = lax.stop_gradient(jnp.round(x))
    return r + (x - r) ** 3


_ROUNDERS = {"ste": round_ste, "cubic": round_cubic}


# ----------------------------------------------------------------------------------------------- JPEG
# ITU-T T.81 Annex K tables (natural order), as libjpeg's jcparam.c.
_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.float64).reshape(8, 8)
_CHROMA = np.array([
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32, np.float64).reshape(8, 8)


def quant_tables(quality: float) -> tuple[np.ndarray, np.ndarray]:
    """IJG ``jpeg_set_quality(q, force_baseline=TRUE)``: luma and chroma tables ``[8, 8]`` float32."""
    q = int(round(quality))
    q = min(max(q, 1), 100)
    scale = 5000 // q if q < 50 else 200 - 2 * q
    tab = lambda base: np.clip(np.floor((base * scale + 50) / 100), 1, 255).astype(np.float32)  # noqa: E731
    return tab(_LUMA), tab(_CHROMA)


def _dct_matrix() -> np.ndarray:
    """Orthonormal 8-point DCT-II ``D`` (``D @ D.T = I``): JPEG's F = D f D^T."""
    k, n = np.arange(8)[:, None], np.arange(8)[None, :]
    d = np.cos((2 * n + 1) * k * np.pi / 16) * np.sqrt(2 / 8)
    d[0] /= np.sqrt(2)
    return d.astype(np.float32)


_D = _dct_matrix()


def _blocks(p: jax.Array) -> jax.Array:
    """``[B, H, W] -> [B, H/8, W/8, 8, 8]``."""
    b, h, w = p.shape
    return p.reshape(b, h // 8, 8, w // 8, 8).transpose(0, 1, 3, 2, 4)


def _unblocks(c: jax.Array) -> jax.Array:
    b, nh, nw, _, _ = c.shape
    return c.transpose(0, 1, 3, 2, 4).reshape(b, nh * 8, nw * 8)


def _code_plane(p: jax.Array, table: np.ndarray, rnd) -> jax.Array:
    """Level shift, DCT, quantize, dequantize, IDCT, +128, round, clip: one 8-bit plane ``[B, H, W]``."""
    d = jnp.asarray(_D)
    c = jnp.einsum("ij,bxyjk,lk->bxyil", d, _blocks(p - 128.0), d, precision=_HI)
    q = jnp.asarray(table)
    c = rnd(c / q) * q
    r = jnp.einsum("ji,bxyjk,kl->bxyil", d, c, d, precision=_HI)
    return jnp.clip(rnd(_unblocks(r) + 128.0), 0.0, 255.0)


def _downsample2(c: jax.Array) -> jax.Array:
    """libjpeg's h2v2_downsample: ``(sum of the 2x2 block + bias) >> 2`` with bias 1, 2, 1, 2, ... along the
    row (floor with a straight-through gradient)."""
    b, h, w = c.shape
    s = c.reshape(b, h // 2, 2, w // 2, 2).sum(axis=(2, 4))
    v = (s + jnp.asarray(1.0 + (np.arange(w // 2) % 2), jnp.float32)) / 4.0
    return v + lax.stop_gradient(jnp.floor(v) - v)


def _upsample2(p: jax.Array) -> jax.Array:
    """libjpeg's h2v2 "fancy" upsampling: separable 3/4-1/4 triangle filter, edges replicated."""
    def up(a, axis):
        n = a.shape[axis]
        prev = jnp.concatenate([lax.slice_in_dim(a, 0, 1, axis=axis), lax.slice_in_dim(a, 0, n - 1, axis=axis)], axis)
        nxt = jnp.concatenate([lax.slice_in_dim(a, 1, n, axis=axis), lax.slice_in_dim(a, n - 1, n, axis=axis)], axis)
        even, odd = 0.75 * a + 0.25 * prev, 0.75 * a + 0.25 * nxt
        out = jnp.stack([even, odd], axis=axis + 1)
        shape = list(a.shape)
        shape[axis] = 2 * n
        return out.reshape(shape)

    return up(up(p, 1), 2)


def jpeg(x: jax.Array, quality: float = 75.0, rounding: str = "ste") -> jax.Array:
    """Differentiable JPEG round trip (module docstring). ``x: [B,H,W,3]`` in [0,1] -> same shape, on the
    k/255 grid in the forward pass."""
    rnd = _ROUNDERS[rounding]
    lt, ct = quant_tables(quality)
    b, h, w, _ = x.shape
    ph, pw = -h % 16, -w % 16
    v = jnp.pad(x.astype(jnp.float32) * 255.0, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    r, g, bl = v[..., 0], v[..., 1], v[..., 2]
    y = rnd(0.299 * r + 0.587 * g + 0.114 * bl)
    cb = rnd(-0.168735892 * r - 0.331264108 * g + 0.5 * bl + 128.0)
    cr = rnd(0.5 * r - 0.418687589 * g - 0.081312411 * bl + 128.0)
    y = _code_plane(y, lt, rnd)
    cb = rnd(_upsample2(_code_plane(_downsample2(cb), ct, rnd))) - 128.0
    cr = rnd(_upsample2(_code_plane(_downsample2(cr), ct, rnd))) - 128.0
    rgb = jnp.stack([y + 1.402 * cr, y - 0.344136286 * cb - 0.714136286 * cr, y + 1.772 * cb], axis=-1)
    return (jnp.clip(rnd(rgb), 0.0, 255.0) / 255.0)[:, :h, :w, :]


# ----------------------------------------------------------------------------------------------- the others
def resize_down_up(x: jax.Array, factor: float = 0.5, method: str = "cubic") -> jax.Array:
    """Down to ``round(factor * side)`` and back, ``jax.image.resize`` (antialiased downscale), clipped."""
    b, h, w, c = x.shape
    small = (b, max(1, round(h * factor)), max(1, round(w * factor)), c)
    y = jax.image.resize(x.astype(jnp.float32), small, method, antialias=True)
    return jnp.clip(jax.image.resize(y, x.shape, method, antialias=True), 0.0, 1.0)


def gaussian_blur(x: jax.Array, sigma: float = 1.0) -> jax.Array:
    """Separable Gaussian blur, radius ``int(4 sigma + 0.5)``, symmetric ('reflect' in scipy) padding."""
    if sigma <= 0:
        return x
    rad = int(4.0 * sigma + 0.5)
    t = np.arange(-rad, rad + 1, dtype=np.float64)
    k = np.exp(-0.5 * t ** 2 / sigma ** 2)
    k = (k / k.sum()).astype(np.float32)
    c = x.shape[-1]
    y = jnp.pad(x.astype(jnp.float32), ((0, 0), (rad, rad), (rad, rad), (0, 0)), mode="symmetric")
    for kern in (k[:, None], k[None, :]):
        rhs = jnp.broadcast_to(jnp.asarray(kern)[:, :, None, None], kern.shape + (1, c))
        y = lax.conv_general_dilated(y, rhs, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=c, precision=_HI)
    return y


def gaussian_noise(x: jax.Array, keys: jax.Array, sigma: float = 4.0 / 255.0) -> jax.Array:
    """``clip(x + sigma * N(0, I))``, one draw per image from ``keys: [B]`` (typed)."""
    n = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(keys)
    return jnp.clip(x + sigma * n, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Transform:
    """One EOT transform: ``T(x, keys) -> x'`` (``x: [B,H,W,3]`` in [0,1], ``keys: [B]`` typed keys)."""

    kind: str
    param: float | None = None
    rounding: str = "ste"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown EOT transform {self.kind!r}; known: {KINDS}")
        if self.rounding not in _ROUNDERS:
            raise ValueError(f"rounding must be one of {sorted(_ROUNDERS)}, got {self.rounding!r}")
        p = self.param
        if self.kind == "jpeg" and not 1 <= p <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {p}")
        if self.kind == "resize" and not 0 < p <= 1:
            raise ValueError(f"resize factor must be in (0, 1], got {p}")
        if self.kind in ("blur", "noise") and p < 0:
            raise ValueError(f"{self.kind} parameter must be >= 0, got {p}")

    @property
    def name(self) -> str:
        return self.kind if self.param is None else f"{self.kind}{self.param:g}"

    @property
    def random(self) -> bool:
        return self.kind == "noise"

    def __call__(self, x: jax.Array, keys: jax.Array | None = None) -> jax.Array:
        if self.kind == "identity":
            return x
        if self.kind == "jpeg":
            return jpeg(x, self.param, self.rounding)
        if self.kind == "resize":
            return resize_down_up(x, self.param)
        if self.kind == "blur":
            return gaussian_blur(x, self.param)
        if keys is None:
            raise ValueError("the noise transform needs per-image keys")
        return gaussian_noise(x, keys, self.param / 255.0)


def parse_transforms(spec: str | Sequence[str], rounding: str = "ste") -> tuple[Transform, ...]:
    """``"jpeg,resize,blur,noise"`` (or a list of names) -> transforms; ``""`` -> ``()``."""
    names = [s for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    out = []
    for n in names:
        kind, param = parse_name(n, KINDS, DEFAULTS)
        out.append(Transform(kind, param, rounding))
    return tuple(out)


def _fold(keys: jax.Array, data) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


def wrap_objective(loss_fn: Callable, transforms: Sequence[Transform], n_samples: int = 1) -> Callable:
    """EOT objective: ``(delta, batch, emb, keys) -> [B]``, the mean of ``loss_fn`` over ``transforms`` x
    ``n_samples`` (module docstring). An empty ``transforms`` returns ``loss_fn`` itself.

    Args:
      loss_fn: per-image objective ``(delta [B,H,W,3], batch, emb, keys [B]) -> [B]``, minimized.
      transforms: :class:`Transform` s (see :func:`parse_transforms`).
      n_samples: draws per transform (>= 1); samples after the first run in a ``lax.scan`` (one traced
        copy of the objective per transform, whatever ``n_samples``).
    """
    transforms = tuple(transforms)
    if not transforms:
        return loss_fn
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    total = len(transforms) * n_samples

    def one(t: Transform, ti: int, delta, batch, emb, keys, s):
        tkeys = _fold(_fold(keys, EOT_STREAM), ti * 1000 + s)
        if t.kind == "identity":
            d = delta
        else:
            x0 = batch["x0"]
            d = t(x0 + delta, tkeys) - x0
        return loss_fn(d, batch, emb, keys if isinstance(s, int) and s == 0 else _fold(keys, OBJ_STREAM + s))

    def wrapped(delta, batch, emb, keys):
        acc = 0.0
        for ti, t in enumerate(transforms):
            acc = acc + one(t, ti, delta, batch, emb, keys, 0)
            if n_samples > 1:
                def body(carry, s, t=t, ti=ti):
                    return carry + one(t, ti, delta, batch, emb, keys, s), None

                acc, _ = lax.scan(body, acc, jnp.arange(1, n_samples, dtype=jnp.uint32))
        return acc / total

    wrapped.eot_transforms = transforms  # for reports
    wrapped.eot_samples = n_samples
    return wrapped


def describe(transforms: Sequence[Transform], n_samples: int = 1) -> str:
    """``"jpeg75+resize0.5 x2"`` (``"none"`` for no transforms)."""
    if not transforms:
        return "none"
    return "+".join(t.name for t in transforms) + (f" x{n_samples}" if n_samples > 1 else "")

