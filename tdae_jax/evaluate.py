"""Evaluate protections against victim editors: the library side of ``python -m experiments.evaluate``.

Spec TDAE.md §11: protection efficacy compares ``edit(protected)`` with ``edit(clean)`` (PSNR↓ SSIM↓
LPIPS↑ VIFp↓ FSIM↓), both edits with the **same** victim, prompt, seed and scheduler noise; the **seed
floor** compares ``edit(clean; seed a)`` with ``edit(clean; seed b)``; imperceptibility compares the
protected file with the original (PSNR↑ SSIM↑ LPIPS↓, at the original resolution, as written on disk).
PEERS.md §4 adds purification: the victim edits ``P(protected)`` for each purifier P (``tdae_jax.purify``),
the per-image worst case over the set, and the purifier's own cost ``edit(P(clean))`` vs ``edit(clean)``.

Inputs are protect workdirs (``manifest.json`` entries with ``status == "done"``, their ``source`` and
``outputs.protected``; ``config.json`` names the surrogate, eps, working size and prompts). The clean and
protected images are brought to the run's working resolution with the same transform
(``data.io.load_image``), which is what the victim sees. Rows (``EvalResult.rows``), one per
run x image x victim x purifier x seed and ``kind``:

- ``protection``: edit(P(protected)) vs edit(clean), plus ``imp_*`` (protected vs original);
- ``worst``: per metric, the purifier most similar to edit(clean) (``worst_by`` says which), over ``purify``;
- ``seed_floor``: edit(clean; ``seed_b``) vs edit(clean; ``seed``) (``seed_b`` = the next listed seed,
  cyclically, or seed + 1 with a single seed);
- ``purifier_cost``: edit(P(clean)) vs edit(clean), for P != none.

Keys: the victim's noise for image ``id`` and seed ``s`` is ``prng.image_keys(key(s), uid(id), EDIT_STEP)``
(the same for clean, protected and purified inputs, and disjoint from the protect run's per-iteration keys);
random purifiers use ``stream(purifier name)`` instead of ``EDIT_STEP``. PSNR of identical images is capped
at ``psnr_cap_db`` (100 dB) so means stay finite; a metric an image is too small for (VIFp below 41 px,
SSIM below 11 px, LPIPS-AlexNet below 32 px) is NaN (an empty CSV cell).

With ``clip_dir`` (a local transformers CLIPModel directory, ``tdae_jax.models.clip``; ``tiny[@SEED]`` for
plumbing tests) every row also gets ``clip_img``, the CLIP image similarity of the row's two edits (e.g.
edit(protected) vs edit(clean); higher = the protection failed), and ``clip_dir``, the CLIP direction
similarity (``metrics.clip_sim``) of the row's test edit w.r.t. the original along the prompts row's
``caption`` -> ``edited_prompt`` (NaN without both, when ``prompt`` overrides the edit text, or without
tokenizer files in the CLIP directory).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from tdae_jax import prng
from tdae_jax import purify as purify_lib
from tdae_jax.data import io as dio
from tdae_jax.data.manifest import Manifest
from tdae_jax.metrics import image as image_metrics

log = logging.getLogger("tdae_jax")

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


class UsageError(ValueError):
    """The evaluation cannot start (bad flags, runs, victims or weights): exit code 2."""


# ------------------------------------------------------------------------------------------------ specs
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


# ------------------------------------------------------------------------------------------------ runs
@dataclasses.dataclass
class Item:
    run: "RunInfo"
    id: str
    source: str
    protected_path: Path
    clean: np.ndarray | None = None  # [H,W,3] float32 working
    protected: np.ndarray | None = None
    imp: dict = dataclasses.field(default_factory=dict)
    mask: np.ndarray | None = None  # [H,W,1] for inpaint victims (prompts' "mask" column), None = centre

    @property
    def source_key(self):
        return (self.source, self.id, self.run.size, self.run.resize)


@dataclasses.dataclass
class RunInfo:
    path: Path
    name: str
    config: dict
    items: list[Item]
    prompts: dict

    @property
    def surrogate(self) -> str:
        c = self.config
        return f"{c.get('surrogate', '?')}:{Path(c['weights_dir']).name if c.get('weights_dir') else 'tiny'}"

    @property
    def eps(self) -> float:
        return float((self.config.get("budget") or {}).get("eps", math.nan))

    @property
    def size(self):
        return self.config.get("size")

    @property
    def resize(self) -> str:
        return self.config.get("resize", "center_crop")

    @property
    def label(self) -> str:
        return f"{self.surrogate} [{self.name}]"

    def meta(self) -> dict:
        c = self.config
        return {"run": self.name, "surrogate": self.surrogate, "objective": (c.get("objective") or {}).get("name", ""),
                "defense": c.get("defense", ""), "eps": self.eps, "eot": c.get("eot") or "none"}


def read_run(path, size_override: int | None = None, max_images: int = 0) -> tuple[RunInfo, list[str]]:
    """Reads a protect workdir. Returns the run and a list of problems (done images that cannot be used)."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "manifest.json").is_file():
        raise UsageError(f"{path}: not a protect workdir (needs config.json and manifest.json; run "
                         f"python -m experiments.tdae first)")
    try:
        config = json.loads((path / "config.json").read_text())
        entries = Manifest(path / "manifest.json").entries()
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable config.json / manifest.json: {e}") from e
    if size_override:
        config = {**config, "size": int(size_override),
                  "resize": "center_crop" if config.get("resize") == "none" else config.get("resize", "center_crop")}
    run = RunInfo(path, path.resolve().name, config, [], {})
    problems = []
    done = [e for e in entries if isinstance(e, dict) and e.get("status") == "done"]
    if max_images:
        done = done[:max_images]
    if not done:
        problems.append(f"{path}: no protected images (no manifest entry with status 'done')")
    if config.get("prompts"):
        try:
            run.prompts, probs = dio.load_prompts(config["prompts"], image_paths=[e["source"] for e in done])
            problems.extend(f"{path}: prompts: {p}" for p in probs if p.path is not None)
        except (dio.DataError, OSError) as e:
            log.warning("%s: prompts file unusable (%s); using the default prompt", path, e)
    for e in done:
        prot = path / ((e.get("outputs") or {}).get("protected") or f"protected/{e['id']}.png")
        run.items.append(Item(run, e["id"], e["source"], prot))
    return run, problems


