"""absl flags shared by the experiment entry points, and their conversion to frozen configs.

Only ``experiments/`` imports absl (docs/design.md). Defaults: XD111ds/TDAE v1 ``tdae.py``, beta 0.3 (TDAE §IV-E); each
flagfile in ``experiments/flags/`` repeats the values it relies on with their provenance.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS


_DEFINED: set[str] = set()


def track(fn):
    """Wrap an absl ``DEFINE_*`` so the flag's name is recorded (``run_config_from_flags`` reads those)."""
    def define(name, *a, **k):
        _DEFINED.add(name)
        return fn(name, *a, **k)

    return define


MEA_HELP = ("Chunked UNet attention under jax.checkpoint (diffusers' use_memory_efficient_attention): the same "
            "function with about half the activation memory at 512 px; sd, ip2p, inpaint.")
DTYPES = ["float32", "bfloat16"]  # = tdae_jax.pipeline.DTYPES (not imported here: flags load before jax)
DTYPE_HELP = ("Surrogate compute dtype. bfloat16 = mixed precision for GPU/TPU: convolutions, matmuls and "
              "activations in bf16, frozen VAE/text-encoder weights stored in bf16, UNet weights kept as float32 "
              "masters (fine-tuning and AdamW in float32), latents, losses and the perturbation in float32; "
              "sd, ip2p, inpaint. (XLA:CPU computes bf16 convolutions in float32: no gain on CPU.)")


def host_help() -> tuple[list[str], str, list[str], str, str]:
    """(objective names, --objective help, target names, --target help, --defense help), generated from the
    objectives registry (``tdae_jax.objectives``: NAMES, TARGETS and the uses_text / accepts_target columns), so
    the names the command documents are the names it accepts. Imports the library (and so jax)."""
    from tdae_jax import objectives

    names, targets = list(objectives.NAMES), list(objectives.TARGETS)
    text_free = [n for n in names if not objectives.uses_text(n)]
    with_target = [n for n in names if objectives.accepts_target(n)]
    objective = "Host objective: a name of the tdae_jax.objectives registry."  # DEFINE_enum lists the names
    target = (f"Image target of the hosts that read one ({', '.join(with_target)}); the other hosts have none and "
              "refuse a non-default value.")
    defense = ("none = host alone; fdm = host + FDM; dpd = host + DPD; tdae = host + FDM + DPD (Algorithm 1); "
               f"tpa = host + TPA. dpd and tdae need a host that reads the text (refused for {', '.join(text_free)}: "
               "use fdm).")
    return names, objective, targets, target, defense


