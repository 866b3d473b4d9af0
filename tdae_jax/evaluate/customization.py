"""The attacker's side of a fine-tuning defense: fine-tune a text-to-image model on each set of photos of one
identity (clean or protected), sample it, and score what the attacker gets. The library side of
``python -m experiments.evaluate_customization``.

Protocol (Anti-DreamBooth, Van Le et al., ICCV 2023: VinAIResearch/Anti-DreamBooth
``scripts/attack_with_aspl.sh``, then ``train_dreambooth.py``'s ``main`` and ``infer``; DLADiff §5.1 and Table 1):
the attacker runs DreamBooth (Ruiz et al., CVPR 2023; diffusers ``train_dreambooth.py``) or LoRA (Hu et al.,
ICLR 2022; diffusers ``train_dreambooth_lora.py``) on a set with the instance prompt "a photo of sks person",
with prior preservation on class images of "a photo of person" sampled once from the base model, then samples
each inference prompt ("a photo of sks person", "a dslr portrait of sks person"). Fine-tuning and sampling are
``editors.finetune.finetune`` / ``finetune.sample`` (DDIM, eta 0, CFG).

Scores per sample, with dlib's own C++ pipeline (``evaluate.dlib_judge.face``: HOG detector upsampled once, the
5-point shape predictor on the largest face, the 128-d ResNet descriptor), so every sample is re-detected:

- ``face``: dlib finds a face. Per group, ``fdr`` = the share of samples with a face (DLADiff's FDR, Table 1,
  lower = stronger protection) and ``fdfr`` = 1 - fdr (Anti-DreamBooth's face detection failure rate,
  ``evaluations/ism_fdfr.py::matching_score_genimage_id``: higher = stronger protection).
- ``ism``: cosine of the sample's descriptor to the mean descriptor of the identity's clean photos (``--clean``),
  over the samples with a face (ADB ``evaluations/ism_fdfr.py::matching_score_id``, which uses DeepFace ArcFace +
  RetinaFace; here dlib's descriptor, the scorer available offline). Lower = stronger protection.
- ``brisque``: BRISQUE (``metrics.brisque_iqa``; ADB ``evalutions/brisques.py``), lower = better quality.

Keys: the attacker's fine-tuning and sampling keys depend on the attacker seed, the attacker and the prompt,
never on the set, so the clean-trained and protected-trained models of one seed start from the same draws
(a paired comparison). Class images use one fixed key (ADB samples them once into ``data/class-person``).

Outdir (``outdir``): ``settings.json`` (another value refuses the folder unless ``overwrite``), ``run.lock`` while a
run holds it (``runs/lock.py``), ``class_images/<chunk>_<i>.png``, ``inputs/<set>.json`` (the sets' own photos
scored), ``units/<set>/<attacker>_seed<k>.json`` (one per fine-tuning, written atomically once it is finished: a
killed run redoes only the unit it was in), ``samples/<set>/<attacker>_seed<k>/<prompt_idx>_<i>.png``, then the
tables and ``report.html`` (``evaluate.customization_report``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from tdae_jax import prng
from tdae_jax.data import io as dio
from tdae_jax.data.manifest import settings_diff
from tdae_jax.editors import finetune as ft
from tdae_jax.runs import lock
from tdae_jax.runs.errors import RunError, UsageError
from tdae_jax.runs.workdir import Writes, git_revision

log = logging.getLogger("tdae_jax")
ATTACKERS = ("dreambooth", "lora")
INSTALL = 'pip install -e ".[faces]"'
SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CLEAN = "_clean"  # the inputs file of the --clean photos
# fields that do not change any score (left out of settings.json): the grid may grow between runs
RUN_ONLY = ("sets", "clean", "outdir", "attackers", "seeds", "memory_efficient_attention", "sample_batch",
            "retry_failed", "report", "overwrite", *ATTACKERS)
OUTPUTS = ("units", "samples", "inputs", "class_images", "report_assets")
OUTPUT_FILES = ("settings.json", "metrics.csv", "metrics.jsonl", "samples.csv", "inputs.csv", "summary.md",
                "report.html", "flags.flags", "git_revision.txt")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluation. Defaults: DLADiff's victim (§5.1: DreamBooth batch 4, 400 steps, lr 5e-6) with
    Anti-DreamBooth's text encoder and prior (``attack_with_aspl.sh``) and ADB's inference (100 steps, CFG 7.5)."""

    sets: tuple  # ((name, path), ...): a protection workdir (its protected/) or a folder of photos
    clean: str  # the identity's clean photos: the ISM reference
    outdir: str
    weights_dir: str = ""  # "" = the built-in tiny SD model
    attackers: tuple = ATTACKERS
    dreambooth: ft.FinetuneConfig = ft.FinetuneConfig(train_text_encoder=True, prior_weight=1.0)
    lora: ft.FinetuneConfig = ft.FinetuneConfig(method="lora", steps=1000, batch_size=1, lr=1e-4, prior_weight=1.0)
    seeds: tuple = (0,)
    instance_prompt: str = "a photo of sks person"
    class_prompt: str = "a photo of person"
    num_class_images: int = 200
    class_steps: int = 50
    prompts: tuple = ("a photo of sks person", "a dslr portrait of sks person")
    samples_per_prompt: int = 20
    sample_steps: int = 100
    guidance: float = 7.5
    sample_batch: int = 4
    resolution: int = 512
    brisque: bool = True
    surrogate: str = "sd"  # pipeline.load_surrogate reads it: a text-to-image SD model
    dtype: str = "float32"
    memory_efficient_attention: bool = False
    retry_failed: bool = False
    report: bool = True
    overwrite: bool = False

    def finetune_config(self, attacker: str) -> ft.FinetuneConfig:
        return self.dreambooth if attacker == "dreambooth" else self.lora

    def uses_prior(self) -> bool:
        return any(self.finetune_config(a).prior_weight > 0 for a in self.attackers)


