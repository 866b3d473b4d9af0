"""A reproduction study as a resumable grid of cells (protection x budget x threat model) on a miniature world.

Protocol (TDAE §IV, restated for the miniature world; every cell on the **same** held-out edit pairs):

- **Pairs**: ``n`` edit pairs (scene, instruction, exact ground-truth result) of world seed ``seed``, a seed
  used by no training run and no test (training used 0-2 and 10-12, the editors' evaluations 1000, the tests
  2000 and 4242).
- **Threat models**: ``known``: the protector optimizes with the victim's instruction (the papers' setting, a
  best case). ``blind`` (the default): the protector does not know the edit that will be asked; it uses another
  instruction of the same scene drawn from the world's vocabulary (a separate random stream,
  :func:`protector_prompts`), and DPD refines that text embedding. The victim edits with the pair's own
  instruction. Hosts that use no text (the PhotoGuard encoder attack) and the controls are the same under both.
- **Rows**: ``none`` (the clean edit), ``noise`` (uniform noise at the same budget: the control every
  protection is compared with) and defense specs ``host[_fdm|_dpd|_tdae|_tpa]`` (``miniature.protection``).
- **Victims**: the shipped InstructPix2Pix editors (the surrogate itself = intra-model, the others cross-model)
  and the text-to-image models used as SDEdit img2img editors with the edited caption (cross-family); each edits
  the clean and every protected image with the same noise. The oracle scores each edit (success = the
  instructed edit happened), per pair.
- **Purifications**: every victim also edits each purified protected image; the worst case per pair is
  "the edit succeeds under any purification (or none)", the attacker's best.

Storage (``workdir``): ``study.json`` (the settings that determine the protected images; a changed setting is
an error), ``cells/<cell>.npz`` (protected images, seconds, image quality) and ``scores/<cell>.json`` (per-pair
outcomes keyed by victim and purification). Each file is written atomically once complete, so a killed study
re-run continues with the next missing cell or score.
"""
from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from tdae_jax import objectives
from tdae_jax.data import io as dio
from tdae_jax.miniature import oracle, shipped, world
from tdae_jax.miniature import protection as mp
from tdae_jax.miniature import train as T
from tdae_jax.runs import lock

LOCK = "study.lock"  # held while a study computes cells (runs/lock.py: pid, host, start; stale locks taken over)
WORLDS = {"mini32": 32, "mini64": 64}  # world name -> image size (its models are trained at that size)
THREATS = ("blind", "known")
PROTECTOR_STREAM = 0x50524F54  # separate random stream for the blind protector's instruction