def load_item(item: Item, lpips_fn, psnr_cap: float) -> None:
    """Loads clean / protected at the run's working size and computes imperceptibility (full resolution)."""
    size = item.run.size if item.run.resize != "none" else None
    kw = dict(size=size, resize=item.run.resize, min_side=1)
    src = dio.load_image(item.source, image_id=item.id, **kw)
    prot = dio.load_image(item.protected_path, image_id=item.id, **kw)
    if prot.original_uint8.shape != src.original_uint8.shape:
        raise dio.DataError(f"{item.protected_path}: size {prot.original_uint8.shape[:2]} differs from the "
                            f"original {item.source} {src.original_uint8.shape[:2]}")
    item.clean, item.protected = src.array, prot.array
    a = np.asarray(prot.original_uint8, np.float32)[None] / 255.0
    b = np.asarray(src.original_uint8, np.float32)[None] / 255.0
    scores = compare(a, b, lpips_fn if "lpips" in IMP_METRICS else None, psnr_cap, metrics=IMP_METRICS)
    item.imp = {f"imp_{k}": float(v[0]) for k, v in scores.items()}
    item.imp["imp_linf_255"] = int(dio.linf_uint8(prot.original_uint8, src.original_uint8))
    rec = _find_prompt(item)
    if rec and rec.get("mask"):
        m = dio.load_image(Path(item.source).parent / rec["mask"] if not Path(rec["mask"]).is_absolute()
                           else rec["mask"], **kw).array
        item.mask = (m.mean(-1, keepdims=True) >= 0.5).astype(np.float32)


