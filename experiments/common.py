"""absl flags shared by the experiment entry points, their ``--help``, usage errors, and their conversion to
frozen configs.

Only ``experiments/`` imports absl (docs/design.md). Defaults: XD111ds/TDAE v1 ``tdae.py``, beta 0.3 (TDAE §IV-E); each
flagfile in ``experiments/flags/`` repeats the values it relies on with their provenance.

Command line contract of every ``python -m experiments.<command>`` (:func:`run_main`; :func:`run_cli` in-process):
``--help`` prints the command's own flags by group with their defaults and exits 0 (absl's ``--help`` lists only
flags defined in ``__main__``, none here, and exits 1; ``--helpfull`` stays absl's, every flag of every module); a
bad command line (unknown flag, bad value, missing flagfile, stray argument) is one ``error: ...`` line on stderr
and exit code 2, before anything is read or written.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import textwrap
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS


_DEFINED: set[str] = set()
_HELP: dict[str, dict[str, list[str]]] = {}  # command module -> help group title -> flag names (definition order)
_SECTION = ["", ""]  # (command module, group title) of the flags defined next
_FLAGFILES: list[str] = []  # the --flagfile arguments of the last command line parsed


def section(command: str, title: str) -> None:
    """List the flags defined next (through :func:`track`, or named by :func:`listed`) under ``title`` in the
    ``--help`` of ``command`` (its module name, e.g. ``experiments.tdae``)."""
    _SECTION[:] = [command, title]


def listed(name: str) -> None:
    """Add ``name`` to the current :func:`section` (a flag another command defined first is still listed)."""
    command, title = _SECTION
    if command:
        names = _HELP.setdefault(command, {}).setdefault(title, [])
        if name not in names:
            names.append(name)


def define_once(shared, kind: str, name: str, default, *args) -> None:
    """Define a flag of a command unless another imported command already did, and list it in the current
    :func:`section`. Flags named in ``shared`` mean the same in several commands: when two are imported in one
    process (the test suite) whichever comes first defines them, and these definitions allow the other to replace
    them (the flagfiles set every value they rely on). ``args``: the help string (enum: the choices, then it)."""
    listed(name)
    if name in FLAGS:
        return
    track(getattr(flags, f"DEFINE_{kind}"))(name, default, *args, allow_override=name in shared)


def help_groups(command: str, groups: dict[str, list[str]]) -> None:
    """Declare the ``--help`` groups of a command whose flags are defined with ``flags.DEFINE_*`` directly."""
    for title, names in groups.items():
        section(command, title)
        for name in names:
            listed(name)
    section("", "")


def track(fn):
    """Wrap an absl ``DEFINE_*`` so the flag's name is recorded (``run_config_from_flags`` and
    ``write_flagfile`` read those) and listed in the current :func:`section` of ``--help``."""
    def define(name, *a, **k):
        _DEFINED.add(name)
        listed(name)
        return fn(name, *a, **k)

    return define


MEA_HELP = ("Chunked UNet attention under jax.checkpoint (diffusers' use_memory_efficient_attention): the same "
            "function with about half the activation memory at 512 px; sd, ip2p, inpaint.")
DTYPES = ["float32", "bfloat16"]  # = tdae_jax.pipeline.DTYPES (not imported here: flags load before jax)
DTYPE_HELP = ("Surrogate compute dtype: bfloat16 = mixed precision for GPU/TPU. Convolutions, matmuls and "
              "activations in bf16, frozen VAE/text-encoder weights stored in bf16, UNet weights kept as float32 "
              "masters (fine-tuning and AdamW in float32), latents, losses and the perturbation in float32; "
              "sd, ip2p, inpaint. (XLA:CPU computes bf16 convolutions in float32: no gain on CPU.)")
TINY = "tiny"  # --weights_dir=tiny: the built-in random tiny model (the library's weights_dir "")
TINY_MAX_SIZE = 64  # an empty --weights_dir is accepted up to this working size (the tiny model's plumbing sizes)
FAMILY_NAMES = {"sd": "Stable Diffusion", "ip2p": "InstructPix2Pix", "inpaint": "Stable Diffusion inpainting",
                "sd3": "Stable Diffusion 3"}
WEIGHTS_HELP = (f"Local diffusers-format model directory, miniature:NAME (a shipped miniature model) or {TINY} (the "
                f"built-in random tiny model: plumbing only); empty is accepted only at --size <= {TINY_MAX_SIZE} "
                f"(then = {TINY}), so a paper flagfile at 512 px without real weights is a usage error.")


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


class _Define:
    """The tracked ``DEFINE_*`` functions (``D.string(...)`` = ``track(flags.DEFINE_string)(...)``)."""

    def __getattr__(self, kind):
        return track(getattr(flags, f"DEFINE_{kind}"))


def define_protect_flags(command: str = "experiments.tdae"):
    """Every flag of ``experiments.tdae``, in its ``--help`` groups."""
    names, objective_help, targets, target_help, defense_help = host_help()
    D = _Define()
    section(command, "inputs")
    D.string("images", "", "Folder (non-recursive) or glob of the input images (required); pkg:samples = the shipped "
             "sample photos, pkg:miniature_samples = the quickstart's miniature scenes.")
    D.string("prompts", "", "Optional CSV or JSONL with id,image,instruction[,caption,edited_prompt].")
    D.string("default_prompt", "make it a watercolor painting",
             "Edit instruction / caption used for images without a prompts row.")
    section(command, "host objective")
    D.enum("objective", "pge", names, objective_help)
    D.enum("target", "zero", targets, target_help)
    _objective_flags(D)
    section(command, "defense")
    D.enum("defense", "none", ["none", "fdm", "dpd", "tdae", "tpa"], defense_help)
    _defense_flags(D)
    section(command, "budget and optimizer")
    D.float("eps", 0.03, "L_inf budget as a fraction of the [0,1] range (TDAE §9: 0.03).")
    D.float("step_size", 0.005, "PGD step alpha in [0,1] units (TDAE §9: 0.005).")
    D.integer("steps", 100, "PGD iterations N (TDAE §9: 100).")
    D.enum("step_decay", "none", ["none", "linear"], "linear = PhotoGuard's schedule.")
    D.float("random_start", 0.0, "Random start U(-r eps, r eps); 0 = none (Algorithm 1).")
    D.integer("seed", 0, "Base PRNG seed; keys are derived per image id and iteration.")
    section(command, "model")
    D.string("weights_dir", "", WEIGHTS_HELP)
    D.enum("surrogate", "ip2p", ["sd", "ip2p", "inpaint", "sd3"], "Surrogate editor family.")
    D.bool("memory_efficient_attention", False, MEA_HELP)
    D.enum("dtype", "float32", DTYPES, DTYPE_HELP)
    D.bool("remat", True, "jax.checkpoint the per-timestep UNet calls.")
    section(command, "compute")
    _compute_flags(D)
    section(command, "output")
    _output_flags(D)
    section("", "")


def _objective_flags(D):
    D.integer("timesteps", 10, "K (t, eps) draws per gradient (TDAE §9: 10).")
    D.float("guidance_scale", 7.5, "CFG scale inside differentiable edits.")
    D.float("image_guidance_scale", 1.5, "InstructPix2Pix image guidance.")
    D.integer("denoise_steps", 4, "PhotoGuard diffusion attack: denoising steps K (PhotoGuard: 4).")
    # PhotoGuard diffusion attack (objective pgd; objectives/photoguard.py); defaults = MadryLab/photoguard's
    # demo_complex_attack_inpainting notebook (its executed super_l2 call: grad_reps=10, eta=1)
    D.integer("pgd_grad_reps", 10, "pgd: the loss (so the gradient) is averaged over R independent stochastic "
              "passes (PhotoGuard super_l2: grad_reps=10).")
    D.float("pgd_eta", 1.0, "pgd: DDIM eta of the unrolled chain (PhotoGuard's attack: 1; the diffusers "
            "pipelines' default: 0). Not for --surrogate=sd3 (its flow-matching Euler chain has no eta).")
    D.float("pgd_strength", -1.0, "pgd: img2img strength of the unrolled chain; <0 = the victim editor's "
            "default (sd img2img 0.8, inpaint 1.0, sd3 0.6). InstructPix2Pix edits from pure noise.")
    D.float("mist_weight", 1e4, "Mist semantic weight (mist_v3.py: 1e4).")
    D.bool("mist_separate_draws", True, "Mist: the textural and the semantic term encode x with independent "
           "VAE posterior draws (mist_v3.py: yes); false = one shared draw.")
    # Semantic Attack (objectives/semantic_attention.py; lists = its MASKS / TIMESTEPS, not imported: no jax here)
    D.list("sa_tokens", [], "SA: words of the prompt whose cross-attention is suppressed (comma "
           "separated; a word may span several tokens); empty = every content token.")
    D.enum("sa_mask", "attention", ["attention", "region", "none"],
           "SA spatial mask: attention = Lo et al. Eq. 4 (clean image's map > threshold x its max); region = "
           "the batch's image mask (inpainting region); none = every query.")
    D.float("sa_mask_threshold", 0.5, "SA: tau of Eq. 4, a fraction of the map's maximum, in (0, 1).")
    D.enum("sa_timesteps", "grid", ["grid", "random"],
           "SA timesteps: grid = the --timesteps-step DDIM grid (901, 801, ..., 1 for 10); random = uniform "
           "draws per iteration.")
    # EOT (tdae_jax/eot.py): objective averaged over differentiable purifications
    D.string("eot", "", "EOT transforms averaged in the objective: jpeg<q>, resize<f>, blur<sigma>, noise<s/255>, "
             "identity (e.g. jpeg75,resize0.5,blur1,noise4); empty = off.")
    D.integer("eot_samples", 1, "EOT draws per transform (cost: transforms x samples objective evaluations).")


def _defense_flags(D):
    D.enum("fdm_mode", "finite_difference", ["finite_difference", "exact", "exact_gog"],
           "FDM gradient: paper Eq. 6-9, forward-over-reverse HVP, or grad-of-grad.")
    D.float("fdm_beta", 0.3, "lambda/h (TDAE §IV-E: 0.3).")
    D.float("fdm_h", 0.05, "FDM L2 probe radius h (TDAE v1: 0.05).")
    D.integer("tpa_n", 10, "TPA neighbours N (TPA: 10).")
    D.float("tpa_b", -1.0, "TPA neighbourhood half-width b; <0 = eps (project default).")
    D.float("tpa_k", 0.05, "TPA finite-difference step k (= h).")
    D.float("tpa_beta", 0.3, "TPA lambda/k.")
    D.enum("tpa_estimator", "paper", ["paper", "official"],
           "TPA gradient estimate: paper = TPA Eq. 10 (the form TDAE states); official = the authors' code "
           "(fmy266/TPA TAEFEP): sign probes of L_inf step --tpa_k, 0.2*grad + 0.8*mean probe gradient, "
           "momentum 0.9 on the signed step (pass a --tpa_k below --eps).")
    D.integer("dpd_period", 10, "DPD period S (project default 10).")
    D.integer("dpd_steps", 20, "DPD inner steps M (TDAE v1: 20).")
    D.float("dpd_step_size", 2.0 / 255.0, "DPD text step eta (TDAE v1: 2/255).")
    D.float("dpd_eps", 8.0 / 255.0, "DPD L_inf text budget eps_p (TDAE v1: 8/255).")
    D.float("dpd_eps_t5", -1.0, "SD3: separate DPD budget of the T5 rows of prompt_embeds (the CLIP rows keep "
            "--dpd_eps; per-segment range clamp; CLIP zero padding fixed); <0 = one budget for all rows.")


def _compute_flags(D):
    D.integer("size", 256, "Working resolution (multiple of 8); ignored with --resize=none.")
    D.enum("resize", "resize", ["none", "center_crop", "resize", "pad"],
           "How inputs map to the working resolution; outputs are always at the original resolution. resize: the "
           "whole frame (every pixel protected); pad: the whole frame, aspect kept; none: the photo's own "
           "resolution; center_crop: the centred square only, the borders of a non-square photo are left "
           "unprotected (a warning says how much).")
    D.integer("batch_size", 1, "Images per step (rounded up to a multiple of the device count).")
    D.integer("num_devices", 0, "Devices in the mesh; 0 = all.")
    D.float("memory_limit_gib", 0.0, "Refuse (exit 2, before anything is written) a step whose compiled memory per "
            "device (XLA's estimate) exceeds this; 0 = the device's own memory (host memory on CPU).")
    D.integer("model_parallel", 1, "Size of the 'model' mesh axis: > 1 splits the surrogate's params over "
              "that many devices (sd3: SD3.5-large); the batch is split over the other devices.")
    # multi-host (tdae_jax/parallel/multihost.py; launch/*.sh)
    D.enum("multihost", "off", ["off", "on", "auto"],
           "off: one process; on: jax.distributed with --coordinator/--num_processes/--process_id "
           "(or TDAE_* env); auto: let JAX detect a TPU pod / SLURM cluster.")
    D.string("coordinator", "", "host:port of process 0 (multihost=on).")
    D.integer("num_processes", 0, "Number of processes (multihost=on).")
    D.integer("process_id", -1, "This process's index (multihost=on).")


def _output_flags(D):
    D.string("workdir", "runs/default", "Output folder (never an input folder); re-running the same command resumes.")
    D.bool("overwrite", False, "Start the workdir afresh, e.g. when its settings differ: the previous run's outputs "
           "(protected images, metrics, report, checkpoints) are removed first. Without it a workdir made with "
           "other settings is refused (exit 2), and one made with the same settings resumes. Not saved in "
           "flags.flags (an action, not a setting).")
    D.integer("ckpt_every", 0, "Orbax checkpoint every k iterations (0 = off).")
    D.bool("retry_failed", False, "On resume, retry inputs that failed before.")
    D.bool("report", True, "Write report.html.")
    D.enum("output_format", "png", ["png", "webp"], "Format of the protected images: png or webp (lossless); "
           "either way the budget holds on disk.")
    D.bool("keep_metadata", False, "Copy the input's EXIF (camera, date, location, ...) into the protected image, "
           "orientation tag set to 1 (the pixels are stored upright). Off: EXIF is not copied (the ICC colour "
           "profile always is).")
    D.integer("log_every", 10, "Progress line every k iterations.")
    D.bool("preview_edit", False, "Report: the surrogate's own edit of the original and of the protected "
           "image (same prompt, same noise).")
    D.integer("preview_steps", 20, "Denoising steps of the preview edit.")
    D.float("preview_guidance", 7.5, "Preview edit: text guidance (diffusers default 7.5).")
    D.float("preview_image_guidance", 1.5, "Preview edit: InstructPix2Pix image guidance (default 1.5).")


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
    """``experiments.tdae``'s flags as a ``pipeline.RunConfig`` (``ValueError``: a usage error). An empty
    ``--images`` stays empty (:func:`require_images` refuses it before a run)."""
    from tdae_jax import configs
    from tdae_jax.pipeline import RunConfig

    return RunConfig(
        images=resolve_package_path(F.images), workdir=F.workdir, prompts=resolve_package_path(F.prompts) if F.prompts else "",
        weights_dir=resolve_weights(F.weights_dir), surrogate=F.surrogate,
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
        num_devices=F.num_devices or None, model_parallel=F.model_parallel, memory_limit_gib=F.memory_limit_gib,
        memory_efficient_attention=F.memory_efficient_attention, dtype=F.dtype,
        ckpt_every=F.ckpt_every, retry_failed=F.retry_failed, report=F.report,
        log_every=F.log_every, default_prompt=F.default_prompt, preview_edit=F.preview_edit,
        preview_steps=F.preview_steps, preview_guidance=F.preview_guidance,
        preview_image_guidance=F.preview_image_guidance, eot=F.eot, eot_samples=F.eot_samples,
        overwrite=F.overwrite, output_format=F.output_format, keep_metadata=F.keep_metadata,
    )


def resolve_weights(spec: str) -> str:
    """``--weights_dir`` as the library reads it: ``tiny`` -> ``""`` (``pipeline.load_surrogate``'s built-in tiny
    model), ``miniature:NAME`` -> the shipped miniature model's folder, anything else as given."""
    if spec == TINY:
        return ""
    if spec.startswith("miniature:"):  # a shipped miniature model, e.g. miniature:ip2p_a
        from tdae_jax.miniature import shipped

        return str(shipped.path(spec.split(":", 1)[1]))
    return spec