def define_protect_flags():
    names, objective_help, targets, target_help, defense_help = host_help()
    DEFINE_string, DEFINE_enum, DEFINE_float = (track(flags.DEFINE_string), track(flags.DEFINE_enum),
                                                track(flags.DEFINE_float))
    DEFINE_integer, DEFINE_bool = track(flags.DEFINE_integer), track(flags.DEFINE_bool)
    DEFINE_string("images", "", "Folder (non-recursive) or glob of input images. Empty = the shipped samples.")
    DEFINE_string("prompts", "", "Optional CSV or JSONL with id,image,instruction[,caption,edited_prompt].")
    DEFINE_string("workdir", "runs/default", "Output folder (never an input folder).")
    DEFINE_string("weights_dir", "", "Local diffusers-format model directory; empty = built-in default.")
    DEFINE_enum("surrogate", "ip2p", ["sd", "ip2p", "inpaint", "sd3"], "Surrogate editor family.")
    DEFINE_enum("objective", "pge", names, objective_help)
    DEFINE_enum("defense", "none", ["none", "fdm", "dpd", "tdae", "tpa"], defense_help)
    DEFINE_float("eps", 0.03, "L_inf budget as a fraction of the [0,1] range (TDAE §9: 0.03).")
    DEFINE_float("step_size", 0.005, "PGD step alpha in [0,1] units (TDAE §9: 0.005).")
    DEFINE_integer("steps", 100, "PGD iterations N (TDAE §9: 100).")
    DEFINE_enum("step_decay", "none", ["none", "linear"], "linear = PhotoGuard's schedule.")
    DEFINE_float("random_start", 0.0, "Random start U(-r eps, r eps); 0 = none (Algorithm 1).")
    DEFINE_integer("batch_size", 1, "Images per step (rounded up to a multiple of the device count).")
    DEFINE_integer("seed", 0, "Base PRNG seed; keys are derived per image id and iteration.")
    DEFINE_integer("size", 256, "Working resolution (multiple of 8); ignored with --resize=none.")
    DEFINE_enum("resize", "center_crop", ["none", "center_crop", "resize", "pad"],
                      "How inputs map to the working resolution; outputs are always at the original resolution.")
    DEFINE_integer("num_devices", 0, "Devices in the mesh; 0 = all.")
    DEFINE_integer("model_parallel", 1, "Size of the 'model' mesh axis: > 1 splits the surrogate's params over "
                   "that many devices (sd3: SD3.5-large); the batch is split over the other devices.")
    DEFINE_bool("memory_efficient_attention", False, MEA_HELP)
    DEFINE_enum("dtype", "float32", DTYPES, DTYPE_HELP)
    DEFINE_integer("ckpt_every", 0, "Orbax checkpoint every k iterations (0 = off).")
    DEFINE_bool("retry_failed", False, "On resume, retry inputs that failed before.")
    DEFINE_bool("report", True, "Write report.html.")
    DEFINE_integer("log_every", 10, "Progress line every k iterations.")
    DEFINE_bool("preview_edit", False, "Report: the surrogate's own edit of the original and of the protected "
                "image (same prompt, same noise).")
    DEFINE_integer("preview_steps", 20, "Denoising steps of the preview edit.")
    DEFINE_float("preview_guidance", 7.5, "Preview edit: text guidance (diffusers default 7.5).")
    DEFINE_float("preview_image_guidance", 1.5, "Preview edit: InstructPix2Pix image guidance (default 1.5).")
    DEFINE_string("default_prompt", "make it a watercolor painting",
                        "Edit instruction / caption used for images without a prompts row.")
    # multi-host (tdae_jax/parallel/multihost.py; launch/*.sh)
    DEFINE_enum("multihost", "off", ["off", "on", "auto"],
                "off: one process; on: jax.distributed with --coordinator/--num_processes/--process_id "
                "(or TDAE_* env); auto: let JAX detect a TPU pod / SLURM cluster.")
    DEFINE_string("coordinator", "", "host:port of process 0 (multihost=on).")
    DEFINE_integer("num_processes", 0, "Number of processes (multihost=on).")
    DEFINE_integer("process_id", -1, "This process's index (multihost=on).")
    # objective knobs
    DEFINE_integer("timesteps", 10, "K (t, eps) draws per gradient (TDAE §9: 10).")
    DEFINE_integer("denoise_steps", 4, "PhotoGuard diffusion attack: denoising steps K (PhotoGuard: 4).")
    DEFINE_float("guidance_scale", 7.5, "CFG scale inside differentiable edits.")
    DEFINE_float("image_guidance_scale", 1.5, "InstructPix2Pix image guidance.")
    DEFINE_float("mist_weight", 1e4, "Mist semantic weight (mist_v3.py: 1e4).")
    DEFINE_bool("mist_separate_draws", True, "Mist: the textural and the semantic term encode x with independent "
                "VAE posterior draws (mist_v3.py: yes); false = one shared draw.")
    DEFINE_enum("target", "zero", targets, target_help)
    DEFINE_bool("remat", True, "jax.checkpoint the per-timestep UNet calls.")
    # PhotoGuard diffusion attack (objective pgd; objectives/photoguard.py); defaults = MadryLab/photoguard's
    # demo_complex_attack_inpainting notebook (its executed super_l2 call: grad_reps=10, eta=1)
    DEFINE_integer("pgd_grad_reps", 10, "pgd: the loss (so the gradient) is averaged over R independent stochastic "
                   "passes (PhotoGuard super_l2: grad_reps=10).")
    DEFINE_float("pgd_eta", 1.0, "pgd: DDIM eta of the unrolled chain (PhotoGuard's attack: 1; the diffusers "
                 "pipelines' default: 0). Not for --surrogate=sd3 (its flow-matching Euler chain has no eta).")
    DEFINE_float("pgd_strength", -1.0, "pgd: img2img strength of the unrolled chain; <0 = the victim editor's "
                 "default (sd img2img 0.8, inpaint 1.0, sd3 0.6). InstructPix2Pix edits from pure noise.")
    # Semantic Attack (objectives/semantic_attention.py; lists = its MASKS / TIMESTEPS, not imported: no jax here)
    track(flags.DEFINE_list)("sa_tokens", [], "SA: words of the prompt whose cross-attention is suppressed (comma "
                             "separated; a word may span several tokens); empty = every content token.")
    DEFINE_enum("sa_mask", "attention", ["attention", "region", "none"],
                "SA spatial mask: attention = Lo et al. Eq. 4 (clean image's map > threshold x its max); region = "
                "the batch's image mask (inpainting region); none = every query.")
    DEFINE_float("sa_mask_threshold", 0.5, "SA: tau of Eq. 4, a fraction of the map's maximum, in (0, 1).")
    DEFINE_enum("sa_timesteps", "grid", ["grid", "random"],
                "SA timesteps: grid = the --timesteps-step DDIM grid (901, 801, ..., 1 for 10); random = uniform "
                "draws per iteration.")
    # FDM / TPA / DPD
    DEFINE_enum("fdm_mode", "finite_difference", ["finite_difference", "exact", "exact_gog"],
                      "FDM gradient: paper Eq. 6-9, forward-over-reverse HVP, or grad-of-grad.")
    DEFINE_float("fdm_beta", 0.3, "lambda/h (TDAE §IV-E: 0.3).")
    DEFINE_float("fdm_h", 0.05, "FDM L2 probe radius h (TDAE v1: 0.05).")
    DEFINE_integer("tpa_n", 10, "TPA neighbours N (TPA: 10).")
    DEFINE_float("tpa_b", -1.0, "TPA neighbourhood half-width b; <0 = eps (project default).")
    DEFINE_float("tpa_k", 0.05, "TPA finite-difference step k (= h).")
    DEFINE_float("tpa_beta", 0.3, "TPA lambda/k.")
    DEFINE_enum("tpa_estimator", "paper", ["paper", "official"],
                "TPA gradient estimate: paper = TPA Eq. 10 (the form TDAE states); official = the authors' code "
                "(fmy266/TPA TAEFEP): sign probes of L_inf step --tpa_k, 0.2*grad + 0.8*mean probe gradient, "
                "momentum 0.9 on the signed step (pass a --tpa_k below --eps).")
    DEFINE_integer("dpd_period", 10, "DPD period S (project default 10).")
    DEFINE_integer("dpd_steps", 20, "DPD inner steps M (TDAE v1: 20).")
    DEFINE_float("dpd_step_size", 2.0 / 255.0, "DPD text step eta (TDAE v1: 2/255).")
    DEFINE_float("dpd_eps", 8.0 / 255.0, "DPD L_inf text budget eps_p (TDAE v1: 8/255).")
    DEFINE_float("dpd_eps_t5", -1.0, "SD3: separate DPD budget of the T5 rows of prompt_embeds (the CLIP rows keep "
                 "--dpd_eps; per-segment range clamp; CLIP zero padding fixed); <0 = one budget for all rows.")
    # EOT (tdae_jax/eot.py): objective averaged over differentiable purifications
    DEFINE_string("eot", "", "EOT transforms averaged in the objective: jpeg<q>, resize<f>, blur<sigma>, noise<s/255>, "
                  "identity (e.g. jpeg75,resize0.5,blur1,noise4); empty = off.")
    DEFINE_integer("eot_samples", 1, "EOT draws per transform (cost: transforms x samples objective evaluations).")


