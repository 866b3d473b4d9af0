"""Purification: what an adversary does to a protected image before editing it (adaptive
attacks and purifiers; the worst-case protocol after BlurGuard, arXiv 2511.00143).

Purifiers, by name (the parameter is a suffix; a bare name takes the default in brackets):

- ``none``: the image as it is (the identity; keep it in the set so the worst case includes "no attack").
- ``jpeg<q>`` [75]: PIL JPEG encode/decode at quality q (libjpeg-turbo, 4:2:0), on the host
  (Sandoval-Segura et al., arXiv 2304.02234). Studies use q in {90, 75, 50}; the evaluation flagfiles 95/75/50.
- ``resize<f>`` [0.5]: PIL bicubic down to ``round(f*side)`` and back up.
- ``blur<sigma>`` [1]: Gaussian blur (``eot.gaussian_blur``: radius ``int(4 sigma + .5)``, symmetric padding).
- ``noise<s>`` [4]: additive Gaussian noise with std ``s/255``, seeded per image, clipped
  (robust-style-mimicry's ``noise.py`` uses sigma 0.05 = ``noise12.75``).
- ``diffpure<t>`` [0.1]: diffusion purification (Nie et al., ICML'22; GrIDPure's ``pure_steps=10`` of 100):
  noise to t* = t and denoise, as SD img2img at strength t with the empty prompt and no guidance, on a
  victim-family ``sd`` model (``model``), with the model's own scheduler and ``steps`` inference steps
  (diffusers default 50; img2img runs ``int(steps * t)`` of them).
- ``noisyup<t>`` [0.2]: Noisy Upscaling, simplified (Hönig et al., arXiv 2406.12027): Gaussian noise
  (``noisyup_sigma``, default 0.1 on [0, 1], their sigma) then the same img2img at strength t. The paper's
  x4 upscaler (noise_level 320) is replaced by same-resolution img2img, as no upscaler ships here.

Every purifier maps ``images: [B,H,W,3] float32 in [0,1]`` (the victim's working resolution) and
``keys: [B]`` (typed; only the random ones read them) to ``[B,H,W,3] float32`` **on the k/255 grid**: the
adversary saves an 8-bit file. ``none`` returns its input unchanged.

Worst case (:func:`worst_case`): per image and metric, the purifier under which edit(purified protected) is
**most similar** to edit(clean), i.e. best for the attacker: max PSNR, SSIM, VIFp, FSIM; min LPIPS
(``metrics.image.HIGHER_IS_MORE_SIMILAR``). Each metric picks its own purifier (the per-metric worst case,
as BlurGuard reports it); NaN scores are skipped.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from tdae_jax import eot
from tdae_jax.metrics.image import HIGHER_IS_MORE_SIMILAR

__all__ = ["KINDS", "DEFAULTS", "NEEDS_MODEL", "PurifierSpec", "Purifier", "parse", "worst_case", "quantize"]

KINDS = ("none", "jpeg", "resize", "blur", "noise", "diffpure", "noisyup")
DEFAULTS = {"jpeg": 75.0, "resize": 0.5, "blur": 1.0, "noise": 4.0, "diffpure": 0.1, "noisyup": 0.2}
NEEDS_MODEL = frozenset({"diffpure", "noisyup"})


@dataclasses.dataclass(frozen=True)
class PurifierSpec:
    kind: str
    param: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown purifier {self.kind!r}; known: {KINDS}")
        p = self.param
        if self.kind == "jpeg" and not 1 <= p <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {p:g}")
        if self.kind == "resize" and not 0 < p <= 1:
            raise ValueError(f"resize factor must be in (0, 1], got {p:g}")
        if self.kind in ("diffpure", "noisyup") and not 0 < p <= 1:
            raise ValueError(f"{self.kind} strength t* must be in (0, 1], got {p:g}")
        if self.kind in ("blur", "noise") and p < 0:
            raise ValueError(f"{self.kind} parameter must be >= 0, got {p:g}")

    @property
    def name(self) -> str:
        return self.kind if self.param is None else f"{self.kind}{self.param:g}"

    @property
    def needs_model(self) -> bool:
        return self.kind in NEEDS_MODEL


def parse(spec: str | Sequence[str]) -> tuple[PurifierSpec, ...]:
    """``"none,jpeg95,jpeg75,resize,blur,noise"`` -> specs (order kept; a repeated name is an error)."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    out, seen = [], set()
    for n in names:
        kind, param = eot.parse_name(n, KINDS, DEFAULTS)
        p = PurifierSpec(kind, param)
        if p.name in seen:
            raise ValueError(f"purifier {p.name!r} is listed twice")
        seen.add(p.name)
        out.append(p)
    return tuple(out)