def require_images(F, instead: str) -> None:
    """An empty ``--images`` is a usage error (``ValueError``) whose message gives the command to run
    ``instead`` (no hidden default input: a bare command must not start a long demonstration)."""
    if not F.images:
        raise ValueError(f"no --images: pass --images=DIR (a folder or glob of your photos), or run {instead}")


def require_weights(F, needs_model: bool = True) -> None:
    """An empty ``--weights_dir`` above ``TINY_MAX_SIZE`` px (or at the photos' own size, ``--resize=none``) is a
    usage error (``ValueError``) naming the flag: such a run is set up for real weights, and the built-in random
    tiny model only checks the plumbing (``--weights_dir=tiny`` asks for it at any size). ``needs_model=False``
    (a run that loads no diffusion model) accepts anything."""
    if not needs_model or F.weights_dir:
        return
    size = None if F.resize == "none" else F.size
    if size is not None and size <= TINY_MAX_SIZE:
        return
    family = FAMILY_NAMES.get(F.surrogate, F.surrogate)
    at = f"--size={F.size}" if size is not None else "--resize=none"
    where = f"this flagfile ({', '.join(_FLAGFILES)}) at {at}" if _FLAGFILES else at
    raise ValueError(f"--weights_dir is required {'by' if _FLAGFILES else 'at'} {where}: it is set up for the real {family} weights (pass "
                     f"--weights_dir=<local diffusers directory>); the built-in random tiny model is for plumbing "
                     f"only: pass --weights_dir={TINY} to use it explicitly")


