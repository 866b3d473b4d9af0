"""Protect a folder of images: the library side of ``python -m experiments.tdae``.

Data flow (docs/design.md): validate the flags -> list inputs and prompts (read-only checks) -> workdir preflight
(lock, recorded settings) -> surrogate -> workdir opened (lock held, manifest) -> objective -> defense step
(compiled once, sharded) -> budget-exact PNGs -> metrics.jsonl/csv -> report.html. :func:`run` is that sequence of
calls, in the manner of Flax's ``train_and_evaluate`` (google/flax ``examples/imagenet/train.py``); the workdir
pieces are ``tdae_jax/runs/``.

Failure policy: an input that cannot be read or optimised (or whose result is non-finite) is marked ``failed``
with a message naming the file and the problem; the others are still processed; the caller turns
``RunResult.failed`` into exit code 1. A problem with the run itself (flags, weights, no inputs, workdir inside an
input folder, a workdir locked by another run or made with other settings) raises ``UsageError`` before anything
is created in the workdir (exit code 2). A workdir that becomes unwritable (disk full) raises ``RunError``
(exit code 1; re-running resumes). Originals are only read.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from tdae_jax import checkpoint, configs, models, objectives, prng, runtime
from tdae_jax import eot as eot_lib
from tdae_jax.data import io as dio
from tdae_jax.data.manifest import find_prompt
from tdae_jax.defenses import tdae as tdae_defense
from tdae_jax.parallel import mesh as meshlib
from tdae_jax.parallel import multihost
from tdae_jax.protect import Protector
from tdae_jax.runs import batches as run_batches
from tdae_jax.runs import finish as run_finish
from tdae_jax.runs import inputs as run_inputs
from tdae_jax.runs import report as run_report
from tdae_jax.runs.errors import RunError, UsageError  # noqa: F401 - part of this module's API
from tdae_jax.runs.workdir import Workdir

log = logging.getLogger("tdae_jax")
REEXPORTED = (RunError,)  # pipeline.RunError (experiments/)

DEFENSES = ("none", "fdm", "dpd", "tdae", "tpa")
DTYPES = ("float32", "bfloat16")  # surrogate compute dtypes (--dtype)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    images: str
    workdir: str
    prompts: str = ""
    weights_dir: str = ""
    surrogate: str = "ip2p"
    defense: str = "none"
    objective: configs.Objective = configs.Objective()
    budget: configs.Budget = configs.Budget()
    pgd: configs.PGD = configs.PGD()
    fdm: configs.FDM = configs.FDM()
    tpa: configs.TPA = configs.TPA()
    dpd: configs.DPD = configs.DPD()
    batch_size: int = 1
    seed: int = 0
    size: int | None = 256
    resize: str = "resize"  # the whole frame (data/io.py RESIZE_MODES); center_crop leaves the borders unprotected
    num_devices: int | None = None
    model_parallel: int = 1  # size of the "model" mesh axis; > 1 splits the surrogate's params (sd3)
    memory_efficient_attention: bool = False  # chunked UNet attention (Surrogate.memory_efficient)
    dtype: str = "float32"  # compute dtype; bfloat16 = mixed precision (Surrogate.mixed_precision)
    ckpt_every: int = 0
    default_prompt: str = "make it a watercolor painting"
    retry_failed: bool = False
    report: bool = True
    log_every: int = 10
    eot: str = ""  # EOT transforms averaged in the objective, e.g. "jpeg75,resize0.5" (tdae_jax/eot.py)
    eot_samples: int = 1
    preview_edit: bool = False  # report: edit(original) | edit(protected) with the surrogate's own editor
    preview_steps: int = 20
    preview_guidance: float = 7.5
    preview_image_guidance: float = 1.5
    overwrite: bool = False  # start the workdir afresh (its previous outputs removed once the lock is held)
    output_format: str = "png"  # "png" | "webp" (lossless): data/io.py OUTPUT_FORMATS
    keep_metadata: bool = False  # copy the input's EXIF (orientation 1) into the output; the ICC profile always is
    memory_limit_gib: float = 0.0  # refuse a step that needs more (XLA's estimate); 0 = the device's own memory

    def defense_configs(self):
        """(fdm, tpa, dpd) as selected by ``defense`` (the flags' fdm_mode etc. fill in the details)."""
        d = self.defense
        if d not in DEFENSES:
            raise UsageError(f"--defense must be one of {', '.join(DEFENSES)}, got {d!r}")
        fdm = self.fdm if d in ("fdm", "tdae") else dataclasses.replace(self.fdm, mode="off")
        if d in ("fdm", "tdae") and fdm.mode == "off":
            fdm = dataclasses.replace(fdm, mode="finite_difference")
        tpa = dataclasses.replace(self.tpa, enabled=(d == "tpa"))
        dpd = dataclasses.replace(self.dpd, enabled=(d in ("dpd", "tdae")))
        return fdm, tpa, dpd


def validate(cfg: RunConfig) -> None:
    """Every usage error of the flags themselves, before anything is read or written (pure).

    Refused (exit 2): an unknown defense or host; SA on SD3; a bad ``--sa_*`` value or one set for another host;
    DPD (``--defense=dpd|tdae``) with a host that ignores the text condition (the PhotoGuard encoder attacks:
    DPD's text gradient is 0, so PGE + TDAE would silently be PGE + FDM); a non-default ``--target`` for a host
    that has no image target, or an unknown one; FDM's finite difference on a bfloat16 surrogate (the probe is
    below bf16 resolution: defenses/fdm.py, "Precision"). Before those, the values themselves: a NaN or infinite
    float flag; ``--steps``/``--batch_size`` below 1; ``--eps`` outside (0, 1]; ``--step_size`` <= 0; ``--size``
    not a positive multiple of 8 and of the surrogate's own multiple (``weights.size_multiple``: VAE x UNet
    downsampling, from the configs in ``--weights_dir``); a ``--workdir`` that is (or lies under) a file or an
    unwritable folder (``data/io.py check_workdir``: stats only). Pure: reads two config files at most, writes nothing.
    """
    _check_values(cfg)
    try:
        dio.check_workdir(cfg.workdir)
    except dio.DataError as e:
        raise UsageError(str(e)) from e
    _check_host(cfg)


def _check_values(cfg: RunConfig) -> None:
    """The flag values themselves: finite floats, ranges, the working size's multiple (:func:`validate`)."""
    from tdae_jax.models import weights

    floats = {f"--{k}" if part in ("", "objective", "budget", "pgd") else f"--{part}_{k}": v
              for part in ("", "objective", "budget", "pgd", "fdm", "tpa", "dpd")
              for k, v in vars(getattr(cfg, part) if part else cfg).items() if isinstance(v, float)}
    bad = [f"{k}={v}" for k, v in floats.items() if not np.isfinite(v)]
    if bad:
        raise UsageError(f"{', '.join(bad)}: must be a finite number")
    need = [("--steps", cfg.pgd.steps, cfg.pgd.steps >= 1, "an integer >= 1"),
            ("--batch_size", cfg.batch_size, cfg.batch_size >= 1, "an integer >= 1"),
            ("--eps", cfg.budget.eps, 0 < cfg.budget.eps <= 1, "in (0, 1], a fraction of the [0, 1] range"),
            ("--step_size", cfg.pgd.step_size, cfg.pgd.step_size > 0, "> 0, in [0, 1] pixel units"),
            ("--output_format", cfg.output_format, cfg.output_format in dio.OUTPUT_FORMATS,
             f"one of {', '.join(dio.OUTPUT_FORMATS)}")]
    bad = [f"{flag}={v} must be {what}" for flag, v, ok, what in need if not ok]
    if bad:
        raise UsageError("; ".join(bad))
    if cfg.resize != "none":
        own = weights.size_multiple(cfg.weights_dir, cfg.surrogate) if cfg.weights_dir else None
        mult = int(np.lcm(dio.MULTIPLE, own or 1))
        if not isinstance(cfg.size, int) or cfg.size <= 0 or cfg.size % mult:
            raise UsageError(f"--size={cfg.size} must be a positive multiple of {mult} (the {cfg.surrogate} "
                             "surrogate's VAE and denoiser downsampling)")


def _check_host(cfg: RunConfig) -> None:
    """The host, its target and the defense parts it can run (:func:`validate`)."""
    fdm, _, dpd = cfg.defense_configs()
    name, target = cfg.objective.name, cfg.objective.target
    if name not in objectives.NAMES:
        raise UsageError(f"--objective must be one of {', '.join(objectives.NAMES)}, got {name!r}")
    if cfg.surrogate == "sd3" and name == "sa":
        raise UsageError("objective 'sa' is not applicable to an SD3 surrogate: SD3 (MMDiT) has one joint "
                         "image+text attention and no UNet cross-attention maps (TDAE runs SA on SD3 only as a "
                         "transfer target)")
    try:  # a bad --sa_* value, or an --sa_* flag set for another host
        objectives.semantic_attention.check_config(cfg.objective)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if dpd.enabled and not objectives.uses_text(name):
        raise UsageError(f"--defense={cfg.defense}: objective {name!r} does not use the text condition, so DPD has "
                         f"no text to act on (it would be a no-op); use --defense=fdm"
                         + (" (FDM alone: PGE + TDAE is not runnable)" if cfg.defense == "tdae" else ""))
    with_target = [n for n in objectives.NAMES if objectives.accepts_target(n)]
    if objectives.accepts_target(name) and target not in objectives.TARGETS:
        raise UsageError(f"--target must be one of {', '.join(objectives.TARGETS)}, got {target!r}")
    if not objectives.accepts_target(name) and target != configs.Objective().target:
        raise UsageError(f"--target={target}: objective {name!r} has no image target and would ignore it "
                         f"(--target is read by {', '.join(with_target)} only)")
    if name != "mist" and cfg.objective.mist_separate_draws != configs.Objective().mist_separate_draws:
        raise UsageError(f"--mist_separate_draws is read by objective 'mist' only; objective {name!r} would ignore it")
    if cfg.dtype != "float32" and fdm.mode == "finite_difference":
        side = cfg.size or 512
        raise UsageError(f"--dtype={cfg.dtype} with FDM's finite difference (--defense={cfg.defense}): the probe "
                         f"h*s, about {fdm.h / np.sqrt(3 * side * side):.1g} per pixel at {side} px, is below "
                         f"{cfg.dtype} resolution in the surrogate, so g2 - g1 is rounding noise; use "
                         f"--fdm_mode=exact or --dtype=float32")


def effective(cfg: RunConfig) -> RunConfig:
    """``cfg`` as it runs: FDM / TPA / DPD as ``--defense`` selects them, the random start of the hosts with a
    zero gradient at delta = 0, and ``objective.target = None`` for hosts that read no target."""
    fdm, tpa, dpd = cfg.defense_configs()
    pgd = cfg.pgd
    if objectives.needs_random_start(cfg.objective.name) and pgd.random_start == 0:
        pgd = dataclasses.replace(pgd, random_start=0.25)
    obj = cfg.objective
    if not objectives.accepts_target(obj.name):
        obj = dataclasses.replace(obj, target=None)
    return dataclasses.replace(cfg, fdm=fdm, tpa=tpa, dpd=dpd, pgd=pgd, objective=obj)


# RunConfig fields that do not change the protected images, left out of the settings a workdir records:
# where inputs and outputs live (the inputs are tracked per manifest entry: source path, its sha256, the prompt
# used), how the work is laid out (results do not depend on batch layout or device count, docs/design.md
# conventions 3-5; chunked attention is the same function), and what is logged or reported.
RUN_ONLY = ("images", "prompts", "workdir", "batch_size", "num_devices", "model_parallel",
            "memory_efficient_attention", "ckpt_every", "retry_failed", "report", "log_every", "preview_edit",
            "preview_steps", "preview_guidance", "preview_image_guidance", "overwrite", "memory_limit_gib")


def settings(ran: RunConfig) -> dict:
    """The settings that determine the protected images (``ran`` = :func:`effective` of the flags, minus
    :data:`RUN_ONLY`), as the manifest records them: re-running a workdir with others is a ``UsageError``."""
    out = {k: v for k, v in dataclasses.asdict(ran).items() if k not in RUN_ONLY}
    for k, default in (("output_format", "png"), ("keep_metadata", False)):  # recorded when not the default:
        if out[k] == default:  # workdirs made before these settings existed still resume
            out.pop(k)
    out["weights_dir"] = str(Path(ran.weights_dir).expanduser().resolve()) if ran.weights_dir else ""
    return out


@dataclasses.dataclass
class RunResult:
    done: list[str]
    failed: list[str]
    skipped: list[str]
    rows: list[dict]


@functools.lru_cache(maxsize=4)
def _tiny(family: str):
    """The built-in tiny surrogate (one object per family: runs in one process share compiled steps)."""
    log.warning("no --weights_dir: using the built-in tiny random %s surrogate (plumbing only: its "
                "protection is not meaningful)", family)
    return models.tiny(family, seed=0)


@functools.lru_cache(maxsize=8)
def _tiny_variant(family: str, memory_efficient: bool, dtype: str):
    return _variant(_tiny(family), memory_efficient, dtype)


def _variant(sur, memory_efficient: bool, dtype: str):
    """``--memory_efficient_attention`` and ``--dtype`` applied to a loaded surrogate."""
    sur = sur.memory_efficient() if memory_efficient else sur
    return sur.mixed_precision(dtype) if dtype != "float32" else sur  # SD3 has no mixed_precision (refused above)


def load_surrogate(cfg: RunConfig):
    chunked = cfg.memory_efficient_attention  # RunConfig and DLADiffRunConfig both carry both
    if chunked and cfg.surrogate == "sd3":
        raise UsageError("--memory_efficient_attention: implemented for the UNet surrogates (sd, ip2p, inpaint); "
                         "shard SD3 with --model_parallel instead")
    if cfg.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {DTYPES}, got {cfg.dtype!r}")
    if cfg.dtype != "float32" and cfg.surrogate == "sd3":
        raise UsageError("--dtype=bfloat16: implemented for the UNet surrogates (sd, ip2p, inpaint)")
    try:
        if not cfg.weights_dir:
            return _tiny_variant(cfg.surrogate, chunked, cfg.dtype)
        sur = models.load(cfg.surrogate, cfg.weights_dir)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load surrogate {cfg.surrogate!r} from {cfg.weights_dir or '<built-in>'}: {e}") from e
    return _variant(sur, chunked, cfg.dtype)


def run(cfg: RunConfig, progress: Callable[[str], None] = log.info) -> RunResult:
    """Protects ``cfg.images`` into ``cfg.workdir`` (module docstring); resumes what the workdir already holds.

    Every ``UsageError`` is raised before anything is created in the workdir; ``RunError`` when it becomes
    unwritable. The settings that determine the outputs (:func:`settings`) are recorded in the manifest.
    """
    validate(cfg)  # flag errors first: nothing is read or written before them
    ran = effective(cfg)  # what runs (config.json, report.html, the recorded settings)
    plan = _plan(cfg)
    wd = Workdir(cfg.workdir, plan.proc)
    wd.preflight(settings(ran), overwrite=cfg.overwrite)
    sur = _surrogate(cfg, plan.mesh)
    protector, embed = _engine(cfg, ran, sur, plan)
    _check_memory(cfg, sur, embed, protector, progress)
    with wd.open(settings(ran), overwrite=cfg.overwrite) as manifest:
        with wd.writing("manifest.json"):
            sel = run_inputs.select(manifest, plan.paths, plan.prompt_problems, plan.proc,
                                    retry_failed=cfg.retry_failed, failures=plan.failures)
            loaded = run_inputs.load(sel, manifest, size=cfg.size, resize=cfg.resize)
        _announce(cfg, loaded)
        if sel.skipped:
            progress(f"resuming: {len(sel.skipped)} of {sel.total} inputs already done or failed (not retried)")
        protect = _protect_fn(cfg, ran, sur, plan, wd, loaded, protector, embed)
        work = run_inputs.batches(loaded, protector.local_batch_size, plan.proc)
        finish = functools.partial(_finish, wd, manifest, loaded, cfg)
        curves = run_batches.run(wd, manifest, work, protect, finish,
                                 run_batches.Clock(len(work), cfg.pgd.steps, progress))
        entries = run_report.merged_entries(manifest, sel.owned, plan.proc)
        rows = [run_report.row(e) for e in entries]
        if plan.proc.is_main:
            _write_outputs(cfg, ran, wd, entries, rows, curves, sur)
        multihost.barrier("tdae_jax/pipeline/done", plan.proc)
    return RunResult(done=[e["id"] for e in entries if e["status"] == "done"],
                     failed=[e["id"] for e in entries if e["status"] == "failed"], skipped=sel.skipped, rows=rows)


@dataclasses.dataclass
class Plan:
    """What a run reads, checked before anything is written: inputs, prompts, EOT, mesh, this process."""

    paths: list
    prompts: dict
    prompt_problems: list
    failures: list  # (id, message, source): rejected entries and unusable prompt rows, recorded as failed rows
    eot: tuple
    mesh: jax.sharding.Mesh
    proc: multihost.ProcessInfo


def _plan(cfg: RunConfig) -> Plan:
    """Lists the inputs and reads the prompts; every problem is a ``UsageError`` (nothing written)."""
    workdir = Path(cfg.workdir).expanduser().resolve()
    try:
        folder = Path(cfg.images).expanduser()
        if folder.is_dir():  # a workdir in (or equal to) the input folder, refused before its outputs are excluded
            dio.check_output_dir(workdir, [folder])
        listing = dio.list_inputs(cfg.images, exclude=workdir)
        paths = listing.paths
        dio.check_output_dir(workdir, sorted({p.parent for p in paths}))
        prompts, problems = dio.load_prompts(cfg.prompts, image_paths=paths) if cfg.prompts else ({}, [])
    except (dio.DataError, OSError) as e:
        raise UsageError(str(e)) from e
    if listing.warning():
        log.warning("%s", listing.warning())
    # entries that must not be inputs (a link to one of the run's outputs) become failed rows of their own, named
    # in the manifest, metrics and report (runs/inputs.py select); prompt rows naming an image that is not an input
    # of this run (a prompts file that covers more images than this run, or a row naming ../../etc/passwd) are
    # ignored, and said so in one warning line
    failures = [(f"{run_inputs.INPUT_ROW}{q.name}", f"{q}: {why}", q) for q, why in listing.rejected]
    unlisted = dio.unlisted_prompt_images(prompts, paths)
    for key in unlisted:
        prompts.pop(key)
    if unlisted:
        shown = "; ".join(list(unlisted.values())[:3]) + (" ..." if len(unlisted) > 3 else "")
        log.warning("%s: %d prompt row(s) name an image that is not an input of this run, ignored: %s",
                    cfg.prompts, len(unlisted), shown)
    try:
        eot_transforms = eot_lib.parse_transforms(cfg.eot)
        if cfg.eot_samples < 1:
            raise ValueError(f"--eot_samples must be >= 1, got {cfg.eot_samples}")
    except ValueError as e:
        raise UsageError(f"--eot: {e}") from e
    try:
        mesh = meshlib.make_mesh(cfg.num_devices, model_parallel=cfg.model_parallel)
    except ValueError as e:
        raise UsageError(f"--model_parallel: {e}") from e
    if cfg.model_parallel > 1 and cfg.surrogate != "sd3":
        raise UsageError(f"--model_parallel={cfg.model_parallel}: parameter sharding is implemented for the sd3 "
                         f"surrogate (SD3.5-large); {cfg.surrogate} fits one device, use data parallelism")
    proc = multihost.info()
    if proc.count > 1 and cfg.resize == "none":
        raise UsageError("multi-process runs need one working size for every image: use --resize other than none")
    return Plan(paths, prompts, problems, failures, eot_transforms, mesh, proc)


def _surrogate(cfg: RunConfig, mesh):
    sur = load_surrogate(cfg)
    if cfg.model_parallel > 1:
        sur = sur.shard(mesh)  # transformer split over "model", the rest replicated (models/sd3.py)
    return sur


def _engine(cfg: RunConfig, ran: RunConfig, sur, plan: Plan) -> tuple[Protector, Callable | None]:
    """The objective (with EOT) and the defense's step, built from the surrogate inside the trace and bound to the
    mesh by a :class:`Protector` (the surrogate is an argument of the compiled step, compiled at its first batch),
    and the text encoder of text hosts; a setting they refuse is a ``UsageError`` (nothing written)."""
    def build(model):
        loss_fn = objectives.make_objective(cfg.objective.name, model, cfg.objective)
        loss_fn = eot_lib.wrap_objective(loss_fn, plan.eot, cfg.eot_samples)  # identity when --eot is empty
        return tdae_defense.make_step(loss_fn, budget=cfg.budget, pgd=ran.pgd, fdm=ran.fdm, tpa=ran.tpa, dpd=ran.dpd)

    try:
        build(sur)  # the refusals of the objective and the defense, here (closures only: nothing is traced)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if ran.pgd.random_start != cfg.pgd.random_start:
        log.info("objective %s has a zero gradient at delta=0: random start U(-eps/4, eps/4)", cfg.objective.name)
    embed = jax.jit(sur.embed_ids) if objectives.uses_text(cfg.objective.name) else None
    return Protector(build, sur, plan.mesh, cfg.batch_size), embed


def _check_memory(cfg: RunConfig, sur, embed, protector: Protector, progress: Callable[[str], None]) -> None:
    """Compiles the step for the run's working shape before the workdir exists, and refuses (``UsageError``) one
    whose compiled memory (XLA's analysis, per device: arguments + outputs + temporaries) exceeds the device's
    memory or ``--memory_limit_gib``, naming what would fit. With ``--resize=none`` the shape is each image's
    own: the step compiles at the first batch instead and nothing is estimated."""
    if cfg.resize == "none":
        return
    t0 = time.perf_counter()
    progress(f"compiling the protection step ({protector.batch_size} x {cfg.size}x{cfg.size} px; "
             "a minute or more for a real model on CPU)")
    batch, _ = _batch(cfg, sur, embed, {}, [], {})
    ma = protector.memory_analysis(batch, prng.base_key(cfg.seed))
    need = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes
    limit, what = ((int(cfg.memory_limit_gib * 2**30), "--memory_limit_gib") if cfg.memory_limit_gib > 0
                   else runtime.device_memory_bytes())
    progress(f"compiled in {runtime.format_duration(time.perf_counter() - t0)}: the step needs about "
             f"{need / 2**30:.2f} GiB per device" + (f" ({what}: {limit / 2**30:.1f} GiB)" if limit else ""))
    if limit and need > limit:
        raise UsageError(
            f"the protection step needs about {need / 2**30:.2f} GiB per device at --size={cfg.size} "
            f"--batch_size={cfg.batch_size} (XLA's compiled memory analysis) but {what} is {limit / 2**30:.2f} GiB: "
            "use a smaller --size or --batch_size, --memory_efficient_attention, --dtype=bfloat16 (GPU/TPU), "
            "or more devices")


def _protect_fn(cfg: RunConfig, ran: RunConfig, sur, plan: Plan, wd: Workdir, loaded: dict, protector: Protector,
                embed: Callable | None) -> Callable:
    """``protect(batch_index, ids, on_iter) -> BatchResult`` for TDAE and its hosts (runs/batches.py): the batch
    with its texts, :meth:`Protector.run`, per-batch orbax checkpoints under ``ckpt/<unit>`` (``ckpt_every`` > 0)."""
    base = prng.base_key(cfg.seed)
    # a checkpoint resumes only under the same settings and the same state layout (padded batch, mesh)
    layout = {"settings": settings(ran), "batch": protector.batch_size, "mesh": dict(plan.mesh.shape)}

    def protect(bi: int, ids: list[str], on_iter) -> run_batches.BatchResult:
        batch, texts = _batch(cfg, sur, embed, loaded, ids, plan.prompts)
        unit_ids = ids if plan.proc.count == 1 else sum(multihost.allgather_json(ids, plan.proc), [])
        ckpt = (checkpoint.UnitCheckpointer(wd.ckpt / checkpoint.fingerprint(unit_ids), cfg.ckpt_every)
                if cfg.ckpt_every else None)
        meta = {"fingerprint": checkpoint.fingerprint({**layout, "ids": unit_ids}), "ids": unit_ids}
        ok = False
        try:
            delta, hist, resumed = protector.run(batch, len(ids), cfg.pgd.steps, base, ckpt=ckpt, meta=meta,
                                                 on_iter=on_iter, log_every=cfg.log_every)
            ok = True
        finally:
            if ckpt is not None:
                ckpt.close(remove=ok)  # kept for a resumed run when the batch did not finish
        return run_batches.BatchResult(delta, hist, [{"prompt": t} for t in texts[:len(ids)]], resumed)

    return protect


def _batch(cfg: RunConfig, sur, embed, loaded: dict, ids: list[str], prompts: dict) -> tuple[dict, list[str]]:
    """The step's batch for ``ids`` (a dummy row, never written, when this process has none left) and the texts."""
    if ids:
        x0 = np.stack([loaded[i].array for i in ids])
        texts = [models.edit_text(find_prompt(prompts, i, loaded[i].path), sur.family, cfg.default_prompt)
                 for i in ids]
    else:
        x0, texts = np.zeros((1, cfg.size, cfg.size, 3), np.float32), [""]
    batch = {"x0": x0, "uid": prng.uids(ids or ["<pad>"])}
    if embed is None:
        return batch, texts
    text, missing = objectives.semantic_attention.text_entries(sur, texts, cfg.objective.sa_tokens, embed)
    batch.update(text)  # emb (DPD's variable), the CFG negative, SA's token mask, the family's extras
    for j in [j for j in missing if j < len(ids)]:  # SA: no --sa_tokens word in it: all its tokens
        log.warning("%s: none of --sa_tokens %s in the prompt %r: SA targets all its tokens",
                    ids[j], list(cfg.objective.sa_tokens), texts[j])
    return batch, texts


def _finish(wd: Workdir, manifest, loaded: dict, cfg: RunConfig, image_id: str, delta, hist: dict, secs: float,
            outputs: dict | None):
    return run_finish.finish_image(wd, manifest, loaded[image_id], delta, hist, secs, cfg.budget.eps, outputs,
                                   output_format=cfg.output_format, keep_metadata=cfg.keep_metadata)


def _write_outputs(cfg: RunConfig, ran: RunConfig, wd: Workdir, entries: list, rows: list, curves: dict, sur):
    """metrics.jsonl/csv, config.json (what ran) and report.html (with the preview edits, one editor per run)."""
    run_report.write_run_files(wd, rows, ran)
    if not cfg.report:
        return
    preview, summary = None, describe(ran)
    if cfg.preview_edit and any(e["status"] == "done" for e in entries):
        preview = run_report.preview_editor(sur, ran)
        summary["preview editor"] = run_report.preview_name(sur, ran)
    sizes = [dio.image_size(e["source"]) for e in entries if e["status"] == "done"]
    run_report.write_report(wd, "tdae_jax protection report", entries, ran.budget.eps, summary, curves,
                            preview, banner=demo_notice(cfg, [hw for hw in sizes if hw]))


RESIZE_WORDS = {  # the report's "resize" setting (data/io.py load_image)
    "resize": "the whole frame resized to {s}x{s}; the perturbation is mapped back over every pixel",
    "pad": "the whole frame, longer side to {s} px, edge-padded to {s}x{s}; every pixel is protected",
    "center_crop": "only the centred square, resized to {s}x{s}: the rest of a non-square photo is left "
                   "unprotected (--resize=resize covers every pixel)",
    "none": "the photo's own resolution (edge-padded to multiples of 8 while optimizing); every pixel is protected"}


def _announce(cfg: RunConfig, loaded: dict) -> None:
    """Warnings about the run as a whole, before the optimisation: pixels left unprotected by ``--resize``,
    a demonstration surrogate on photos larger than it works at, EXIF metadata that will not be copied."""
    part = {i: dio.unprotected_fraction(li.transform) for i, li in loaded.items()}
    hit = {i: f for i, f in part.items() if f > 0}
    if hit:
        worst = max(hit, key=hit.get)
        log.warning("--resize=%s leaves part of %d of %d inputs unprotected (up to %.0f%%, %s: written unchanged, "
                    "so an editor can be applied to a crop of it); --resize=resize protects every pixel",
                    cfg.resize, len(hit), len(part), 100 * hit[worst], loaded[worst].path.name)
    notice = demo_notice(cfg, [li.original_size for li in loaded.values()])
    if notice:
        log.warning("*** %s ***", notice)
    exif = [li.path.name for li in loaded.values() if li.exif]
    if exif and not cfg.keep_metadata:
        log.warning("%d input(s) carry EXIF metadata (camera, date, location, ...; e.g. %s): it is not copied to "
                    "the protected %s files; --keep_metadata copies it (orientation set to 1)", len(exif), exif[0],
                    cfg.output_format.upper())


def demo_model(weights_dir: str) -> tuple[str, int | None] | None:
    """``(description, trained side in px or None)`` when ``weights_dir`` names a demonstration surrogate: the
    built-in tiny random model (``""``) or a shipped miniature model (tdae_jax/miniature/shipped.py); else None."""
    from tdae_jax.miniature import shipped

    if not weights_dir:
        return "the built-in tiny random model (untrained: it only checks the plumbing)", None
    wd = Path(weights_dir).expanduser().resolve()
    if wd.parent != shipped.ROOT.resolve() or wd.name not in shipped.names():
        return None
    side = int(shipped.info(wd.name).get("Data", {}).get("size", 32))
    return f"the shipped miniature model {wd.name} (trained at {side} px on a procedural toy world)", side


def demo_notice(cfg: RunConfig, sizes: list) -> str | None:
    """The report's banner and the run's warning when a demonstration surrogate (:func:`demo_model`) is used on
    photos larger than it works at (``sizes``: the originals' ``(H, W)``); None otherwise."""
    model = demo_model(cfg.weights_dir)
    if model is None or not sizes:
        return None
    name, trained = model
    limit = min(cfg.size or np.inf, trained or np.inf)
    h, w = max(sizes, key=max)
    if max(h, w) <= limit:
        return None
    at = (f"at {cfg.size} px and upsampled to the photos' resolution (up to {w}x{h})" if cfg.size else
          f"at the photos' resolution (up to {w}x{h}), far above what the model works at")
    return (f"Demonstration only: the surrogate is {name}; the perturbation was optimized {at}. This run "
            "demonstrates the method; it does NOT protect these photos against real editors. To protect them, "
            "point --weights_dir=<local diffusers folder> at real weights of the editor you defend against "
            "(e.g. a local copy of InstructPix2Pix or Stable Diffusion) and use --size=512.")


def describe(ran: RunConfig) -> dict:
    """The report's summary of what ran (``ran`` = :func:`effective` of the flags): host, target, defense and
    the state of each of its parts (FDM mode, DPD on/off, TPA on/off), precision, budget, EOT, steps."""
    fdm, tpa, dpd, pgd = ran.fdm, ran.tpa, ran.dpd, ran.pgd
    return {"surrogate": f"{ran.surrogate} ({ran.weights_dir or 'built-in'}, {ran.dtype})",
            "objective": ran.objective.name + (f" (target {ran.objective.target})" if ran.objective.target else ""),
            "defense": ran.defense,
            "fdm": fdm.mode if fdm.mode == "off" else f"{fdm.mode} (beta={fdm.beta:g}, h={fdm.h:g})",
            "dpd": f"on (S={dpd.period}, M={dpd.steps}, eps_p={dpd.eps:.4g})" if dpd.enabled else "off",
            "tpa": f"on (N={tpa.n}, k={tpa.k:g})" if tpa.enabled else "off",
            "eps": f"{ran.budget.eps:.4f} ({ran.budget.eps * 255:.2f}/255)",
            "eot": eot_lib.describe(eot_lib.parse_transforms(ran.eot), ran.eot_samples),
            "steps": pgd.steps, "random start": f"U(-{pgd.random_start:g} eps, {pgd.random_start:g} eps)"
            if pgd.random_start else "none",
            "resize": f"{ran.resize}: " + RESIZE_WORDS[ran.resize].format(s=ran.size),
            "instruction": f"per image below (images without a prompts row: {ran.default_prompt!r})",
            "output": f"{ran.output_format} (lossless, original resolution); metadata: ICC profile copied, EXIF "
                      + ("copied (orientation set to 1)" if ran.keep_metadata else "not copied (--keep_metadata)")}