def quantize(x) -> np.ndarray:
    """float32 on the k/255 grid (what an 8-bit file holds)."""
    return (np.round(np.clip(np.asarray(x, np.float64), 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def _to_u8(x) -> np.ndarray:
    return np.round(np.clip(np.asarray(x, np.float64), 0, 1) * 255).astype(np.uint8)


def _pil_jpeg(u8: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _pil_resize(u8: np.ndarray, factor: float) -> np.ndarray:
    h, w = u8.shape[:2]
    im = Image.fromarray(u8).resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.BICUBIC)
    return np.asarray(im.resize((w, h), Image.Resampling.BICUBIC))


_blur = jax.jit(eot.gaussian_blur, static_argnames=("sigma",))
_noise = jax.jit(eot.gaussian_noise, static_argnames=("sigma",))


class Purifier:
    """``purifier(images, keys) -> images`` (module docstring). ``model``: an ``sd``-family surrogate for
    ``diffpure`` / ``noisyup``; ``steps``: their inference steps (None = diffusers' 50)."""

    def __init__(self, spec: PurifierSpec | str, model=None, steps: int | None = None, noisyup_sigma: float = 0.1,
                 scheduler: str | None = None, compiler_options: Mapping | None = None):
        self.spec = parse(spec)[0] if isinstance(spec, str) else spec
        self.noisyup_sigma = float(noisyup_sigma)
        self._edit = None
        if self.spec.needs_model:
            if model is None:
                raise ValueError(f"purifier {self.spec.name} needs a diffusion model (an 'sd' family surrogate)")
            if model.family != "sd":
                raise ValueError(f"purifier {self.spec.name} runs SD img2img: it needs an 'sd' family model, "
                                 f"got {model.family!r}")
            from tdae_jax import editors

            self._edit = editors.make_editor("img2img", model, strength=float(self.spec.param),
                                             num_inference_steps=steps, guidance_scale=1.0, scheduler=scheduler,
                                             compiler_options=compiler_options)
            self._uncond = editors.embed_prompts(model, [""])[0]

    @property
    def name(self) -> str:
        return self.spec.name

    def __call__(self, images, keys) -> np.ndarray:
        x = np.asarray(images, np.float32)
        k, p = self.spec.kind, self.spec.param
        if k == "none":
            return x
        if k == "jpeg":
            return np.stack([_pil_jpeg(u, int(round(p))) for u in _to_u8(x)]).astype(np.float32) / 255.0
        if k == "resize":
            return np.stack([_pil_resize(u, p) for u in _to_u8(x)]).astype(np.float32) / 255.0
        if k == "blur":
            return quantize(_blur(jnp.asarray(x), sigma=float(p)))
        keys = _typed(keys)
        if k == "noise":
            return quantize(_noise(jnp.asarray(x), _fold(keys, 1), sigma=float(p) / 255.0))
        if k == "noisyup":
            x = np.asarray(_noise(jnp.asarray(x), _fold(keys, 2), sigma=self.noisyup_sigma))
        emb = jnp.broadcast_to(self._uncond, (x.shape[0],) + self._uncond.shape[1:])
        return quantize(self._edit(x, emb, emb, _fold(keys, 3)))


def _typed(keys) -> jax.Array:
    keys = keys if isinstance(keys, jax.Array) else jnp.asarray(keys)
    return keys if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(keys)


def _fold(keys, data: int) -> jax.Array:
    return jax.vmap(lambda kk: jax.random.fold_in(kk, data))(keys)


def worst_case(scores: Mapping[str, Mapping[str, float]],
               metrics: Sequence[str] | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """The attacker's best purifier per metric.

    Args:
      scores: purifier name -> {metric -> score of edit(purified protected) vs edit(clean)} for one image.
      metrics: which metrics (default: every metric present).
    Returns:
      ``(value, purifier)``: per metric the max (PSNR, SSIM, VIFp, FSIM) or min (LPIPS) over the purifiers,
      skipping NaN / missing scores (NaN and ``""`` when none is finite), and the purifier that attains it
      (the first listed on ties).
    """
    metrics = list(metrics) if metrics is not None else sorted({m for s in scores.values() for m in s})
    value, which = {}, {}
    for m in metrics:
        higher = HIGHER_IS_MORE_SIMILAR.get(m, True)
        best, arg = math.nan, ""
        for name, s in scores.items():
            v = s.get(m)
            if v is None or not math.isfinite(float(v)) and not (higher and v == math.inf):
                continue
            v = float(v)
            if arg == "" or (v > best if higher else v < best):
                best, arg = v, name
        value[m], which[m] = best, arg
    return value, which


@functools.lru_cache(maxsize=None)
def stream(name: str) -> int:
    """Stable 31-bit id of a purifier name (its key stream)."""
    from tdae_jax.prng import image_uid

    return image_uid("purify:" + name)