def resolve_package_path(spec: str) -> str:
    """``pkg:<relative path>`` names a file or folder shipped in ``tdae_jax/assets``; anything else is as given."""
    if spec.startswith("pkg:"):
        import tdae_jax

        return str(Path(tdae_jax.__file__).parent / "assets" / spec[4:])
    return spec


NOT_SAVED = {"overwrite"}  # actions, not settings: re-running a saved flags.flags must resume, never clear


def write_flagfile(F, path: Path):
    """The resolved flags (every tracked flag but ``NOT_SAVED``), so a run can be repeated exactly."""
    from tdae_jax.data import io as dio

    lines = [F[name].serialize() for name in sorted(_DEFINED - NOT_SAVED) if name in F]
    dio.atomic_write_bytes(path, ("\n".join(line for line in lines if line) + "\n").encode())


def summarize(result, workdir, prefix: str = "") -> int:
    """Print a run's one-line summary and each failed input (stderr); exit code 1 if any input failed."""
    print(f"{prefix}protected {len(result.done)} image(s), {len(result.failed)} failed (in all; "
          f"{len(result.skipped)} skipped: finished by an earlier run in this workdir); outputs in {workdir}")
    for r in result.rows:
        if r["status"] == "failed":
            print(f"FAILED {r['source']}: {r['error']}", file=sys.stderr)
    return 1 if result.failed else 0


