r"""Amortized protection: train a network g(x) -> delta once with TDAE's objective (host loss + FDM + DPD), then
protect any number of images with one forward pass each.

    python -m experiments.immunizer train --flagfile=experiments/flags/immunizer_mini32.flags
    python -m experiments.immunizer protect --flagfile=experiments/flags/immunizer_protect_mini32.flags \
        --images=photos/ --workdir=runs/immunized

train: miniature-world training images (--train_world_seed), the surrogate of --weights_dir, checkpoints every
--ckpt_every steps; re-running the same command resumes (bit-identical to an uninterrupted run). The trained
network (immunizer.msgpack + immunizer.json) is written to --workdir.
protect: --immunizer names a training workdir; every image of --images becomes protected/<id>.png in --workdir,
within the trained eps of the original on disk (8-bit), with manifest.json, metrics.jsonl/csv and report.html.
measure: on the miniature world, edit success of the victim on immunized images vs the reproduction study's rows
(--measure_study_dir) on the same held-out pairs, and protect's throughput vs the per-image experiments.tdae:
    python -m experiments.immunizer measure --immunizer=shipped --measure_out=m.json
Exit code: 0 done, 1 some inputs failed (protect; the others are done), 2 usage error (one line, nothing written).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
COMMAND = "experiments.immunizer"
SUBCOMMANDS = ("train", "protect", "measure")
# Flags experiments.tdae defines with the same meaning: whichever command is imported first defines them (ours
# allow the other's definition to replace them); flagfiles set every value they rely on.
SHARED = {"images", "workdir", "weights_dir", "surrogate", "objective", "target", "timesteps", "denoise_steps",
          "guidance_scale", "image_guidance_scale", "pgd_grad_reps", "pgd_eta", "remat", "defense", "fdm_mode",
          "fdm_beta", "fdm_h", "dpd_period", "dpd_steps", "dpd_step_size", "dpd_eps", "eps", "batch_size", "seed",
          "size", "resize", "num_devices", "ckpt_every", "log_every", "report"}


def _define(kind: str, name: str, default, *args):
    """``common.define_once`` with this command's ``SHARED`` flags."""
    common.define_once(SHARED, kind, name, default, *args)


