"""Protect a folder of images: the library side of ``python -m experiments.tdae``.

Data flow (docs/design.md): list + validate inputs -> manifest (resumable) -> surrogate -> objective ->
defense step (compiled once, sharded) -> budget-exact PNGs -> metrics.jsonl/csv -> report.html.

Failure policy: an input that cannot be read or optimised is marked ``failed`` with a message naming
the file and the problem; the others are still processed; the caller turns ``RunResult.failed`` into
exit code 1. A problem with the run itself (flags, weights, no inputs, workdir inside an input
folder) raises ``UsageError`` before anything is written (exit code 2). Originals are only read.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from tdae_jax import checkpoint, configs, objectives, prng
from tdae_jax import eot as eot_lib
from tdae_jax.data import io as dio
from tdae_jax.data.manifest import Manifest, find_prompt
from tdae_jax.defenses import tdae as tdae_defense
from tdae_jax.metrics import image as image_metrics
from tdae_jax.metrics import report
from tdae_jax.parallel import mesh as meshlib
from tdae_jax.parallel import multihost
from tdae_jax.protect import Protector

log = logging.getLogger("tdae_jax")

DEFENSES = ("none", "fdm", "dpd", "tdae", "tpa")
DTYPES = ("float32", "bfloat16")  # surrogate compute dtypes (--dtype)


class UsageError(ValueError):
    """The run cannot start (bad flags, weights, inputs or workdir): exit code 2."""


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
    resize: str = "center_crop"
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
    below bf16 resolution: defenses/fdm.py, "Precision").
    """
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


@dataclasses.dataclass
class RunResult:
    done: list[str]
    failed: list[str]
    skipped: list[str]
    rows: list[dict]


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - not a git checkout (installed package)
        return "unknown"


@functools.lru_cache(maxsize=4)
def _tiny(family: str):
    """The built-in tiny surrogate (one object per family: runs in one process share compiled steps)."""
    from tdae_jax import models

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
    from tdae_jax import models

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


def _prompt_for(entry: dict | None, family: str, default: str) -> str:
    if not entry:
        return default
    if family == "ip2p":
        return entry.get("instruction") or entry.get("caption") or default
    return entry.get("edited_prompt") or entry.get("caption") or entry.get("instruction") or default