HELP_ARGS = ("--help", "-help", "--helpshort", "-helpshort", "-?", "-h", "--help=true", "--help=1")


def command_name(module: str) -> str:
    """The command's module name (``experiments.tdae``), also when it runs as ``__main__`` (``python -m``)."""
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        return spec.name if spec is not None else Path(sys.argv[0]).stem
    return module


def _default(flag) -> str:
    text = flag.default_as_str or "''"
    return text[1:-1] if len(text) > 2 and text[0] == text[-1] == "'" and " " not in text else text


def _first_sentence(text: str) -> str:
    """Up to the first full stop that ends a sentence (not "e.g.", "Eq. 4", "et al.")."""
    text = " ".join(text.split())
    return re.split(r"(?<!\bal\.)(?<!\bEq\.)(?<!\be\.g\.)(?<!\bi\.e\.)(?<=\.)\s+(?=[A-Z(])", text, maxsplit=1)[0]


def _flag_lines(flag, width: int = 110, column: int = 34) -> list[str]:
    head, pad = f"  --{flag.name}={_default(flag)}", " " * column
    text = _first_sentence(flag.help)
    wrap = dict(width=width, subsequent_indent=pad, break_on_hyphens=False)
    if len(head) >= column:
        return [head] + textwrap.wrap(text, initial_indent=pad, **wrap)
    return textwrap.wrap(text, initial_indent=head.ljust(column), **wrap)