def define_flags():
    from tdae_jax import objectives

    common.section(COMMAND, "train: surrogate and host objective")
    _define("string", "workdir", "runs/default", "Output folder (train: the trained network and checkpoints).")
    _define("string", "weights_dir", "", common.WEIGHTS_HELP)
    _define("enum", "surrogate", "ip2p", ["sd", "ip2p", "inpaint", "sd3"], "Surrogate editor family.")
    _define("enum", "objective", "pge", list(objectives.NAMES), "Host objective: a name of the registry.")
    _define("enum", "target", "zero", list(objectives.TARGETS), "Image target of the hosts that read one.")
    _define("integer", "timesteps", 10, "K (t, eps) draws per gradient (TDAE §9: 10).")
    _define("integer", "denoise_steps", 4, "PhotoGuard diffusion attack: denoising steps K (PhotoGuard: 4).")
    _define("float", "guidance_scale", 7.5, "CFG scale inside differentiable edits.")
    _define("float", "image_guidance_scale", 1.5, "InstructPix2Pix image guidance.")
    _define("integer", "pgd_grad_reps", 10, "pgd: the loss is averaged over R independent passes.")
    _define("float", "pgd_eta", 1.0, "pgd: DDIM eta of the unrolled chain.")
    _define("bool", "remat", True, "jax.checkpoint the per-timestep UNet calls.")
    common.section(COMMAND, "train: defense (TDAE Algorithm 1 on the network's output)")
    _define("enum", "defense", "none", ["none", "fdm", "dpd", "tdae", "tpa"],
            "none = host alone; fdm = + FDM; dpd = + DPD; tdae = + FDM + DPD (tpa: not for the immunizer).")
    _define("enum", "fdm_mode", "finite_difference", ["finite_difference", "exact", "exact_gog"],
            "FDM gradient: paper Eq. 6-9, forward-over-reverse HVP, or grad-of-grad.")
    _define("float", "fdm_beta", 0.3, "lambda/h (TDAE §IV-E: 0.3).")
    _define("float", "fdm_h", 0.05, "FDM L2 probe radius h (TDAE v1: 0.05).")
    _define("integer", "dpd_period", 10, "DPD period S (project default 10).")
    _define("integer", "dpd_steps", 20, "DPD inner steps M (TDAE v1: 20).")
    _define("float", "dpd_step_size", 2.0 / 255.0, "DPD text step eta (TDAE v1: 2/255).")
    _define("float", "dpd_eps", 8.0 / 255.0, "DPD L_inf text budget eps_p (TDAE v1: 8/255).")
    common.section(COMMAND, "train: network, optimizer and data")
    _define("float", "eps", 0.03, "L_inf budget in [0,1] units, built into the network (|g(x)| <= eps).")
    _define("list", "net_features", ["16", "32", "64"], "Channels per U-Net level (levels = their number).")
    _define("integer", "net_groups", 8, "GroupNorm groups.")
    _define("float", "adam_lr", 1e-3, "Adam learning rate.")
    _define("float", "grad_clip", 1.0, "Global-norm clipping of the parameter gradient.")
    _define("integer", "train_steps", 100, "Training steps (a longer run resumes a shorter one's checkpoint).")
    _define("integer", "batch_size", 1, "Images per step (a multiple of the data-axis device count).")
    _define("integer", "seed", 0, "Base PRNG seed (network init; noise keys per image id and step).")
    _define("integer", "train_world_seed", 5151, "Miniature-world seed of the training images (disjoint from "
            "the editors' 0-2, 10-12, 1000, the tests' 2000, 4242, 9090 and the study's 31337).")
    _define("integer", "train_pool", 512, "Training images (world items 0..N-1), visited once per epoch.")
    _define("integer", "train_size", 32, "Training image side in px (the miniature world: 32).")
    _define("list", "train_kinds", ["recolour", "remove"], "Edit kinds of the training pairs.")
    _define("integer", "train_objects", 2, "Objects per training scene: 1..N.")
    _define("integer", "num_devices", 0, "Devices in the data mesh; 0 = all.")
    _define("integer", "ckpt_every", 0, "Orbax checkpoint every k steps (0 = off).")
    _define("integer", "log_every", 10, "Progress line every k steps.")
    common.section(COMMAND, "protect")
    _define("string", "immunizer", "", "protect, measure: the training workdir holding immunizer.msgpack/.json, "
            "or 'shipped' (the network trained on the 32 px miniature world, tdae_jax/miniature/immunizer).")
    _define("string", "images", "", "protect: folder or glob of input images.")
    _define("integer", "size", 256, "protect: working resolution (multiple of 8); ignored with --resize=none.")
    _define("enum", "resize", "center_crop", ["none", "center_crop", "resize", "pad"],
            "protect: how inputs map to the working resolution; outputs are at the original resolution.")
    _define("bool", "report", True, "protect: write report.html.")
    common.section(COMMAND, "measure (miniature world)")
    _define("string", "measure_study_dir", "results/reproduce_mini32", "measure: the reproduction study whose held-out "
            "pairs and stored per-pair outcomes the immunizer is compared with.")
    _define("integer", "measure_pairs", 128, "measure: study pairs scored (the first N; the study has 128).")
    _define("list", "measure_victims", ["ip2p_a", "ip2p_b", "ip2p_c", "sd_a", "sd_b", "sd_c"],
            "measure: the shipped victims (the study's: intra ip2p_a, cross ip2p_b/c, SDEdit sd_a/b/c).")
    _define("list", "measure_purifiers", ["jpeg75", "resize0.5", "blur1", "noise4"],
            "measure: purifications of the immunized images (the study's), plus none and the worst case.")
    _define("integer", "measure_throughput_images", 16, "measure: images of the throughput comparison (0 = skip).")
    _define("string", "measure_out", "", "measure: JSON file for the results (also printed).")
    common.section("", "")