def run(cfg: RunConfig, progress: Callable[[str], None] = log.info) -> RunResult:
    validate(cfg)  # flag errors first: nothing is read or written before them
    ran = effective(cfg)  # what runs (written to config.json and report.html)
    workdir = Path(cfg.workdir).expanduser().resolve()  # relative --workdir: relative to the current directory
    try:
        paths = dio.list_images(cfg.images)
    except (dio.DataError, OSError) as e:
        raise UsageError(str(e)) from e
    try:
        dio.check_output_dir(workdir, sorted({p.parent for p in paths}))
    except dio.DataError as e:
        raise UsageError(str(e)) from e
    prompts, prompt_problems = {}, []
    if cfg.prompts:
        try:
            prompts, prompt_problems = dio.load_prompts(cfg.prompts, image_paths=paths)
        except (dio.DataError, OSError) as e:
            raise UsageError(str(e)) from e
    fdm, tpa, dpd = ran.fdm, ran.tpa, ran.dpd
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
    sur = load_surrogate(cfg)
    if cfg.model_parallel > 1:
        sur = sur.shard(mesh)  # transformer split over "model", the rest replicated (models/sd3.py)
    proc = multihost.info()
    if proc.count > 1 and cfg.resize == "none":
        raise UsageError("multi-process runs need one working size for every image: use --resize other than none")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "protected").mkdir(exist_ok=True)
    if proc.is_main:
        (workdir / "git_revision.txt").write_text(git_revision() + "\n")
    # one manifest per process (ids are the same everywhere: every process registers every path)
    manifest = Manifest(workdir / ("manifest.json" if proc.count == 1 else f"manifest.p{proc.index}.json"))
    entries = manifest.sync(paths)
    # process p owns every P-th input (sorted order): a disjoint, deterministic shard
    owned = {e["id"] for k, e in enumerate(entries) if k % proc.count == proc.index}
    bad_prompt = {}  # source path -> problem, for rows that name an existing input but are unusable
    for problem in prompt_problems:
        log.error("prompts: %s", problem)
        if problem.path is not None and Path(problem.path).exists():
            bad_prompt[str(Path(problem.path).resolve())] = str(problem)
        else:  # the row names no existing image: it is a failed input of its own
            manifest.add_failure(f"prompt:{problem.key or problem.line}", str(problem), source=problem.file)

    loss_fn = objectives.make_objective(cfg.objective.name, sur, cfg.objective)
    loss_fn = eot_lib.wrap_objective(loss_fn, eot_transforms, cfg.eot_samples)  # identity when --eot is empty
    pgd_cfg = ran.pgd
    if pgd_cfg.random_start != cfg.pgd.random_start:
        log.info("objective %s has a zero gradient at delta=0: random start U(-eps/4, eps/4)", cfg.objective.name)
    init_fn, step_fn = tdae_defense.make_step(loss_fn, budget=cfg.budget, pgd=pgd_cfg, fdm=fdm, tpa=tpa, dpd=dpd)
    protector = Protector(init_fn, step_fn, mesh, cfg.batch_size)
    base = prng.base_key(cfg.seed)
    uses_text = objectives.uses_text(cfg.objective.name)
    embed = jax.jit(sur.embed_ids) if uses_text else None
    fp_cfg = {"cfg": dataclasses.asdict(cfg), "rev": "n/a"}

    mine = [e for e in entries if e["id"] in owned]
    todo = [e for e in mine if e["status"] != "done" and (cfg.retry_failed or e["status"] != "failed")
            and not e["id"].startswith("prompt:")]
    skipped = [e["id"] for e in mine if e not in todo]
    if skipped:
        progress(f"resuming: {len(skipped)} of {len(entries)} inputs already done or failed (not retried)")
    loaded, curves = {}, {}
    for e in todo:
        try:
            li = dio.load_image(e["source"], size=cfg.size, resize=cfg.resize, image_id=e["id"])
            for w in li.warnings:
                log.warning("%s: %s", e["source"], w)
            if e["source"] in bad_prompt:
                raise dio.DataError(f"{e['source']}: unusable prompt row: {bad_prompt[e['source']]}")
            loaded[e["id"]] = li
        except (dio.DataError, OSError) as err:
            manifest.mark(e["id"], "failed", error=str(err))
            log.error("%s", err)

    groups: dict[tuple, list[str]] = {}
    for i, li in loaded.items():
        groups.setdefault(li.array.shape, []).append(i)
    per = protector.local_batch_size
    work = [ids[j:j + per] for ids in groups.values() for j in range(0, len(ids), per)]
    if proc.count > 1:  # SPMD: every process runs the same number of global batches
        n_batches = max(multihost.allgather_json(len(work), proc))
        work += [[] for _ in range(n_batches - len(work))]
    total_iters = max(1, len(work) * cfg.pgd.steps)
    t_run = time.perf_counter()
    clock: dict = {}
    for bi, ids in enumerate(work):
        t0 = time.perf_counter()
        if ids:
            x0 = np.stack([loaded[i].array for i in ids])
            texts = [_prompt_for(find_prompt(prompts, i, loaded[i].path), sur.family, cfg.default_prompt)
                     for i in ids]
        else:  # this process has no rows left in this global batch: one dummy row, never written
            x0 = np.zeros((1, cfg.size, cfg.size, 3), np.float32)
            texts = [""]
        batch = {"x0": x0, "uid": prng.uids(ids or ["<pad>"])}
        if uses_text and sur.family == "sd3":  # emb = prompt_embeds (DPD's variable); pooled fixed (models/sd3.py)
            batch.update(sur.text_batch(texts))
        elif uses_text:
            token_ids = sur.tokenize(texts)
            batch["emb"] = np.asarray(embed(token_ids))
            batch["uncond"] = np.asarray(embed(sur.tokenize([""] * len(texts))))
            batch["token_mask"], missing = objectives.semantic_attention.target_token_mask(
                token_ids, sur.static.tokenizer, cfg.objective.sa_tokens)
            for j in [j for j in missing if j < len(ids)]:  # SA: no --sa_tokens word in it: all its tokens
                log.warning("%s: none of --sa_tokens %s in the prompt %r: SA targets all its tokens",
                            ids[j], list(cfg.objective.sa_tokens), texts[j])
        unit_ids = ids if proc.count == 1 else sum(multihost.allgather_json(ids, proc), [])
        unit = checkpoint.fingerprint(unit_ids)
        ckpt = checkpoint.UnitCheckpointer(workdir / "ckpt" / unit, cfg.ckpt_every) if cfg.ckpt_every else None
        meta = {"fingerprint": checkpoint.fingerprint({**fp_cfg, "ids": unit_ids}), "ids": unit_ids}

        def on_iter(it, info, bi=bi):
            # ETA from the steady-state rate (the first iteration of a run includes compilation)
            now = time.perf_counter()
            clock.setdefault("first", (now, bi * cfg.pgd.steps + it))
            if it == 1 or it % cfg.log_every == 0 or it == cfg.pgd.steps:
                done_iters = bi * cfg.pgd.steps + it
                t1, n1 = clock["first"]
                rate = (now - t1) / max(done_iters - n1, 1) if done_iters > n1 else float("nan")
                eta = rate * (total_iters - done_iters)
                eta_s = f"ETA {eta:.0f}s" if eta == eta else "ETA (compiling)"
                progress(f"batch {bi + 1}/{len(work)} ({len(ids)} img) iter {it}/{cfg.pgd.steps} "
                         f"loss={np.mean(info['loss']) if len(info['loss']) else float('nan'):.5g} elapsed {now - t_run:.0f}s {eta_s}")

        for i, text in zip(ids, texts):
            manifest.mark(i, "running", outputs={"prompt": text})
        try:
            delta, hist, resumed = protector.run(batch, len(ids), cfg.pgd.steps, base, ckpt=ckpt, meta=meta,
                                                 on_iter=on_iter)
            if resumed:
                progress(f"batch {bi + 1}: resumed from checkpoint at iteration {resumed}")
        except Exception as err:  # noqa: BLE001 - one failing batch must not stop the run
            for i in ids:
                manifest.mark(i, "failed", error=f"optimisation failed: {type(err).__name__}: {err}")
            log.exception("batch %d failed", bi + 1)
            continue
        secs = (time.perf_counter() - t0) / max(len(ids), 1)
        for j, i in enumerate(ids):
            _finish(cfg, manifest, workdir, loaded[i], delta[j], {k: v[j] for k, v in hist.items()}, secs, curves)
        if ckpt is not None:
            ckpt.close(remove=True)

    mine_now = [e for e in manifest.entries() if e["id"] in owned or e["id"].startswith("prompt:")]
    if proc.count > 1:  # process 0 writes the merged metrics and report (no shared filesystem needed)
        gathered = multihost.allgather_json(mine_now, proc)
        all_entries = sorted((e for part in gathered for e in part), key=lambda e: e["id"])
        all_entries = list({e["id"]: e for e in all_entries}.values())
    else:
        all_entries = mine_now
    rows = [_row(e) for e in all_entries]
    if proc.is_main:
        report.write_metrics(workdir, rows)
        _write_flags_summary(workdir, ran)
        if cfg.report:
            _write_report(ran, workdir, all_entries, curves)
    multihost.barrier("tdae_jax/pipeline/done", proc)
    return RunResult(done=[e["id"] for e in all_entries if e["status"] == "done"],
                     failed=[e["id"] for e in all_entries if e["status"] == "failed"],
                     skipped=skipped, rows=rows)