def help_text(module: str) -> str:
    """``--help`` of the command ``module``: its docstring, then each help group with one line per flag,
    ``--name=default  first sentence of the help`` (a command without declared groups: the flags its module
    defines, as absl records them)."""
    command = command_name(module)
    doc = (getattr(sys.modules.get(module), "__doc__", None) or f"python -m {command} [flags]").strip("\n")
    groups = dict(_HELP.get(command, {}))
    by_module = FLAGS.flags_by_module_dict()
    grouped = {n for names in groups.values() for n in names}
    own = [f.name for key in dict.fromkeys((module, command, sys.argv[0])) for f in by_module.get(key, [])]
    if [n for n in own if n not in grouped]:  # defined by the command's module but in no declared group
        groups["other" if groups else "flags"] = [n for n in own if n not in grouped]
    lines = [doc, ""] + textwrap.wrap(f"Flags of {command} (--name=default). --flagfile=FILE reads flags from a "
                                      "file (later flags override earlier ones); --helpfull lists every flag of "
                                      "every module.", 110)
    for title, names in groups.items():
        lines += ["", f"{title}:"]
        for name in names:
            if name in FLAGS:
                lines += _flag_lines(FLAGS[name])
    return "\n".join(lines) + "\n"


def _flagfiles(argv: list[str]) -> list[str]:
    """The ``--flagfile`` values named on a command line (absl's spellings)."""
    out = []
    for i, a in enumerate(argv):
        if a in ("--flagfile", "-flagfile") and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith(("--flagfile=", "-flagfile=")):
            out.append(a.split("=", 1)[1])
    return [f for f in out if f]