define_flags()


def train_spec_from_flags(F):
    """Flags -> ``immunizer.run.TrainSpec`` (ValueError for a bad value: exit 2)."""
    from tdae_jax import configs
    from tdae_jax.immunizer import net, run, train

    if F.defense == "tpa":
        raise ValueError("--defense=tpa: the immunizer trains with FDM's flatness penalty (TPA's neighbourhood "
                         "estimator is per-image PGD only); use fdm or tdae")
    fdm_on, dpd_on = F.defense in ("fdm", "tdae"), F.defense in ("dpd", "tdae")
    tc = train.TrainConfig(
        net=net.NetConfig(eps=F.eps, features=tuple(int(f) for f in F.net_features), groups=F.net_groups),
        fdm=configs.FDM(mode=F.fdm_mode if fdm_on else "off", beta=F.fdm_beta, h=F.fdm_h),
        dpd=configs.DPD(enabled=dpd_on, period=F.dpd_period, steps=F.dpd_steps, step_size=F.dpd_step_size,
                        eps=F.dpd_eps),
        lr=F.adam_lr, clip_norm=F.grad_clip)
    if F.pgd_grad_reps < 1 or F.pgd_eta < 0:
        raise ValueError(f"--pgd_grad_reps must be >= 1 and --pgd_eta >= 0, got {F.pgd_grad_reps}, {F.pgd_eta}")
    obj = configs.Objective(name=F.objective, timesteps=F.timesteps, denoise_steps=F.denoise_steps,
                            guidance_scale=F.guidance_scale, image_guidance_scale=F.image_guidance_scale,
                            target=F.target, remat=F.remat, pgd_grad_reps=F.pgd_grad_reps, pgd_eta=F.pgd_eta)
    return run.TrainSpec(workdir=F.workdir, train=tc, objective=obj, surrogate=F.surrogate,
                         weights_dir=common.resolve_weights(F.weights_dir), steps=F.train_steps,
                         batch_size=F.batch_size, seed=F.seed, world_seed=F.train_world_seed, pool=F.train_pool,
                         size=F.train_size, kinds=tuple(F.train_kinds), objects=F.train_objects,
                         num_devices=F.num_devices or None, ckpt_every=F.ckpt_every, log_every=F.log_every)


def run_train() -> int:
    from tdae_jax.immunizer import run
    from tdae_jax.runs.errors import UsageError

    try:
        spec = train_spec_from_flags(FLAGS)
    except (ValueError, TypeError, FileNotFoundError) as e:
        return common.usage_error(e)
    log = logging.getLogger("tdae_jax").info
    log("loading the surrogate and the training images, then compiling the training step (the first progress "
        "line includes the compilation)")
    try:
        out = run.train(spec, progress=log)
        common.write_flagfile(FLAGS, Path(spec.workdir) / "flags.flags")
    except UsageError as e:
        return common.usage_error(e)
    except OSError as e:
        return common.run_error(f"{spec.workdir}: {e}")
    final = ", ".join(f"{k}={v:.5g}" for k, v in out["final"].items() if k in ("loss", "objective"))
    print(f"trained the immunizer for {out['steps']} steps"
          + (f" (resumed from step {out['resumed_from']})" if out["resumed_from"] else "")
          + f": {final}; network in {spec.workdir}")
    return 0


def run_protect() -> int:
    from tdae_jax.immunizer import protect
    from tdae_jax.runs.errors import RunError, UsageError

    if not FLAGS.images or not FLAGS.immunizer:
        return common.usage_error("protect needs --images (a folder or glob) and --immunizer (a training workdir)")
    cfg = protect.ProtectConfig(images=common.resolve_package_path(FLAGS.images), workdir=FLAGS.workdir,
                                immunizer=FLAGS.immunizer,
                                size=None if FLAGS.resize == "none" else FLAGS.size, resize=FLAGS.resize,
                                batch_size=FLAGS.batch_size, report=FLAGS.report,
                                num_devices=FLAGS.num_devices or None,
                                eps=FLAGS.eps if FLAGS["eps"].present else None)
    try:
        out = protect.protect_folder(cfg, progress=logging.getLogger("tdae_jax").info)
        common.write_flagfile(FLAGS, Path(FLAGS.workdir) / "flags.flags")
    except (UsageError, ValueError) as e:
        return common.usage_error(e)
    except (RunError, OSError) as e:
        return common.run_error(e)
    print(f"protected {len(out['done'])} image(s), {len(out['failed'])} failed ({len(out['skipped'])} skipped: "
          f"done by an earlier run in this workdir); outputs in {FLAGS.workdir}")
    return 1 if out["failed"] else 0