def pgd_options(F) -> dict:
    """The PhotoGuard diffusion attack's ``Objective`` fields; a setting that cannot apply is a usage error
    (``ValueError``: the experiment exits 2 with its message)."""
    strength = None if F.pgd_strength < 0 else F.pgd_strength
    if F.pgd_grad_reps < 1:
        raise ValueError(f"--pgd_grad_reps must be >= 1, got {F.pgd_grad_reps}")
    if F.pgd_eta < 0:
        raise ValueError(f"--pgd_eta must be >= 0, got {F.pgd_eta}")
    if strength is not None and strength > 1:
        raise ValueError(f"--pgd_strength must be in [0, 1] (or < 0 for the editor's default), got {strength}")
    if F.objective == "pgd" and F.surrogate == "ip2p" and strength not in (None, 1.0):
        raise ValueError("--pgd_strength: InstructPix2Pix edits from pure noise (no img2img strength)")
    if F.objective == "pgd" and F.surrogate == "sd3" and F["pgd_eta"].present:
        raise ValueError("--pgd_eta: the SD3 attack unrolls a flow-matching Euler chain, which has no DDIM eta")
    return {"pgd_grad_reps": F.pgd_grad_reps, "pgd_eta": F.pgd_eta, "pgd_strength": strength}


def run_config_from_flags(F):
    from tdae_jax import configs
    from tdae_jax.data import io as dio
    from tdae_jax.pipeline import RunConfig

    images = resolve_package_path(F.images) if F.images else str(dio.sample_dir())
    weights_dir = F.weights_dir
    if weights_dir.startswith("miniature:"):  # a shipped miniature model, e.g. miniature:ip2p_a
        from tdae_jax.miniature import shipped

        weights_dir = str(shipped.path(weights_dir.split(":", 1)[1]))
    return RunConfig(
        images=images, workdir=F.workdir, prompts=resolve_package_path(F.prompts) if F.prompts else "",
        weights_dir=weights_dir, surrogate=F.surrogate,
        defense=F.defense,
        objective=configs.Objective(name=F.objective, timesteps=F.timesteps, denoise_steps=F.denoise_steps,
                                    guidance_scale=F.guidance_scale, image_guidance_scale=F.image_guidance_scale,
                                    mist_weight=F.mist_weight, mist_separate_draws=F.mist_separate_draws,
                                    target=F.target, remat=F.remat, sa_tokens=tuple(F.sa_tokens),
                                    sa_mask=F.sa_mask, sa_mask_threshold=F.sa_mask_threshold,
                                    sa_timesteps=F.sa_timesteps, **pgd_options(F)),
        budget=configs.Budget(eps=F.eps),
        pgd=configs.PGD(step_size=F.step_size, steps=F.steps, step_decay=F.step_decay, random_start=F.random_start),
        fdm=configs.FDM(mode=F.fdm_mode, beta=F.fdm_beta, h=F.fdm_h),
        tpa=configs.TPA(n=F.tpa_n, b=None if F.tpa_b < 0 else F.tpa_b, k=F.tpa_k, beta=F.tpa_beta,
                        estimator=F.tpa_estimator),
        dpd=configs.DPD(period=F.dpd_period, steps=F.dpd_steps, step_size=F.dpd_step_size, eps=F.dpd_eps,
                        eps_t5=None if F.dpd_eps_t5 < 0 else F.dpd_eps_t5),
        batch_size=F.batch_size, seed=F.seed, size=None if F.resize == "none" else F.size, resize=F.resize,
        num_devices=F.num_devices or None, model_parallel=F.model_parallel,
        memory_efficient_attention=F.memory_efficient_attention, dtype=F.dtype,
        ckpt_every=F.ckpt_every, retry_failed=F.retry_failed, report=F.report,
        log_every=F.log_every, default_prompt=F.default_prompt, preview_edit=F.preview_edit,
        preview_steps=F.preview_steps, preview_guidance=F.preview_guidance,
        preview_image_guidance=F.preview_image_guidance, eot=F.eot, eot_samples=F.eot_samples,
    )