def _find_prompt(item: Item):
    from tdae_jax.data.manifest import find_prompt

    return find_prompt(item.run.prompts, item.id, item.source) if item.run.prompts else None


def prompt_for(item: Item, family: str, override: str = "") -> str:
    """The edit text: ``override``, else the run's prompts row (ip2p: instruction; sd/inpaint: edited_prompt,
    caption, instruction), else the run's default prompt."""
    if override:
        return override
    default = item.run.config.get("default_prompt") or "make it a watercolor painting"
    rec = _find_prompt(item)
    if not rec:
        return default
    if family == "ip2p":
        return rec.get("instruction") or rec.get("caption") or default
    return rec.get("edited_prompt") or rec.get("caption") or rec.get("instruction") or default


# ------------------------------------------------------------------------------------------------ metrics
def compare(a, b, lpips_fn: Callable | None = None, psnr_cap: float | None = 100.0,
            metrics: Sequence[str] = METRICS, chunk: int | None = None) -> dict[str, np.ndarray]:
    """§11 metrics of ``a`` (test) vs ``b`` (reference), ``[N,H,W,3]`` in [0,1] -> ``{metric: [N] float64}``.

    LPIPS only with ``lpips_fn``; a metric the image is too small for is NaN (``MIN_SIDE``). ``chunk``: pad
    every call to this batch size (one compilation per shape, whatever N)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    n, side = a.shape[0], min(a.shape[1:3])
    chunk = chunk or n
    fns = {"psnr": functools.partial(image_metrics.psnr, max_db=psnr_cap), "ssim": image_metrics.ssim,
           "vifp": image_metrics.vifp, "fsim": image_metrics.fsim, "lpips": lpips_fn}
    out = {}
    for m in metrics:
        if fns.get(m) is None:
            continue
        if side < MIN_SIDE[m]:
            out[m] = np.full(n, np.nan)
            continue
        vals = []
        for i in range(0, n, chunk):
            aa, bb = a[i:i + chunk], b[i:i + chunk]
            k = aa.shape[0]
            if k < chunk:
                pad = np.repeat(aa[-1:], chunk - k, 0), np.repeat(bb[-1:], chunk - k, 0)
                aa, bb = np.concatenate([aa, pad[0]]), np.concatenate([bb, pad[1]])
            vals.append(np.asarray(fns[m](aa, bb), np.float64)[:k])
        out[m] = np.concatenate(vals)
    return out


@jax.jit
def _keys(seeds, uids, step):
    f = lambda s, u: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), u), step)  # noqa: E731
    return jax.random.key_data(jax.vmap(f)(seeds, uids))


def edit_keys(seeds: int | Sequence[int], ids: Sequence[str], step: int = EDIT_STEP) -> jax.Array:
    """``[B, 2]`` raw key data: the victim's noise for (seed, image id), i.e.
    ``prng.image_keys(prng.base_key(seed), prng.uids(ids), step)`` with one seed per id (or one for all)."""
    seeds = np.broadcast_to(np.asarray(seeds, np.int64), (len(ids),)).astype(np.uint32)
    return _keys(jax.numpy.asarray(seeds), jax.numpy.asarray(prng.uids(ids)).astype(jax.numpy.uint32),
                 jax.numpy.uint32(step))


def worst_rows(rows: list[dict], metrics: Sequence[str] = METRICS) -> list[dict]:
    """``kind="worst"`` rows: per (run, id, victim, seed), :func:`purify.worst_case` over the protection rows."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["kind"] == "protection":
            groups.setdefault((r["run"], r["id"], r["victim"], r["seed"]), {})[r["purify"]] = r
    out = []
    for per in groups.values():
        ms = [m for m in metrics if any(m in r for r in per.values())]
        value, which = purify_lib.worst_case({p: {m: r.get(m) for m in ms} for p, r in per.items()}, ms)
        first = next(iter(per.values()))
        out.append({**first, "kind": "worst", "purify": "worst", **{m: value[m] for m in metrics if m in value},
                    "worst_by": ";".join(f"{m}:{which[m]}" for m in metrics if which.get(m))})
    return out


