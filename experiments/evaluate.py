r"""Evaluate protections: edit the clean original and the protected image with each victim editor (same
seed, noise and prompt), under each purification, and compare (TDAE §IV-A metrics).

    python -m experiments.evaluate --flagfile=experiments/flags/evaluate_quickstart.flags
    python -m experiments.evaluate --runs=runs/a,runs/b --outdir=runs/eval_ab \
        --victims='sd14:sd:/models/sd14,ip2p:ip2p:/models/ip2p|steps=20' \
        --purify=none,jpeg95,jpeg75,jpeg50,resize,blur,noise,diffpure,noisyup --seeds=0,1,2

Victims: ``NAME:FAMILY:SOURCE[|key=value...]`` separated by commas; FAMILY sd (img2img/SDEdit), ip2p
(InstructPix2Pix) or inpaint; SOURCE ``tiny``, ``tiny@SEED`` (random tiny models: plumbing only),
``miniature:NAME`` (a shipped miniature model, as --weights_dir of the protect command; FAMILY may be left
empty) or a local diffusers-format directory; keys: kind, steps, strength, guidance, image_guidance,
scheduler, eta (override the --edit_* flags for that victim).

Outputs in --outdir (default <run>/eval for a single run): metrics.csv / metrics.jsonl (one row per run x
image x victim x purifier x seed x kind), matrix.md (surrogate x victim, mean ± std), report.html (image grids),
plots/*.png (metric vs eps, loss vs iteration), eval_config.json, flags.flags, failures.txt.
Exit code: 0 everything evaluated, 1 some images or victims failed (the rest is written), 2 usage error.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
_NAMES: list[str] = []


COMMAND = "experiments.evaluate"


def _define(kind: str, name: str, default, help_: str, **kw):
    _NAMES.append(name)
    common.listed(name)
    if name not in FLAGS:
        getattr(flags, f"DEFINE_{kind}")(name, default, help_, **kw)


common.section(COMMAND, "inputs")
_define("string", "runs", "", "Comma-separated protect workdirs (each with config.json, manifest.json, protected/).")
_define("integer", "max_images", 0, "At most this many images per run; 0 = all.")
_define("string", "edit_prompt", "", "Edit text for every image; empty = each run's prompts / default prompt.")
common.section(COMMAND, "victims")
_define("string", "victims", "", "Comma-separated NAME:FAMILY:SOURCE[|key=value...] (see the module docstring).")
_define("string", "seeds", "0,1,2", "Edit seeds (project default: 3 seeds; the paper states none).")
_define("integer", "edit_steps", 0, "Victim inference steps; 0 = the pipeline default (img2img/inpaint/sd3 50, ip2p 100).")
_define("float", "edit_strength", -1.0, "img2img / inpaint / sd3 strength; <0 = pipeline default (0.8 / 1.0 / 0.6).")
_define("float", "edit_guidance", -1.0, "Text guidance scale; <0 = the pipeline default (7.5; SD3 7.0).")
_define("float", "edit_image_guidance", 1.5, "InstructPix2Pix image guidance (diffusers default 1.5).")
_define("string", "edit_scheduler", "", "Sampler (ddim, pndm, euler, euler_ancestral, ...); empty = the model's own.")
_define("float", "edit_eta", 0.0, "DDIM eta.")
common.section(COMMAND, "purification")
_define("string", "purify", "none", "Purifiers: none, jpeg<q>, resize<f>, blur<sigma>, noise<s/255>, diffpure<t>, "
        "noisyup<t> (tdae_jax/purify.py); the worst case is taken over this set.")
_define("string", "purifier_model", "",
        "FAMILY:SOURCE of the diffpure/noisyup model (sd family); empty = the first sd victim.")
_define("integer", "purify_steps", 0, "Inference steps of diffpure/noisyup (img2img runs steps*t); 0 = 50.")
_define("float", "noisyup_sigma", 0.1, "Noisy Upscaling noise std in [0,1] units (Hönig et al.: 0.1).")
_define("bool", "purifier_cost", True, "Also edit(P(clean)) vs edit(clean) for each purifier.")
common.section(COMMAND, "metrics")
_define("string", "lpips_weights", "",
        "Comma-separated local LPIPS weight files (.safetensors/.npz); empty = no LPIPS.")
_define("string", "lpips_net", "alex", "LPIPS trunk: alex (the lpips package default) or vgg.")
_define("string", "clip_weights", "",
        "Local transformers CLIPModel directory (config.json + model.safetensors, tokenizer files): adds the CLIP "
        "image similarity (clip_img) and direction similarity (clip_dir) columns; tiny = random (plumbing); "
        "empty = off.")
_define("float", "psnr_cap_db", 100.0, "PSNR of identical images (instead of +inf), so means stay finite.")
_define("bool", "seed_floor", True, "Also edit(clean; seed a) vs edit(clean; seed b).")
common.section(COMMAND, "compute")
_define("integer", "eval_size", 0, "Working size override (multiple of 8); 0 = each run's own --size.")
_define("integer", "eval_batch_size", 4, "Images per editor call.")
_define("bool", "fast_compile", False, "XLA optimization level 0: much faster compiles, slower runs (tests, tiny).")
common.section(COMMAND, "output")
_define("string", "outdir", "", "Output folder; empty = <run>/eval when --runs names one run.")
_define("integer", "report_images", 8, "Images per run shown in report.html.")
_define("bool", "plots", True, "Write plots/*.png (matplotlib).")
common.section("", "")


def config_from_flags(F):
    from tdae_jax import evaluate as ev

    seeds = tuple(int(s) for s in F.seeds.split(",") if s.strip())
    edit = ev.EditSettings(steps=F.edit_steps or None, strength=None if F.edit_strength < 0 else F.edit_strength,
                           guidance=None if F.edit_guidance < 0 else F.edit_guidance, image_guidance=F.edit_image_guidance,
                           scheduler=F.edit_scheduler or None, eta=F.edit_eta)
    return ev.EvalConfig(
        runs=tuple(r.strip() for r in F.runs.split(",") if r.strip()), victims=ev.parse_victims(F.victims),
        outdir=F.outdir, purify=tuple(p.strip() for p in F.purify.split(",") if p.strip()) or ("none",),
        seeds=seeds, edit=edit, prompt=F.edit_prompt,
        lpips_weights=tuple(p.strip() for p in F.lpips_weights.split(",") if p.strip()), lpips_net=F.lpips_net,
        clip_dir=F.clip_weights,
        purifier_model=F.purifier_model, purify_steps=F.purify_steps or None, noisyup_sigma=F.noisyup_sigma,
        size=F.eval_size or None, batch_size=F.eval_batch_size, psnr_cap_db=F.psnr_cap_db, seed_floor=F.seed_floor,
        purifier_cost=F.purifier_cost, max_images=F.max_images, report_images=F.report_images, plots=F.plots,
        fast_compile=F.fast_compile)


LOCK = "evaluate.lock"


def main(argv):
    """Flags -> ``EvalConfig`` -> ``Runner`` (loads the victims: usage errors, exit 2, before anything is
    written) -> rows -> outputs, with a progress line for each phase."""
    if len(argv) > 1:
        return common.usage_error(f"unexpected arguments: {argv[1:]}")
    import dataclasses

    from tdae_jax import evaluate as ev
    from tdae_jax.data import io as dio
    from tdae_jax.runs import lock
    from tdae_jax.runtime import format_duration

    log, t0 = logging.getLogger("tdae_jax").info, time.perf_counter()
    try:
        cfg = config_from_flags(FLAGS)
        cfg = dataclasses.replace(cfg, outdir=str(ev.default_outdir(cfg)))
        lock_path = Path(cfg.outdir) / LOCK
        lock.check(lock_path, cfg.outdir)  # another evaluation writing here: refused before anything is loaded
        log(f"loading {len(cfg.runs)} run(s) and {len(cfg.victims)} victim(s) "
            f"({', '.join(v.name for v in cfg.victims)})")
        runner = ev.Runner(cfg, progress=log)
    except (ev.UsageError, ValueError) as e:
        return common.usage_error(e)
    log(f"loaded in {format_duration(time.perf_counter() - t0)}; editing (each victim's first batch includes "
        "its compilation)")
    Path(cfg.outdir).mkdir(parents=True, exist_ok=True)
    try:
        with lock.held(lock_path, cfg.outdir):  # one evaluation writes an output folder at a time
            result = runner.run()
            log(f"edited in {format_duration(time.perf_counter() - t0)}; writing metrics, matrix, report and plots "
                f"to {cfg.outdir}")
            paths = ev.write_outputs(result, cfg)
            lines = [FLAGS[n].serialize() for n in _NAMES if n in FLAGS]
            dio.atomic_write_bytes(Path(cfg.outdir) / "flags.flags", ("\n".join(x for x in lines if x) + "\n").encode())
    except ev.UsageError as e:  # e.g. another evaluation took the lock since the check above
        return common.usage_error(e)
    print(f"evaluated {len(cfg.runs)} run(s) x {len(cfg.victims)} victim(s) in "
          f"{format_duration(time.perf_counter() - t0)}: {len(result.rows)} rows; matrix: {paths['matrix']}; "
          f"report: {paths['report']}")
    for f in result.failures:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if result.failures else 0


def run_cli(argv: list[str]) -> int:
    """In-process run of ``argv`` (tests); see ``common.run_cli``."""
    return common.run_cli(main, argv)


if __name__ == "__main__":
    common.run_main(main)