def _finish(cfg, manifest, workdir, li, delta, hist, secs, curves):
    prot = dio.protect_loaded(li, delta, cfg.budget.eps)
    out = dio.save_png_atomic(workdir / "protected" / f"{li.id}.png", prot, forbidden_dirs=[li.path.parent],
                              icc_profile=li.icc_profile)
    back = dio.read_back_uint8(out)
    a = jnp.asarray(back[None], jnp.float32) / 255.0
    b = jnp.asarray(li.original_uint8[None], jnp.float32) / 255.0
    loss_curve = [float(v) for v in hist.get("loss", [])]
    final = loss_curve[-1] if loss_curve else float("nan")
    metrics = {
        "linf_255": int(dio.linf_uint8(back, li.original_uint8)),
        "psnr": float(image_metrics.psnr(a, b)[0]),
        "ssim": float(image_metrics.ssim(a, b)[0]),
        "final_loss": final,
        "initial_loss": loss_curve[0] if loss_curve else float("nan"),
        "seconds": round(secs, 3),
    }
    if not np.isfinite(final):
        manifest.mark(li.id, "failed", error=f"{li.path}: the loss became non-finite", metrics=metrics)
        return
    manifest.mark(li.id, "done", outputs={"protected": str(out.relative_to(workdir))}, metrics=metrics)
    curves[li.id] = loss_curve
    (workdir / "curves").mkdir(exist_ok=True)
    dio.atomic_write_bytes(workdir / "curves" / f"{li.id}.json", json.dumps({k: [float(x) for x in v]
                                                                              for k, v in hist.items()}).encode())