# ------------------------------------------------------------------------------------------------ runner
@dataclasses.dataclass
class EvalResult:
    rows: list[dict]
    failures: list[str]
    outdir: Path
    runs: list[RunInfo]
    thumbs: dict  # (victim, run, id) -> {caption: uint8 [H,W,3]}



def _u8(x) -> np.ndarray:
    return np.round(np.clip(np.asarray(x, np.float64), 0, 1) * 255).astype(np.uint8)


def centre_mask(h: int, w: int) -> np.ndarray:
    """``[H,W,1]``: the centre half of the image (the objectives' default inpainting mask)."""
    m = np.zeros((h, w, 1), np.float32)
    m[h // 4:3 * h // 4, w // 4:3 * w // 4] = 1.0
    return m


class _Jobs:
    """Edit jobs of one victim, deduplicated by content: two logical jobs with the same pixels, mask, prompt,
    seed and image id are edited once (so an identity purifier reproduces edit(protected) bit for bit)."""

    def __init__(self):
        self.jobs: dict = {}  # content key -> (image, prompt, seed, image id, mask)
        self.alias: dict = {}  # logical key -> content key

    def add(self, key, image, prompt, seed, image_id, mask=None):
        digest = hashlib.sha1(np.ascontiguousarray(image, np.float32).tobytes()).hexdigest()
        mdig = None if mask is None else hashlib.sha1(np.ascontiguousarray(mask, np.float32).tobytes()).hexdigest()
        ck = (digest, image.shape, mdig, prompt, int(seed), image_id)
        self.jobs.setdefault(ck, (image, prompt, seed, image_id, mask))
        self.alias[key] = ck
        return key

    def run(self, editor, surrogate, batch_size: int) -> dict:
        """Edits every job in batches of ``batch_size`` (padded: one compilation per image shape); returns
        logical key -> ``[H,W,3]`` float32."""
        from tdae_jax import editors

        by_shape: dict[tuple, list] = {}
        for k, j in self.jobs.items():
            by_shape.setdefault(j[0].shape, []).append(k)
        done = {}
        inpaint = editor.config.kind == "inpaint"
        for shape, keys in by_shape.items():
            for i in range(0, len(keys), batch_size):
                ks = keys[i:i + batch_size]
                js = [self.jobs[k] for k in ks] + [self.jobs[ks[-1]]] * (batch_size - len(ks))
                imgs = np.stack([j[0] for j in js])
                emb, uncond = editors.embed_prompts(surrogate, [j[1] for j in js])
                keyd = edit_keys([j[2] for j in js], [j[3] for j in js])
                mask = (np.stack([j[4] if j[4] is not None else centre_mask(*shape[:2]) for j in js])
                        if inpaint else None)
                res = np.asarray(editor(imgs, emb, uncond, keyd, mask=mask), np.float32)
                done.update(zip(ks, res[:len(ks)]))
        return {k: done[ck] for k, ck in self.alias.items()}


class Runner:
    """The evaluation loop: load runs and victims, purify, edit, compare (module docstring)."""

    METRIC_CHUNK = 8

    def __init__(self, cfg: EvalConfig, progress: Callable[[str], None] = log.info):
        self.cfg, self.progress = cfg, progress
        if not cfg.runs:
            raise UsageError("no runs: give --runs=WORKDIR[,WORKDIR...] (protect workdirs)")
        if not cfg.victims:
            raise UsageError("no victims: give --victims=NAME:FAMILY:SOURCE[,...]")
        if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
            raise UsageError(f"--seeds must be a non-empty list of distinct integers, got {list(cfg.seeds)}")
        if cfg.batch_size < 1:
            raise UsageError(f"--batch_size must be >= 1, got {cfg.batch_size}")
        try:
            self.purifier_specs = purify_lib.parse(cfg.purify) or (purify_lib.PurifierSpec("none"),)
        except ValueError as e:
            raise UsageError(str(e)) from None
        self.copts = {"xla_backend_optimization_level": 0} if cfg.fast_compile else None
        self.lpips_fn = None
        if cfg.lpips_weights:
            from tdae_jax.metrics.lpips import load_lpips_params, make_lpips_fn

            try:
                self.lpips_fn = make_lpips_fn(load_lpips_params(list(cfg.lpips_weights), cfg.lpips_net), cfg.lpips_net)
            except (OSError, ValueError, KeyError) as e:
                raise UsageError(f"--lpips_weights: {e}") from e
        self.clip = load_clip(cfg.clip_dir) if cfg.clip_dir else None
        if self.clip is not None and self.clip.static.tokenizer is None:
            log.warning("--clip_weights %s: no tokenizer files (vocab.json, merges.txt): clip_dir stays NaN",
                        cfg.clip_dir)
        self._clip_text: dict[str, np.ndarray] = {}
        self.failures: list[str] = []
        self.runs = []
        for r in cfg.runs:
            info, problems = read_run(r, cfg.size, cfg.max_images)
            self.runs.append(info)
            self.failures.extend(problems)
        names = [r.name for r in self.runs]
        if len(set(names)) != len(names):
            raise UsageError(f"run folder names must be unique (they label the rows), got {names}")
        self.models = {v.name: load_model(v.family, v.source) for v in cfg.victims}
        self.editors = {}
        from tdae_jax import editors

        for v in cfg.victims:
            try:
                self.editors[v.name] = editors.make_editor(surrogate=self.models[v.name], compiler_options=self.copts,
                                                           **v.editor_kwargs(cfg.edit))
            except ValueError as e:
                raise UsageError(f"victim {v.name}: {e}") from e
        pmodel = None
        if any(p.needs_model for p in self.purifier_specs):
            if cfg.purifier_model:
                m = parse_model(cfg.purifier_model)
                pmodel = load_model(m.family, m.source)
            else:
                sd = [v for v in cfg.victims if v.family == "sd"]
                if not sd:
                    raise UsageError("diffpure / noisyup need an 'sd' model: give --purifier_model=sd:SOURCE or an "
                                     "sd victim")
                pmodel = self.models[sd[0].name]
        try:
            self.purifiers = [purify_lib.Purifier(p, pmodel, cfg.purify_steps, cfg.noisyup_sigma,
                                                  compiler_options=self.copts) for p in self.purifier_specs]
        except ValueError as e:
            raise UsageError(str(e)) from e

    # -------------------------------------------------------------------------------------------------
    def run(self) -> EvalResult:
        cfg = self.cfg
        items = []
        for r in self.runs:
            for it in r.items:
                try:
                    load_item(it, self.lpips_fn, cfg.psnr_cap_db)
                    items.append(it)
                except (dio.DataError, OSError, ValueError) as e:
                    self.failures.append(f"{r.name}/{it.id}: {e}")
                    log.error("%s/%s: %s", r.name, it.id, e)
        self.report_set = {(r.name, it.id) for r in self.runs for it in
                           [i for i in r.items if i.clean is not None][:cfg.report_images]}
        groups: dict[tuple, list[Item]] = {}
        for it in items:
            groups.setdefault(it.source_key, []).append(it)
        order = list(groups)
        rows, thumbs = [], {}
        for c in range(0, len(order), cfg.batch_size):
            chunk = [groups[k] for k in order[c:c + cfg.batch_size]]
            self.progress(f"sources {c + 1}-{c + len(chunk)} of {len(order)}: purifying "
                          f"({', '.join(p.name for p in self.purifiers)})")
            pur = self._purify(chunk)
            for v in cfg.victims:
                self.progress(f"sources {c + 1}-{c + len(chunk)} of {len(order)}: victim {v.name}")
                try:
                    rows.extend(self._victim(v, chunk, pur, thumbs))
                except Exception as e:  # noqa: BLE001 - one victim failing must not lose the others
                    self.failures.append(f"victim {v.name} on {[g[0].id for g in chunk]}: {type(e).__name__}: {e}")
                    log.exception("victim %s failed", v.name)
        if len(self.purifiers) > 1:
            rows.extend(worst_rows(rows, METRICS + CLIP_METRICS))
        return EvalResult(rows, self.failures, Path(cfg.outdir), self.runs, thumbs)

    def _random(self, p) -> bool:
        return p.spec.kind in ("noise", "diffpure", "noisyup")

    def _purify(self, chunk) -> dict:
        """{(image key, purifier, seed or None): purified [H,W,3]} for the protected (and clean) images."""
        inputs = []  # (image key, image, id)
        for group in chunk:
            for it in group:
                inputs.append((("prot", it.run.name, it.id), it.protected, it.id))
            if self.cfg.purifier_cost:
                it = group[0]
                inputs.append((("clean", it.source_key), it.clean, it.id))
        out = {}
        for p in self.purifiers:
            if p.name == "none":
                continue
            seeds = self.cfg.seeds if self._random(p) else (None,)
            for s in seeds:
                by_shape: dict = {}
                for key, img, iid in inputs:
                    by_shape.setdefault(img.shape, []).append((key, img, iid))
                for lst in by_shape.values():
                    b = self.cfg.batch_size
                    for i in range(0, len(lst), b):
                        part = lst[i:i + b]
                        full = part + [part[-1]] * (b - len(part))
                        keys = edit_keys(0 if s is None else s, [x[2] for x in full], purify_lib.stream(p.name))
                        res = p(np.stack([x[1] for x in full]), keys)
                        out.update({(x[0], p.name, s): res[j] for j, x in enumerate(part)})
        return out

    def _get(self, pur, key, image, p, seed):
        if p.name == "none":
            return image
        return pur[(key, p.name, seed if self._random(p) else None)]

    def _victim(self, v: VictimSpec, chunk, pur, thumbs) -> list[dict]:
        cfg, seeds = self.cfg, list(self.cfg.seeds)
        jobs, pairs = _Jobs(), []
        for group in chunk:
            for it in group:
                prompt, sk = prompt_for(it, v.family, cfg.prompt), it.source_key
                pk = ("prot", it.run.name, it.id)
                for si, s in enumerate(seeds):
                    add = lambda key, img, seed=s: jobs.add(  # noqa: E731
                        key + (seed, prompt), img, prompt, seed, it.id, it.mask)
                    ref = add(("clean", sk, "none"), it.clean)
                    for p in self.purifiers:
                        t = add(("prot", pk, p.name), self._get(pur, pk, it.protected, p, s))
                        pairs.append((it, {"kind": "protection", "purify": p.name, "seed": s, **it.imp}, t, ref))
                        if cfg.purifier_cost and p.name != "none":
                            t = add(("clean", sk, p.name), self._get(pur, ("clean", sk), it.clean, p, s))
                            pairs.append((it, {"kind": "purifier_cost", "purify": p.name, "seed": s}, t, ref))
                    if cfg.seed_floor:
                        sb = seeds[(si + 1) % len(seeds)] if len(seeds) > 1 else s + 1
                        t = add(("clean", sk, "none"), it.clean, seed=sb)
                        pairs.append((it, {"kind": "seed_floor", "purify": "none", "seed": s, "seed_b": sb}, t, ref))
        edits = jobs.run(self.editors[v.name], self.models[v.name], cfg.batch_size)
        rows = []
        by_shape: dict = {}
        for pr in pairs:
            by_shape.setdefault(edits[pr[2]].shape, []).append(pr)
        for lst in by_shape.values():
            scores = compare(np.stack([edits[p[2]] for p in lst]), np.stack([edits[p[3]] for p in lst]), self.lpips_fn,
                             cfg.psnr_cap_db, chunk=self.METRIC_CHUNK)
            if self.clip is not None:
                scores.update(self._clip_scores(lst, edits))
            for j, (it, extra, _, _) in enumerate(lst):
                rows.append({**it.run.meta(), "id": it.id, "source": it.source, "victim": v.name,
                             "victim_family": v.family,
                             "editor": self.editors[v.name].config.kind, "seed_b": "", "worst_by": "", **extra,
                             **{m: float(s[j]) for m, s in scores.items()}})
        s0 = seeds[0]
        for group in chunk:
            for it in group:
                if (it.run.name, it.id) not in self.report_set:
                    continue
                prompt, sk, pk = prompt_for(it, v.family, cfg.prompt), it.source_key, ("prot", it.run.name, it.id)
                cells = {"original": _u8(it.clean), "protected": _u8(it.protected),
                         "edit(original)": _u8(edits[("clean", sk, "none", s0, prompt)])}
                for p in self.purifiers:
                    lab = "edit(protected)" if p.name == "none" else f"edit({p.name}(protected))"
                    cells[lab] = _u8(edits[("prot", pk, p.name, s0, prompt)])
                thumbs[(v.name, it.run.name, it.id)] = {"cells": cells, "prompt": prompt}
        return rows

    # ------------------------------------------------------------------------------------------------- CLIP
    def _clip_images(self, images: list) -> np.ndarray:
        """``[N, D]`` unit CLIP image embeddings, in padded chunks (one compilation per image shape)."""
        k, out = self.METRIC_CHUNK, np.zeros((len(images), self.clip.config.projection_dim), np.float32)
        by_shape: dict = {}
        for i, im in enumerate(images):
            by_shape.setdefault(np.shape(im), []).append(i)
        for idx in by_shape.values():
            for c in range(0, len(idx), k):
                part = idx[c:c + k]
                batch = np.stack([images[i] for i in part] + [images[part[-1]]] * (k - len(part)))
                out[part] = np.asarray(self.clip.image_embeds(batch))[:len(part)]
        return out

    def _clip_texts(self, texts: list[str]) -> np.ndarray:
        new = sorted({t for t in texts if t not in self._clip_text})
        k = self.METRIC_CHUNK
        for c in range(0, len(new), k):
            part = new[c:c + k]
            emb = np.asarray(self.clip.text_embeds(part + [part[-1]] * (k - len(part))))
            self._clip_text.update(zip(part, emb))
        return np.stack([self._clip_text[t] for t in texts])

    def _clip_scores(self, lst, edits) -> dict[str, np.ndarray]:
        """``clip_img`` (test edit vs reference edit) and ``clip_dir`` (module docstring) of ``lst``'s pairs."""
        from tdae_jax.metrics import clip_sim

        test = self._clip_images([edits[p[2]] for p in lst])
        ref = self._clip_images([edits[p[3]] for p in lst])
        out = {"clip_img": np.asarray(clip_sim.clip_image_similarity(test, ref), np.float64),
               "clip_dir": np.full(len(lst), np.nan)}
        text = not self.cfg.prompt and self.clip.static.tokenizer is not None
        recs = [_find_prompt(p[0]) if text else None for p in lst]
        has = [i for i, r in enumerate(recs) if r and r.get("caption") and r.get("edited_prompt")]
        if has:
            orig = self._clip_images([lst[i][0].clean for i in has])
            t0 = self._clip_texts([recs[i]["caption"] for i in has])
            t1 = self._clip_texts([recs[i]["edited_prompt"] for i in has])
            out["clip_dir"][has] = np.asarray(clip_sim.clip_direction_similarity(orig, test[has], t0, t1))
        return out


def run(cfg: EvalConfig, progress: Callable[[str], None] = log.info) -> EvalResult:
    """Evaluates every run against every victim (rows in memory; :func:`write_outputs` writes them)."""
    return Runner(cfg, progress).run()


def default_outdir(cfg: EvalConfig) -> Path:
    if cfg.outdir:
        return Path(cfg.outdir)
    if len(cfg.runs) == 1:
        return Path(cfg.runs[0]) / "eval"
    raise UsageError("several --runs: give --outdir")


def write_outputs(result: EvalResult, cfg: EvalConfig) -> dict[str, Path]:
    """``metrics.jsonl`` / ``metrics.csv`` (every row), ``matrix.md``, ``report.html``, ``plots/*.png``,
    ``eval_config.json`` and ``failures.txt`` (when any) under ``result.outdir``."""
    from tdae_jax.metrics import report

    out = result.outdir
    out.mkdir(parents=True, exist_ok=True)
    rows = result.rows
    report.write_metrics(out, rows, columns=COLUMNS + (CLIP_METRICS if cfg.clip_dir else ()))
    metrics = [m for m in METRICS if any(m in r for r in rows)]
    runs = [{**r.meta(), "name": r.name, "label": r.label, "path": str(r.path),
             "images": sum(it.clean is not None for it in r.items)} for r in result.runs]
    victims = [v.name for v in cfg.victims]
    purifiers = [p.name for p in purify_lib.parse(cfg.purify)] or ["none"]
    notes = [f"victim {v.name}: {v.family} {v.source}, editor {v.editor_kwargs(cfg.edit)}" for v in cfg.victims]
    if result.failures:
        notes.append(f"{len(result.failures)} problem(s), see failures.txt")
    md = report.eval_matrix_md(rows, runs, victims, purifiers, list(cfg.seeds), metrics, notes)
    dio.atomic_write_bytes(out / "matrix.md", md.encode())
    plots = report.eval_plots(out, rows, runs, victims, metrics, purifiers) if cfg.plots else []
    stats = {}
    first = "none" if "none" in purifiers else purifiers[0]
    for r in rows:
        if r["kind"] == "protection" and r["purify"] == first and r["seed"] == cfg.seeds[0]:
            stats[(r["victim"], r["run"], r["id"])] = ("edit(protected) vs edit(clean): " + ", ".join(
                f"{m}={r[m]:.4g}" for m in metrics if r.get(m) is not None and math.isfinite(r[m]))
                + "; protected vs original: PSNR "
                f"{r.get('imp_psnr', math.nan):.2f} dB, L∞ {r.get('imp_linf_255')}/255")
    summary = {"runs": ", ".join(f"{r['label']}" for r in runs), "victims": "; ".join(notes[:len(victims)]),
               "purifiers": ", ".join(purifiers), "seeds": ", ".join(map(str, cfg.seeds)), "rows": len(rows),
               "failures": len(result.failures)}
    paths = {"metrics_csv": out / "metrics.csv", "metrics_jsonl": out / "metrics.jsonl", "matrix": out / "matrix.md",
             "report": report.write_eval_html(out, "tdae_jax evaluation", summary, md, result.thumbs, victims, stats,
                                              plots)}
    cfg_json = json.dumps(dataclasses.asdict(cfg), indent=1, default=str)
    dio.atomic_write_bytes(out / "eval_config.json", cfg_json.encode())
    if result.failures:
        dio.atomic_write_bytes(out / "failures.txt", ("\n".join(result.failures) + "\n").encode())
    elif (out / "failures.txt").exists():
        (out / "failures.txt").unlink()
    for i, p in enumerate(plots):
        paths[f"plot{i}"] = p
    return paths