def settings(cfg: EvalConfig) -> dict:
    """What determines the scores (settings.json records it; another value on resume is refused). The grid's
    extent (sets, attackers, seeds) is not part of it: each attacker's fine-tuning settings are recorded per
    attacker (:func:`record`)."""
    out = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_ONLY}
    out["weights_dir"] = str(Path(cfg.weights_dir).expanduser().resolve()) if cfg.weights_dir else ""
    return json.loads(json.dumps(out, default=str))


def record(cfg: EvalConfig, plan: "Plan") -> dict:
    """settings.json: the settings, each attacker's fine-tuning, each set's folder and files."""
    attackers = {a: dataclasses.asdict(cfg.finetune_config(a)) for a in cfg.attackers}
    return {"settings": settings(cfg), "attackers": json.loads(json.dumps(attackers)),
            "sets": {s.name: s.record() for s in plan.sets + [plan.clean]}}


# ------------------------------------------------------------------------------------------------ inputs
@dataclasses.dataclass
class ImageSet:
    """One set of photos: ``name``, the folder given (``root``), ``kind`` (workdir | folder), its files and images
    (``work``: ``[N,R,R,3]`` float32 at the resolution, centre-cropped; ``originals``: the photos as they are)."""

    name: str
    root: Path
    kind: str
    paths: list
    work: np.ndarray
    originals: list

    def record(self) -> dict:
        return {"path": str(self.root), "kind": self.kind, "files": [p.name for p in self.paths]}


@dataclasses.dataclass
class Plan:
    sets: list
    clean: ImageSet
    reference: np.ndarray  # [128] mean dlib descriptor of the clean photos with a face
    outdir: Path


def _flag(name: str, spec: str) -> str:
    return f"--clean={spec}" if name == CLEAN else f"--sets: {name}={spec}"


def _listing(name: str, spec: str, outdir: Path) -> tuple[Path, str, list]:
    """``(root, kind, image paths)``: a protection workdir (``protected/`` + ``manifest.json``: its written images,
    refused while a run holds its lock) or a plain folder; ``UsageError`` when missing or empty."""
    root = Path(spec).expanduser()
    if not root.exists():
        raise UsageError(f"{_flag(name, spec)}: no such file or folder")
    if (root / "protected").is_dir() and (root / "manifest.json").is_file():
        lock.check(root / "run.lock", root)
        try:
            return root.resolve(), "workdir", dio.list_images(root / "protected", exclude=outdir)
        except dio.DataError as e:
            raise UsageError(f"{_flag(name, spec)} is a protection workdir without protected images ({e})") from e
    try:
        return root.resolve(), "folder", dio.list_images(spec, exclude=outdir)
    except dio.DataError as e:
        raise UsageError(f"{_flag(name, spec)}: {e}") from e