class StudyError(ValueError):
    """The study cannot run with these settings (a usage error)."""


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    world: str = "mini32"
    seed: int = 31337
    n: int = 128
    kinds: tuple = ("recolour", "remove")
    max_objects: int = 2
    surrogate: str = "ip2p_a"
    victims: tuple = ("ip2p_a", "ip2p_b", "ip2p_c")
    sdedit_victims: tuple = ("sd_a", "sd_b", "sd_c")
    sdedit_strength: float = 0.6
    purifiers: tuple = ("jpeg75", "resize0.5", "blur1", "noise4")
    rows: tuple = ("noise", "pge", "pgd", "pgd_tdae")
    eps: tuple = (8, 16)
    threats: tuple = THREATS
    steps: int = 40
    edit_steps: int = 10
    denoise_steps: int = 4
    batch_size: int = 16
    beta_sweep: tuple = ()  # FDM beta values for the sweep rows (host_fdm of the first FDM row, at the largest eps)

    def __post_init__(self):
        _validate(self)

    @property
    def size(self) -> int:
        return WORLDS[self.world]

    def fingerprint(self) -> dict:
        """The settings that determine the protected images: changing one invalidates the workdir."""
        keys = ("world", "seed", "n", "kinds", "max_objects", "surrogate", "steps", "denoise_steps")
        return {k: _jsonable(getattr(self, k)) for k in keys}


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def _validate(c: StudyConfig) -> None:
    if c.world not in WORLDS:
        raise StudyError(f"--world={c.world}: unknown world; choose one of {', '.join(WORLDS)}")
    if c.n < 2 or c.steps < 1 or c.edit_steps < 1 or c.batch_size < 1:
        raise StudyError(f"--pairs ({c.n}) must be >= 2 and --pgd_iterations, --victim_steps, --protect_batch >= 1")
    names = shipped.names()
    for v in (c.surrogate, *c.victims, *c.sdedit_victims):
        if v not in names:
            raise StudyError(f"model {v!r} is not a shipped miniature model ({', '.join(names)})")
        size = shipped.info(v)["Data"]["size"]
        if size != WORLDS[c.world]:
            raise StudyError(f"model {v!r} was trained at {size} px, not in the {c.world} world "
                             f"({WORLDS[c.world]} px)")
    for t in c.threats:
        if t not in THREATS:
            raise StudyError(f"--threats: unknown threat model {t!r}; choose from {', '.join(THREATS)}")
    for e in c.eps:
        if not 0 < float(e) < 255:
            raise StudyError(f"--budgets: {e} is not a budget in (0, 255) /255 units")
    for r in c.rows:
        host, variant = mp.parse_spec(r)
        if r not in ("noise",) and host not in objectives.NAMES:
            raise StudyError(f"--rows: {r!r}: unknown host {host!r}; hosts: {', '.join(objectives.NAMES)}")
        if variant in ("dpd", "tdae") and not objectives.uses_text(host):
            raise StudyError(f"--rows: {r!r}: DPD needs a host that uses the text condition ({host} does not)")


# ------------------------------------------------------------------------------------------------- cells
@dataclasses.dataclass(frozen=True)
class Cell:
    row: str
    eps: float = 0.0
    threat: str = "any"  # "any": the protection does not read the protector's text
    beta: float | None = None

    @property
    def id(self) -> str:
        b = "" if self.beta is None else f"_beta{self.beta:g}"
        return f"{self.row}{b}@{self.eps:g}@{self.threat}"


def text_free(row: str) -> bool:
    host, _ = mp.parse_spec(row)
    return row in ("none", "noise") or not objectives.uses_text(host)


def cells(c: StudyConfig) -> list[Cell]:
    """Every cell of the grid, clean first; text-free rows once (threat "any")."""
    out = [Cell("none")]
    for row in c.rows:
        for e in c.eps:
            if text_free(row):
                out.append(Cell(row, float(e)))
            else:
                out.extend(Cell(row, float(e), t) for t in c.threats)
    fdm_rows = [r for r in c.rows if mp.parse_spec(r)[1] == "fdm"]
    if c.beta_sweep and fdm_rows and c.eps:
        e = float(max(c.eps, key=float))
        out.extend(Cell(fdm_rows[0], e, c.threats[0], float(b)) for b in c.beta_sweep)
    return out


def pairs(c: StudyConfig) -> dict:
    p = T.pairs(c.seed, c.n, c.size, tuple(c.kinds), c.max_objects)
    p["ids"] = [f"{c.world}/{c.seed}/{i}" for i in p["index"]]
    return p


def protector_prompts(p: dict, c: StudyConfig, threat: str) -> list[str]:
    """The text the protector optimizes with: the victim's instruction (``known``) or, ``blind``, another edit
    instruction of the same scene (any core kind), drawn from a stream the victim's edits never use."""
    if threat != "blind":
        return list(p["instruction"])
    out = []
    for i, e in zip(p["index"], p["edits"]):
        rng = world.item_rng(c.seed, PROTECTOR_STREAM, int(i))
        text = e.instruction
        for _ in range(16):  # a different instruction (a scene rarely allows only the victim's)
            try:
                text = world.sample_edit(rng, e.source, kinds=world.CORE_KINDS).instruction
            except ValueError:
                continue
            if text != e.instruction:
                break
        out.append(text)
    return out