def _one_line(e: flags.Error, command: str) -> str:
    """absl's parse error as one line: which flag or flagfile is wrong, and where the flags are listed."""
    msg = " ".join(str(e).split())
    if isinstance(e, flags.CantOpenFlagFileError):
        msg = "cannot open --flagfile: " + msg.split("Unable to open flagfile:", 1)[-1].strip()
        named = re.search(r"'([^']*)'$", msg)
        if named and not os.path.isabs(named.group(1)):
            msg += f" (a relative flagfile path is read from the current directory, {os.getcwd()})"
    return f"{msg} (python -m {command} --help lists the flags)"


def parse_args(argv: list[str], module: str) -> tuple[list[str] | None, str | None, bool]:
    """Parse ``argv`` into ``FLAGS``: ``(rest, error, help)``. ``help``: ``--help`` was asked for (nothing parsed);
    ``error``: one line for a usage error (unknown flag, bad value, missing flagfile, an argument that is not a
    flag, e.g. a flagfile line without its leading ``--``)."""
    if any(a in HELP_ARGS for a in argv[1:argv.index("--") if "--" in argv else len(argv)]):
        return None, None, True
    command = command_name(module)
    _FLAGFILES[:] = _flagfiles(argv)
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        return None, _one_line(e, command), False
    if len(rest) > 1:
        return None, (f"unexpected argument(s) {' '.join(map(repr, rest[1:]))}: every flag is --name=value, and so "
                      "is every line of a flagfile that is not a # comment"), False
    return rest, None, False


def usage_error(message: str) -> int:
    """Print a usage error as one ``error:`` line on stderr; the exit code 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def run_error(message) -> int:
    """Print a failure of the run itself (``RunError``: e.g. the disk filled up) as one ``error:`` line on
    stderr; the exit code 1 (re-running the same command resumes)."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 1


def run_cli(main, argv: list[str]) -> int:
    """Parse ``argv`` (``[prog, --flag=value, ...]``) into ``FLAGS`` and run ``main`` in-process; returns the exit
    code as :func:`run_main` (``--help``: the help on stdout, 0; a bad command line: one line, 2). The
    experiments' ``run_cli`` wrappers (used by the tests) call this."""
    FLAGS.unparse_flags()
    rest, error, wants_help = parse_args(argv, main.__module__)
    if wants_help:
        print(help_text(main.__module__), end="")
        return 0
    if error:
        return usage_error(error)
    return main(rest)


def parse_flags(argv, module: str = "__main__"):
    """absl's parser (``app.run(..., flags_parser=...)``) with this module's contract: ``--help`` prints
    :func:`help_text` and exits 0; a bad command line is one line and exit code 2 (absl's parser exits 1 after a
    page of usage)."""
    rest, error, wants_help = parse_args(argv, module)
    if wants_help:
        print(help_text(module), end="")
        sys.exit(0)
    if error:
        sys.exit(usage_error(error))
    return rest


def run_main(main):
    """absl app.run with logging to stderr at INFO, the :func:`parse_flags` contract, and the exit code main
    returns. Freed host memory is kept for the next iteration (``tdae_jax.runtime.reuse_host_memory``;
    ``TDAE_MALLOC=default`` opts out)."""
    from tdae_jax import runtime

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    runtime.reuse_host_memory()

    def _main(argv):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
        for noisy in ("absl", "jax", "orbax", "etils"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        sys.exit(main(argv))

    app.run(_main, flags_parser=lambda argv: parse_flags(argv, main.__module__))


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