def load_set(name: str, spec: str, resolution: int, outdir: Path) -> ImageSet:
    """The set's photos, loaded and checked before anything is written (an unreadable photo is a UsageError)."""
    root, kind, paths = _listing(name, spec, outdir)
    work, originals = [], []
    for p in paths:
        try:
            li = dio.load_image(p, size=resolution, resize="center_crop")
        except (dio.DataError, OSError) as e:
            raise UsageError(f"{_flag(name, spec)}: {e}") from e
        work.append(li.array)
        originals.append(li.original_uint8)
    return ImageSet(name, root, kind, paths, np.stack(work), originals)


def _check_config(cfg: EvalConfig) -> None:
    """Flag-level refusals (``UsageError``)."""
    bad = [a for a in cfg.attackers if a not in ATTACKERS]
    if bad or not cfg.attackers:
        raise UsageError(f"--attackers: unknown {bad or 'empty list'} (known: {', '.join(ATTACKERS)})")
    if not cfg.sets:
        raise UsageError("--sets is required: name=PATH,... (PATH: a workdir of experiments.dladiff or a folder of "
                         "photos), e.g. --sets=clean=ids/n000050/set_B,dladiff=runs/n000050")
    names = [n for n, _ in cfg.sets]
    wrong = [n for n in names if not SET_NAME.match(n)]
    if wrong or len(set(names)) != len(names):
        raise UsageError(f"--sets: set names must be unique, start with a letter or digit and hold only letters, "
                         f"digits, '_', '-', '.' (got {', '.join(names)})")
    if not cfg.clean:
        raise UsageError("--clean is required: a folder of the identity's clean photos (the ISM reference)")
    if not cfg.prompts or not cfg.seeds or cfg.samples_per_prompt < 1 or cfg.sample_steps < 1:
        raise UsageError("need at least one --sample_prompts, one --attacker_seeds, --samples_per_prompt >= 1 and "
                         "--sample_steps >= 1")
    if cfg.resolution <= 0 or cfg.resolution % dio.MULTIPLE:
        raise UsageError(f"--resolution must be a positive multiple of {dio.MULTIPLE}, got {cfg.resolution}")
    if cfg.uses_prior() and cfg.num_class_images < 1:
        raise UsageError("a prior weight > 0 needs --num_class_images >= 1")


def _check_scorers(cfg: EvalConfig) -> None:
    """dlib (and BRISQUE when asked for) must load: a ``UsageError`` naming the install command."""
    from tdae_jax.evaluate import dlib_judge
    from tdae_jax.metrics import brisque_iqa, dlib_face

    try:
        dlib_judge.check_available()
    except dlib_face.DlibUnavailable as e:
        raise UsageError(f"FDR and ISM need dlib and its face models ({INSTALL}): {e}") from e
    if cfg.brisque:
        try:
            brisque_iqa.check_available()
        except brisque_iqa.BrisqueUnavailable as e:
            raise UsageError(f"{e}; or pass --brisque=false to score FDR and ISM only") from e


def validate(cfg: EvalConfig) -> Plan:
    """Every usage error before anything is written: flags, scorers, sets, the reference face, the outdir."""
    _check_config(cfg)
    _check_scorers(cfg)
    try:
        outdir = dio.check_workdir(cfg.outdir)
    except dio.DataError as e:
        raise UsageError(str(e).replace("--workdir", "--outdir")) from e
    sets = [load_set(n, p, cfg.resolution, outdir) for n, p in cfg.sets]
    clean = load_set(CLEAN, cfg.clean, cfg.resolution, outdir)
    try:
        dio.check_output_dir(outdir, [s.root for s in sets + [clean]])
    except dio.DataError as e:
        raise UsageError(str(e).replace("workdir", "--outdir", 1)) from e
    faces = [face_of(im) for im in clean.originals]
    found = [f.descriptor for f in faces if f is not None]
    if not found:
        raise UsageError(f"--clean={cfg.clean}: dlib detects no face in any of its {len(faces)} photo(s): ISM has "
                         "no reference")
    return Plan(sets, clean, np.mean(found, axis=0), outdir)


# ------------------------------------------------------------------------------------------------ scoring
def face_of(image_uint8: np.ndarray):
    """dlib's largest face (``dlib_judge.Face``: box, 128-d descriptor) or None."""
    from tdae_jax.evaluate import dlib_judge

    return dlib_judge.face(image_uint8)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def score_image(image_uint8: np.ndarray, reference: np.ndarray, brisque: bool) -> dict:
    """``{"face", "ism", "brisque"}`` of one image: dlib re-detects the face; ISM is its descriptor's cosine to
    ``reference`` (None without a face); BRISQUE None when off or undefined (a flat image)."""
    from tdae_jax.metrics import brisque_iqa

    f = face_of(image_uint8)
    return {"face": f is not None, "ism": None if f is None else cosine(f.descriptor, reference),
            "brisque": brisque_iqa.score(image_uint8) if brisque else None}