def _row(e: dict) -> dict:
    m = e.get("metrics") or {}
    return {"id": e["id"], "source": e["source"], "status": e["status"], **{k: m.get(k) for k in (
        "linf_255", "psnr", "ssim", "final_loss", "seconds")}, "initial_loss": m.get("initial_loss"),
        "error": e.get("error") or ""}


def _write_flags_summary(workdir: Path, cfg: RunConfig):
    dio.atomic_write_bytes(workdir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=1, default=str).encode())


def _preview(cfg, entry, original, protected):
    """The surrogate editing the original and the protected image with the same prompt and noise."""
    from tdae_jax import editors

    sur = load_surrogate(cfg)
    kind = {"sd": "img2img", "ip2p": "ip2p", "inpaint": "inpaint", "sd3": "sd3_img2img"}[sur.family]
    extra = {"image_guidance_scale": cfg.preview_image_guidance} if kind == "ip2p" else {}
    fn = editors.make_editor(kind, sur, num_inference_steps=cfg.preview_steps, guidance_scale=cfg.preview_guidance,
                             **extra)
    prompt = (entry.get("outputs") or {}).get("prompt") or cfg.default_prompt
    pair = [original, protected]
    h, w = (cfg.size, cfg.size) if cfg.size else original.shape[:2]
    x = np.stack([np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.LANCZOS)) for a in pair])
    key = jax.random.fold_in(prng.base_key(cfg.seed), prng.image_uid(entry["id"]))
    keys = jnp.stack([key, key])  # same noise for both edits
    out = fn.from_prompts(jnp.asarray(x, jnp.float32) / 255.0, [prompt, prompt], keys)
    out = np.asarray(jnp.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return out[0], out[1]


def _write_report(cfg, workdir, all_entries, curves):
    entries = []
    for e in all_entries:
        item = {"id": e["id"], "status": e["status"], "error": e.get("error"), "metrics": e.get("metrics") or {}}
        if e["status"] == "done":
            try:
                li = dio.load_image(e["source"], size=None, resize="none", min_side=1)
                item["original"] = li.original_uint8
                item["protected"] = dio.read_back_uint8(workdir / e["outputs"]["protected"])
            except Exception as err:  # noqa: BLE001 - the report must not fail the run
                item["error"] = f"report: {err}"
            if cfg.preview_edit and "protected" in item:
                try:
                    item["edit_original"], item["edit_protected"] = _preview(cfg, e, item["original"],
                                                                             item["protected"])
                except Exception as err:  # noqa: BLE001 - a failing preview must not fail the run
                    log.warning("%s: preview edit failed: %s", e["id"], err)
            curve = curves.get(e["id"])
            if curve is None and (workdir / "curves" / f"{e['id']}.json").exists():
                curve = json.loads((workdir / "curves" / f"{e['id']}.json").read_text()).get("loss")
            item["loss_curve"] = curve
        entries.append(item)
    summary = {**describe(cfg), "done": sum(e["status"] == "done" for e in all_entries),
               "failed": sum(e["status"] == "failed" for e in all_entries)}
    report.write_html(workdir, "tdae_jax protection report", entries, cfg.budget.eps, summary)


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
            if pgd.random_start else "none"}