def run_measure() -> int:
    import json
    import tempfile

    from tdae_jax.immunizer import measure

    if not FLAGS.immunizer:
        return common.usage_error("measure needs --immunizer (a training workdir or the shipped network)")
    if not (Path(FLAGS.measure_study_dir) / "scores").is_dir():
        return common.usage_error(f"--measure_study_dir={FLAGS.measure_study_dir}: no scores/ folder "
                                  "(run experiments.reproduce)")
    if not 1 <= FLAGS.measure_pairs <= 128 or FLAGS.measure_throughput_images < 0:
        return common.usage_error("--measure_pairs must be in 1..128 and --measure_throughput_images >= 0")
    from tdae_jax import purify
    from tdae_jax.miniature import shipped

    unknown = [v for v in FLAGS.measure_victims if v not in shipped.names() or shipped.family(v) == "vae"]
    if unknown or not FLAGS.measure_victims:
        return common.usage_error(f"--measure_victims: {unknown or 'none given'}: not shipped editors "
                                  f"({', '.join(n for n in shipped.names() if shipped.family(n) != 'vae')})")
    try:
        purify.parse(FLAGS.measure_purifiers)
    except ValueError as e:
        return common.usage_error(f"--measure_purifiers: {e}")
    log = logging.getLogger("tdae_jax").info
    try:
        out = {"edit": measure.edit_success(FLAGS.immunizer, FLAGS.measure_study_dir, FLAGS.measure_pairs,
                                            tuple(FLAGS.measure_victims), tuple(FLAGS.measure_purifiers),
                                            progress=log)}
        if FLAGS.measure_throughput_images:
            with tempfile.TemporaryDirectory(prefix="immunizer_measure_") as tmp:
                out["throughput"] = measure.throughput(FLAGS.immunizer, tmp, FLAGS.measure_throughput_images,
                                                       FLAGS.batch_size, progress=log)
    except (FileNotFoundError, ValueError) as e:
        return common.usage_error(e)
    text = json.dumps(out, indent=1)
    if FLAGS.measure_out:
        Path(FLAGS.measure_out).write_text(text + "\n")
    print(text)
    return 0


_COMMAND = [None]  # the sub-command of a ``python -m`` run (taken off sys.argv before absl parses it)


def main(argv, command: str | None = None) -> int:
    command = command or _COMMAND[0]
    if command not in SUBCOMMANDS:
        return common.usage_error(f"name a sub-command first: python -m {COMMAND} train|protect|measure "
                                  "--flagfile=...")
    return {"train": run_train, "protect": run_protect, "measure": run_measure}[command]()


def split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    """``[prog, sub, flags...]`` -> ``(sub, [prog, flags...])``; ``(None, argv)`` without a sub-command."""
    if len(argv) > 1 and argv[1] in SUBCOMMANDS:
        return argv[1], [argv[0], *argv[2:]]
    return None, list(argv)


def run_cli(argv: list[str]) -> int:
    """In-process run of ``[prog, sub, --flag=value, ...]`` (tests); the exit code."""
    command, rest = split_command(argv)
    FLAGS.unparse_flags()
    rest, error, wants_help = common.parse_args(rest, __name__)
    if wants_help:
        print(common.help_text(__name__), end="")
        return 0
    if error:
        return common.usage_error(error)
    return main(rest, command)


if __name__ == "__main__":
    _COMMAND[0], sys.argv[:] = split_command(sys.argv)
    common.run_main(main)