def score_inputs(s: ImageSet, reference: np.ndarray, brisque: bool) -> list[dict]:
    """The set's own photos, as they are on disk (full resolution)."""
    return [{"set": s.name, "file": p.name, **score_image(im, reference, brisque)}
            for p, im in zip(s.paths, s.originals)]


# ------------------------------------------------------------------------------------------------ outdir
class Outdir(Writes):
    """The outdir's files: settings check, lock, atomic JSON and PNG writes (``OSError`` -> ``RunError``)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.lock_path = self.root / "run.lock"

    def read_json(self, rel: str):
        p = self.root / rel
        try:
            return json.loads(p.read_text()) if p.is_file() else None
        except (OSError, ValueError) as e:
            raise UsageError(f"{p}: unreadable ({e}); remove it or use --overwrite") from e

    def preflight(self, record: dict, overwrite: bool) -> None:
        """Read-only: refuses a folder in use, or made with other settings or another path behind a set name."""
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"--outdir {self.root} exists and is not a folder")
        lock.check(self.lock_path, self.root)
        old = None if overwrite else self.read_json("settings.json")
        if not old:
            return
        diff = settings_diff(old.get("settings", {}), record["settings"])
        for a, rec in record["attackers"].items():  # an attacker evaluated here before: the same fine-tuning
            if a in old.get("attackers", {}):
                diff += [f"{a}.{d}" for d in settings_diff(old["attackers"][a], rec)]
        for name, rec in record["sets"].items():
            if name in old.get("sets", {}) and old["sets"][name] != rec:
                diff.append(f"set {name}: {old['sets'][name]['path']} ({len(old['sets'][name]['files'])} photos) -> "
                            f"{rec['path']} ({len(rec['files'])} photos)")
        if diff:
            raise UsageError(f"--outdir {self.root} holds an evaluation made with other settings ({'; '.join(diff)});"
                             " re-run with those settings to resume, use another --outdir, or --overwrite")

    @contextlib.contextmanager
    def open(self, record: dict, overwrite: bool):
        """Creates the folder and takes the lock (clearing the previous outputs with ``overwrite``); writes
        settings.json (the union of the sets and attackers ever evaluated here) and git_revision.txt."""
        with self.writing("the outdir"):
            self.root.mkdir(parents=True, exist_ok=True)
            lock.acquire(self.lock_path, self.root)
        try:
            if overwrite:
                self.clear()
            old = self.read_json("settings.json") or {}
            self.write_json("settings.json", {**record, **{k: {**old.get(k, {}), **record[k]}
                                                           for k in ("attackers", "sets")}})
            self.write_bytes("git_revision.txt", (git_revision() + "\n").encode())
            yield self
        finally:
            lock.release(self.lock_path)

    def clear(self) -> None:
        """``overwrite``: the previous evaluation's outputs (only the names this module writes)."""
        log.warning("--overwrite: removing the previous evaluation's outputs in %s", self.root)
        with self.writing("the outdir (--overwrite)"):
            for d in OUTPUTS:
                shutil.rmtree(self.root / d, ignore_errors=True)
            for f in OUTPUT_FILES:
                with contextlib.suppress(FileNotFoundError):
                    (self.root / f).unlink()

    def write_json(self, rel: str, obj) -> Path:
        return self.write_bytes(rel, json.dumps(obj, indent=1, default=_jsonable).encode())

    def save_png(self, rel: str, image_uint8: np.ndarray) -> Path:
        with self.writing(rel):
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            return dio.save_png_atomic(self.root / rel, image_uint8)


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    return str(v)


def unit_id(set_name: str, attacker: str, seed: int) -> str:
    return f"{set_name}/{attacker}_seed{seed}"


def sample_rel(set_name: str, attacker: str, seed: int, prompt_idx: int, i: int) -> str:
    return f"samples/{unit_id(set_name, attacker, seed)}/{prompt_idx}_{i}.png"