# --------------------------------------------------------------------------------------------- storage
class Store:
    """The study's workdir: settings check, atomic per-cell files."""

    def __init__(self, workdir, c: StudyConfig, overwrite: bool = False):
        self.root = Path(workdir)
        if self.root.exists() and not self.root.is_dir():
            raise StudyError(f"--study_dir={workdir}: exists and is not a directory")
        meta = self.root / "study.json"
        if meta.is_file() and not overwrite:
            old = json.loads(meta.read_text())
            diff = {k: (old.get(k), v) for k, v in c.fingerprint().items() if old.get(k) != v}
            if diff:
                raise StudyError(f"--study_dir={workdir} holds a study with other settings "
                                 f"({'; '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); "
                                 "use a new --study_dir")
        (self.root / "cells").mkdir(parents=True, exist_ok=True)
        (self.root / "scores").mkdir(exist_ok=True)
        dio.atomic_write_bytes(meta, json.dumps(c.fingerprint(), indent=1).encode())

    def cell_path(self, cell: Cell) -> Path:
        return self.root / "cells" / f"{cell.id.replace('@', '__')}.npz"

    def score_path(self, cell: Cell) -> Path:
        return self.root / "scores" / f"{cell.id.replace('@', '__')}.json"

    def load_cell(self, cell: Cell) -> dict | None:
        path = self.cell_path(cell)
        if not path.is_file():
            return None
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    def save_cell(self, cell: Cell, arrays: dict) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        dio.atomic_write_bytes(self.cell_path(cell), buf.getvalue())

    def _partial_dir(self, cell: Cell) -> Path:
        return self.root / "partial" / cell.id.replace("@", "__")

    def load_partial(self, cell: Cell) -> tuple[dict, float]:
        """``({batch start: uint8 images}, seconds spent on them)`` of a cell stopped midway."""
        d, done, seconds = self._partial_dir(cell), {}, 0.0
        for f in sorted(d.glob("*.npz")) if d.is_dir() else []:
            with np.load(f) as z:
                done[int(z["start"])] = z["images"]
                seconds = max(seconds, float(z["seconds"]))
        return done, seconds

    def save_partial(self, cell: Cell, start: int, images, seconds: float) -> None:
        d = self._partial_dir(cell)
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez_compressed(buf, start=start, images=images, seconds=seconds)
        dio.atomic_write_bytes(d / f"{start:06d}.npz", buf.getvalue())

    def drop_partial(self, cell: Cell) -> None:
        d = self._partial_dir(cell)
        for f in d.glob("*.npz") if d.is_dir() else []:
            f.unlink()
        if d.is_dir():
            d.rmdir()

    def load_scores(self, cell: Cell) -> dict:
        path = self.score_path(cell)
        return json.loads(path.read_text()) if path.is_file() else {}

    def save_scores(self, cell: Cell, scores: dict) -> None:
        dio.atomic_write_bytes(self.score_path(cell), json.dumps(scores).encode())


# ------------------------------------------------------------------------------------------ computing
_PROTECTORS: dict = {}


def _protector(sur, cell: Cell, c: StudyConfig):
    """One compiled protector per (row, eps, beta): the blind and known cells differ only in their prompts."""
    if cell.row == "noise":
        return None
    key = (id(sur), cell.row, cell.eps, cell.beta, c.steps, c.denoise_steps, c.batch_size)
    if key not in _PROTECTORS:
        _PROTECTORS.clear()  # keep one: the grid visits a row's threat models one after the other
        _PROTECTORS[key] = mp.make_protector(sur, cell.eps / 255.0, cell.row, c.steps, c.denoise_steps, cell.beta,
                                             c.batch_size)
    return _PROTECTORS[key]


