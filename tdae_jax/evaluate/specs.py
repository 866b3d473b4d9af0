"""Evaluation settings: victim specs (``NAME:FAMILY:SOURCE[|key=value...]``), their model loaders, the CLIP
scorer loader and :class:`EvalConfig` (the ``experiments.evaluate`` flags), plus the row columns."""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

from tdae_jax import prng
from tdae_jax.runs.errors import UsageError  # noqa: F401 - the evaluation's usage errors are the runs' (exit 2)

METRICS = ("psnr", "ssim", "lpips", "vifp", "fsim")
IMP_METRICS = ("psnr", "ssim", "lpips")
MIN_SIDE = {"psnr": 1, "ssim": 11, "vifp": 41, "fsim": 1, "lpips": 32}
EDIT_KIND = {"sd": "img2img", "ip2p": "ip2p", "inpaint": "inpaint", "sd3": "sd3_img2img"}
EDIT_STEP = prng.image_uid("tdae_jax.evaluate/edit")
OPTION_KEYS = {"kind": str, "steps": int, "strength": float, "guidance": float, "image_guidance": float,
               "scheduler": str, "eta": float}
COLUMNS = ("run", "surrogate", "objective", "defense", "eps", "eot", "id", "source", "victim", "victim_family",
           "editor", "kind", "purify", "seed", "seed_b", *METRICS, "imp_psnr", "imp_ssim", "imp_lpips", "imp_linf_255",
           "worst_by")
CLIP_METRICS = ("clip_img", "clip_dir")  # with EvalConfig.clip_dir: extra columns after COLUMNS


@dataclasses.dataclass(frozen=True)
class EditSettings:
    """Victim editor settings; ``None`` = the diffusers pipeline default (editors.PIPELINE_DEFAULTS)."""

    steps: int | None = None
    strength: float | None = None
    guidance: float | None = None  # None: the pipeline's (7.5; SD3 7.0)
    image_guidance: float = 1.5
    scheduler: str | None = None
    eta: float = 0.0


@dataclasses.dataclass(frozen=True)
class VictimSpec:
    """``NAME:FAMILY:SOURCE[|key=value...]``; SOURCE = ``tiny`` | ``tiny@SEED`` | ``miniature:NAME`` (a shipped
    miniature model, alias ``mini:NAME``; FAMILY may be empty) | a local diffusers-format directory. Keys
    override the global edit settings for this victim: kind, steps, strength, guidance, image_guidance,
    scheduler, eta."""

    name: str
    family: str
    source: str
    options: tuple = ()

    def editor_kwargs(self, edit: EditSettings) -> dict:
        o = dict(self.options)
        kind = o.get("kind", EDIT_KIND[self.family])
        kw = dict(kind=kind, num_inference_steps=o.get("steps", edit.steps),
                  image_guidance_scale=o.get("image_guidance", edit.image_guidance),
                  scheduler=o.get("scheduler", edit.scheduler) or None, eta=o.get("eta", edit.eta))
        guidance = o.get("guidance", edit.guidance)
        if guidance is not None:  # else the editor's own default (SD3's differs from SD's)
            kw["guidance_scale"] = guidance
        if kind != "ip2p":  # InstructPix2Pix has no strength
            kw["strength"] = o.get("strength", edit.strength)
        return kw


def parse_model(spec: str, name: str = "") -> VictimSpec:
    """``FAMILY:SOURCE`` (or ``NAME:FAMILY:SOURCE``) -> VictimSpec without options."""
    parts = spec.strip().split(":", 1)
    if len(parts) != 2:
        raise UsageError(f"model {spec!r}: expected FAMILY:SOURCE (e.g. sd:tiny, ip2p:miniature:ip2p_a, "
                         "sd:/models/sd14)")
    return _victim(name or spec, parts[0], parts[1], (), spec)