# ------------------------------------------------------------------------------------------------ the attacker
def _uint8(images) -> np.ndarray:
    return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def class_images(cfg: EvalConfig, sur, out: Outdir, progress: Callable[[str], None]) -> np.ndarray | None:
    """ADB's class images: ``num_class_images`` samples of the class prompt from the base model (DDIM
    ``class_steps``, CFG ``guidance``, at the resolution), kept in ``class_images/`` (chunk ``c`` of
    ``sample_batch`` images uses ``fold_in(key, c)``, so a stopped run keeps the chunks it wrote). None without
    a prior term."""
    if not cfg.uses_prior():
        return None
    key = jax.random.fold_in(prng.base_key(0), prng.image_uid("class_images"))
    b, out_images = max(cfg.sample_batch, 1), []
    for c, start in enumerate(range(0, cfg.num_class_images, b)):
        n = min(b, cfg.num_class_images - start)
        rels = [f"class_images/{c:04d}_{i}.png" for i in range(n)]
        if not all((out.root / r).is_file() for r in rels):
            progress(f"class images {start + 1}-{start + n} of {cfg.num_class_images} ({cfg.class_prompt!r})")
            imgs = _uint8(ft.sample(sur, cfg.class_prompt, n, jax.random.fold_in(key, c), cfg.class_steps,
                                    guidance_scale=cfg.guidance, size=cfg.resolution, batch_size=b))
            for r, im in zip(rels, imgs):
                out.save_png(r, im)
        out_images += [dio.read_back_uint8(out.root / r) for r in rels]
    return np.stack(out_images).astype(np.float32) / 255.0