def protect_cell(cell: Cell, p: dict, c: StudyConfig, sur, store: Store | None = None) -> dict:
    """The protected images of one cell, with the seconds it took and their quality (PSNR, SSIM vs clean).

    With ``store``, each finished batch is saved (``partial/``) and reused, so a cell stopped midway resumes."""
    t0 = time.perf_counter()
    done, seconds_before, on_batch = {}, 0.0, None
    if store is not None:
        done, seconds_before = store.load_partial(cell)
        on_batch = lambda i, x: store.save_partial(cell, i, x, seconds_before + time.perf_counter() - t0)  # noqa: E731
    if cell.row == "none":
        images = p["source"]
    else:
        prompts = protector_prompts(p, c, cell.threat)
        images = mp.protect(sur, p["source"], prompts, cell.eps / 255.0, cell.row, c.steps, c.denoise_steps,
                            ids=p["ids"], beta=cell.beta, batch_size=c.batch_size, done=done, on_batch=on_batch,
                            protector=_protector(sur, cell, c))
    seconds = seconds_before + time.perf_counter() - t0
    if cell.row != "none" and dio.linf_uint8(images, p["source"]) > int(cell.eps):
        raise AssertionError(f"{cell.id}: budget exceeded on the 8-bit grid")
    psnr = np.array([oracle.psnr(a, b) for a, b in zip(images, p["source"])], np.float32)
    ssim = np.array([oracle.ssim(a, b) for a, b in zip(images, p["source"])], np.float32)
    return {"images": images, "seconds": np.float64(seconds), "psnr": psnr, "ssim": ssim}


def score_key(victim: str, purifier: str, c: StudyConfig) -> str:
    extra = f"|s{c.sdedit_strength:g}" if shipped.family(victim) == "sd" else ""
    return f"{victim}|{purifier}|steps{c.edit_steps}{extra}"


def edit_outcomes(images, p: dict, victim: str, sur, c: StudyConfig) -> list[bool]:
    """Per-pair oracle success of ``victim``'s edit of ``images`` (uint8)."""
    if shipped.family(victim) == "ip2p":
        out = mp.edit(sur, images, p["instruction"], c.edit_steps)
    else:
        out = mp.sdedit(sur, images, p["edited_caption"], c.edit_steps, c.sdedit_strength)
    return [bool(r["success"]) for r in oracle.evaluate(out, p)["rows"]]


def purified(images, purifier: str, p: dict) -> np.ndarray:
    from tdae_jax import prng, purify

    if purifier == "none":
        return images
    import jax

    keys = jax.vmap(lambda u: jax.random.fold_in(jax.random.key(11), u))(prng.uids(p["ids"]))
    x = purify.Purifier(purifier)(images.astype(np.float32) / 255.0, keys)
    return np.round(np.asarray(x) * 255.0).astype(np.uint8)


def run(c: StudyConfig, workdir, log: Callable[[str], None] = print, overwrite: bool = False,
        on_cell: Callable[[Store], None] | None = None) -> Store:
    """Computes every missing cell and score of the grid (resumable); ``on_cell(store)`` after each new one."""
    store = Store(workdir, c, overwrite)
    with lock.held(store.root / LOCK, store.root):  # one study computes in a folder at a time
        return _run(c, store, log, on_cell)


def _run(c: StudyConfig, store: Store, log, on_cell) -> Store:
    from tdae_jax import models

    p = pairs(c)
    sur = models.load("ip2p", shipped.path(c.surrogate))
    victims = {v: shipped.load(v) for v in (*c.victims, *c.sdedit_victims)}
    purifiers = ("none", *c.purifiers)
    grid = cells(c)
    for i, cell in enumerate(grid):
        data = store.load_cell(cell)
        if data is None:
            log(f"[{i + 1}/{len(grid)}] protecting {cell.id} ({c.n} pairs, {c.steps} iterations)")
            data = protect_cell(cell, p, c, sur, store)
            store.save_cell(cell, data)
            store.drop_partial(cell)
            log(f"[{i + 1}/{len(grid)}] {cell.id}: protected in {float(data['seconds']):.0f} s")
        scores = store.load_scores(cell)
        missing = [(v, pur) for v in victims for pur in purifiers if score_key(v, pur, c) not in scores]
        for v, pur in missing:
            scores[score_key(v, pur, c)] = edit_outcomes(purified(data["images"], pur, p), p, v, victims[v], c)
        if missing:
            store.save_scores(cell, scores)
            if on_cell is not None:
                on_cell(store)
    return store