def parse_victims(spec: str | Sequence[str]) -> tuple[VictimSpec, ...]:
    """``"a:sd:tiny,b:ip2p:tiny@1|steps=4"`` -> VictimSpecs (names unique)."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    if not items:
        raise UsageError("no victims: give --victims=NAME:FAMILY:SOURCE[,...] (e.g. v1:sd:tiny)")
    out = []
    for item in items:
        head, *opts = item.split("|")
        parts = head.split(":", 2)
        if len(parts) != 3 or not parts[0]:
            raise UsageError(f"victim {item!r}: expected NAME:FAMILY:SOURCE[|key=value...]")
        options = []
        for o in opts:
            k, eq, v = o.partition("=")
            k = k.strip()
            if not eq or k not in OPTION_KEYS:
                raise UsageError(f"victim {item!r}: bad option {o!r}; keys: {', '.join(sorted(OPTION_KEYS))}")
            try:
                options.append((k, OPTION_KEYS[k](v.strip())))
            except ValueError:
                raise UsageError(f"victim {item!r}: option {k} needs a {OPTION_KEYS[k].__name__}, got {v!r}") from None
        out.append(_victim(parts[0], parts[1], parts[2], tuple(options), item))
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise UsageError(f"victim names must be unique, got {names}")
    return tuple(out)


def _shipped_name(source: str) -> str | None:
    """``miniature:NAME`` / ``mini:NAME`` -> NAME, else None."""
    for prefix in ("miniature:", "mini:"):
        if source.startswith(prefix):
            return source[len(prefix):]
    return None


def _victim(name, family, source, options, item) -> VictimSpec:
    family, source = family.strip(), source.strip()
    if _shipped_name(source) is not None and not family:
        from tdae_jax.miniature import shipped

        try:
            family = shipped.family(_shipped_name(source))
        except (FileNotFoundError, KeyError) as e:
            raise UsageError(f"victim {item!r}: {e}") from None
    if family not in EDIT_KIND:
        raise UsageError(f"victim {item!r}: family must be one of {sorted(EDIT_KIND)}, got {family!r}")
    if not source:
        raise UsageError(f"victim {item!r}: empty SOURCE (tiny, tiny@SEED, miniature:NAME or a directory)")
    return VictimSpec(name.strip(), family, source, options)


@functools.lru_cache(maxsize=8)
def load_model(family: str, source: str):
    """Surrogate for a victim / purifier model (see :class:`VictimSpec`). Raises UsageError."""
    from tdae_jax import models

    try:
        if source == "tiny" or source.startswith("tiny@"):
            return models.tiny(family, seed=int(source[5:] or 0) if "@" in source else 0)
        if _shipped_name(source) is not None:
            from tdae_jax.miniature import shipped

            sur = shipped.load(_shipped_name(source))
        else:
            sur = models.load(family, source)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load {family} model {source!r}: {e}") from e
    if getattr(sur, "family", None) != family:
        raise UsageError(f"model {source!r} is a {getattr(sur, 'family', type(sur).__name__)!r} model, not {family!r}")
    return sur


@functools.lru_cache(maxsize=2)
def load_clip(source: str):
    """CLIPScorer for the ``clip_img`` / ``clip_dir`` columns: ``tiny`` / ``tiny@SEED`` (random, plumbing only)
    or a local transformers CLIPModel directory (``models/clip.py``). Raises UsageError."""
    from tdae_jax.models import clip

    try:
        if source == "tiny" or source.startswith("tiny@"):
            return clip.tiny(int(source[5:] or 0) if "@" in source else 0)
        return clip.load(source)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--clip_weights {source!r}: {e}") from e



@dataclasses.dataclass(frozen=True)
class EvalConfig:
    runs: tuple[str, ...]
    victims: tuple[VictimSpec, ...]
    outdir: str = ""  # default: <run>/eval for a single run
    purify: tuple[str, ...] = ("none",)
    seeds: tuple[int, ...] = (0,)
    edit: EditSettings = EditSettings()
    prompt: str = ""  # overrides every run's prompts
    lpips_weights: tuple[str, ...] = ()
    lpips_net: str = "alex"
    clip_dir: str = ""  # local transformers CLIPModel dir (or tiny[@SEED]) for clip_img / clip_dir; "" = off
    purifier_model: str = ""  # FAMILY:SOURCE of the diffpure/noisyup model; default: the first sd victim
    purify_steps: int | None = None
    noisyup_sigma: float = 0.1
    size: int | None = None  # working size override (None: each run's own)
    batch_size: int = 4
    psnr_cap_db: float = 100.0
    seed_floor: bool = True
    purifier_cost: bool = True
    max_images: int = 0  # per run; 0 = all
    report_images: int = 8  # per run, in report.html
    plots: bool = True
    fast_compile: bool = False  # XLA backend optimization level 0 (tests: compile time >> run time)