def _train(cfg: EvalConfig, sur, s: ImageSet, attacker: str, seed: int, prior, progress) -> tuple:
    """The attacker's fine-tuning on ``s``: ``(fine-tuned surrogate, loss history)``; ``FloatingPointError``
    when the loss became non-finite."""
    fcfg = cfg.finetune_config(attacker)
    key = jax.random.fold_in(prng.base_key(seed), prng.image_uid(f"finetune/{attacker}"))
    every = max(1, fcfg.steps // 5)

    def on_step(step, m):
        if step % every == 0 or step == fcfg.steps:
            progress(f"{unit_id(s.name, attacker, seed)}: {attacker} step {step}/{fcfg.steps}, loss {m['loss']:.4f}")

    res = ft.finetune(sur, s.work, cfg.instance_prompt, fcfg, key, prior_images=prior if fcfg.prior_weight > 0
                      else None, prior_prompt=cfg.class_prompt, log=on_step)
    loss = res.history.get("loss", [])
    bad = next((i for i, v in enumerate(loss) if not math.isfinite(v)), None)
    if bad is not None:
        raise FloatingPointError(f"the fine-tuning loss became non-finite at step {bad + 1} ({loss[bad]})")
    return res.surrogate, loss


def attack_unit(cfg: EvalConfig, sur, plan: Plan, s: ImageSet, attacker: str, seed: int, prior, out: Outdir,
                progress: Callable[[str], None]) -> dict:
    """Fine-tune on ``s``, sample every prompt, write and score the samples: the unit's record."""
    t0 = time.perf_counter()
    tuned, loss = _train(cfg, sur, s, attacker, seed, prior, progress)
    samples = []
    for j, prompt in enumerate(cfg.prompts):
        key = jax.random.fold_in(prng.base_key(seed), prng.image_uid(f"sample/{prompt}"))
        raw = ft.sample(tuned, prompt, cfg.samples_per_prompt, key, cfg.sample_steps, guidance_scale=cfg.guidance,
                        size=cfg.resolution, batch_size=cfg.sample_batch)
        if not np.isfinite(raw).all():
            raise FloatingPointError(f"the fine-tuned model's samples of {prompt!r} are not finite")
        for i, im in enumerate(_uint8(raw)):
            rel = sample_rel(s.name, attacker, seed, j, i)
            out.save_png(rel, im)
            samples.append({"prompt_idx": j, "prompt": prompt, "i": i, "path": rel,
                            **score_image(im, plan.reference, cfg.brisque)})
    return {"set": s.name, "attacker": attacker, "seed": seed, "status": "done", "error": "",
            "final_loss": loss[-1] if loss else None, "steps": len(loss),
            "seconds": round(time.perf_counter() - t0, 3), "samples": samples}


# ------------------------------------------------------------------------------------------------ the run
@dataclasses.dataclass
class Result:
    done: list  # unit ids finished (now or before)
    failed: list  # (unit id, error)
    skipped: list  # unit ids an earlier run finished or failed (not retried)
    units: list  # every unit record
    inputs: list  # the sets' own photos scored


def load_model(cfg: EvalConfig):
    """The base text-to-image model (``UsageError`` when it cannot be loaded)."""
    from tdae_jax.pipeline import load_surrogate

    sur = load_surrogate(cfg)
    if getattr(sur, "family", "sd") != "sd":
        raise UsageError(f"--weights_dir={cfg.weights_dir}: a {sur.family} model, not a text-to-image SD model")
    return sur


def run(cfg: EvalConfig, progress: Callable[[str], None] = log.info, command: str = "",
        flagfile: str = "") -> Result:
    """Every unit (set x attacker x seed) not finished in ``cfg.outdir``, then the tables and the report
    (``command``: the command line the summary names; ``flagfile``: written as ``flags.flags``)."""
    from tdae_jax.evaluate import customization_report as report

    plan = validate(cfg)
    rec = record(cfg, plan)
    out = Outdir(plan.outdir)
    out.preflight(rec, cfg.overwrite)
    units, skipped, todo = _select(cfg, plan, None if cfg.overwrite else out)
    sur = load_model(cfg) if todo else None  # a finished grid loads no model
    with out.open(rec, cfg.overwrite):
        if flagfile:
            out.write_bytes("flags.flags", flagfile.encode())
        inputs = _inputs(cfg, plan, out)
        if skipped:
            progress(f"resuming: {len(skipped)} of {len(units) + len(todo)} units already done or failed (not "
                     "retried)")
        prior = class_images(cfg, sur, out, progress) if todo else None
        for k, (s, attacker, seed) in enumerate(todo):
            progress(f"unit {k + 1}/{len(todo)}: {unit_id(s.name, attacker, seed)} ({len(s.paths)} photos)")
            units.append(_run_unit(cfg, sur, plan, s, attacker, seed, prior, out, progress))
        units.sort(key=lambda u: _order(cfg, u))
        report.write_all(out, cfg, plan, units, inputs, command)
    failed = [(unit_id(u["set"], u["attacker"], u["seed"]), u["error"]) for u in units if u["status"] == "failed"]
    done = [unit_id(u["set"], u["attacker"], u["seed"]) for u in units if u["status"] == "done"]
    return Result(done, failed, skipped, units, inputs)


def _order(cfg: EvalConfig, u: dict) -> tuple:
    names = [n for n, _ in cfg.sets]
    return names.index(u["set"]), cfg.attackers.index(u["attacker"]), cfg.seeds.index(u["seed"])


def _inputs(cfg: EvalConfig, plan: Plan, out: Outdir) -> list[dict]:
    """The sets' own photos and the clean photos scored, cached in ``inputs/<set>.json``."""
    rows = []
    for s in plan.sets + [plan.clean]:
        rel = f"inputs/{s.name}.json"
        cached = out.read_json(rel)
        if cached is None or [r["file"] for r in cached] != [p.name for p in s.paths]:
            cached = score_inputs(s, plan.reference, cfg.brisque)
            out.write_json(rel, cached)
        rows += cached
    return rows


def _select(cfg: EvalConfig, plan: Plan, out: Outdir | None) -> tuple[list, list, list]:
    """``(finished unit records of this grid, their ids, units to run)`` (read-only; ``out`` None: every unit
    runs); failed units are retried only with ``retry_failed``."""
    units, skipped, todo = [], [], []
    for s in plan.sets:
        for attacker in cfg.attackers:
            for seed in cfg.seeds:
                rec = out.read_json(f"units/{unit_id(s.name, attacker, seed)}.json") if out is not None else None
                if rec is not None and (rec["status"] == "done" or not cfg.retry_failed):
                    units.append(rec)
                    skipped.append(unit_id(s.name, attacker, seed))
                else:
                    todo.append((s, attacker, seed))
    return units, skipped, todo


def _run_unit(cfg, sur, plan, s, attacker, seed, prior, out, progress) -> dict:
    """One unit, recorded atomically: a failure (e.g. a diverged fine-tuning) is a ``failed`` record naming the
    error, and the other units go on; a workdir that became unwritable stops the run (``RunError``)."""
    uid = unit_id(s.name, attacker, seed)
    try:
        rec = attack_unit(cfg, sur, plan, s, attacker, seed, prior, out, progress)
    except RunError:
        raise
    except Exception as e:  # noqa: BLE001 - a failed unit is a record, the run goes on
        log.exception("%s failed", uid)
        rec = {"set": s.name, "attacker": attacker, "seed": seed, "status": "failed",
               "error": f"{type(e).__name__}: {e}", "samples": []}
    out.write_json(f"units/{uid}.json", rec)
    return rec