def resolve_package_path(spec: str) -> str:
    """``pkg:<relative path>`` names a file or folder shipped in ``tdae_jax/assets``; anything else is as given."""
    if spec.startswith("pkg:"):
        import tdae_jax

        return str(Path(tdae_jax.__file__).parent / "assets" / spec[4:])
    return spec


def write_flagfile(F, path: Path):
    """The resolved flags (every flag of the main module's groups), so a run can be repeated exactly."""
    from tdae_jax.data import io as dio

    lines = [F[name].serialize() for name in sorted(_DEFINED) if name in F]
    dio.atomic_write_bytes(path, ("\n".join(line for line in lines if line) + "\n").encode())


def summarize(result, workdir, prefix: str = "") -> int:
    """Print a run's one-line summary and each failed input (stderr); exit code 1 if any input failed."""
    print(f"{prefix}protected {len(result.done)} image(s), {len(result.failed)} failed (in all; "
          f"{len(result.skipped)} skipped: finished by an earlier run in this workdir); outputs in {workdir}")
    for r in result.rows:
        if r["status"] == "failed":
            print(f"FAILED {r['source']}: {r['error']}", file=sys.stderr)
    return 1 if result.failed else 0


def run_cli(main, argv: list[str]) -> int:
    """Parse ``argv`` (``[prog, --flag=value, ...]``) into ``FLAGS`` and run ``main`` in-process; returns the exit
    code (2 for a flag error, as :func:`run_main`). The experiments' ``run_cli`` wrappers (used by the tests) call
    this."""
    FLAGS.unparse_flags()
    try:
        FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return main(argv[:1])


def parse_flags(argv):
    """absl's parser, but a bad flag is a usage error: exit code 2 (absl's own parser exits 1)."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}\nPass --helpfull to see the flags.", file=sys.stderr)
        sys.exit(2)


def run_main(main):
    """absl app.run with logging to stderr at INFO, and the exit code main returns (2 for a bad flag). Freed host
    memory is kept for the next iteration (``tdae_jax.runtime.reuse_host_memory``; ``TDAE_MALLOC=default`` opts
    out)."""
    from tdae_jax import runtime

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    runtime.reuse_host_memory()

    def _main(argv):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
        for noisy in ("absl", "jax", "orbax", "etils"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        sys.exit(main(argv))

    app.run(_main, flags_parser=parse_flags)


def replace_results(path, md: str) -> None:
    """Write ``md`` between the results markers of ``path`` (or as the whole file), atomically."""
    from tdae_jax.data import io as dio

    start, end = "<!-- results:start -->", "<!-- results:end -->"
    p = Path(path)
    text = p.read_text() if p.is_file() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + start + "\n" + md + end + rest.split(end, 1)[1]
    else:
        text = md
    dio.atomic_write_bytes(p, text.encode())
