r"""Play the attacker against protected photos: fine-tune Stable Diffusion on each set of one identity's photos
(DreamBooth, LoRA), sample it, and score the samples (FDR, ISM with dlib's face pipeline, BRISQUE).

    python -m experiments.evaluate_customization --flagfile=experiments/flags/evaluate_customization_dladiff.flags \
        --sets=clean=ids/n000050/set_B,dladiff=runs/n000050 --clean=ids/n000050/set_A \
        --weights_dir=/models/sd21base --outdir=runs/n000050_attack

--sets: name=PATH,... where PATH is a workdir of experiments.dladiff (its protected/ images) or a folder of photos;
--clean: the identity's clean photos (the ISM reference). --weights_dir: a local diffusers SD folder,
miniature:NAME (a shipped miniature model) or tiny (the built-in random tiny model: plumbing only).
Exit code: 0 every unit (set x attacker x seed) done, 1 some units failed (each named on stderr; the others are
done), 2 usage error (one line, nothing written). Re-running with the same --outdir resumes (finished units are
kept); the outputs: metrics.csv (one row per unit and prompt), samples/, summary.md, report.html.
"""
from __future__ import annotations

import logging
import sys

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
COMMAND = "experiments.evaluate_customization"
# flags other commands define too (same meaning, same type and default): whichever is imported first defines them
SHARED = ("clean", "attackers", "attacker_seeds", "weights_dir", "dtype", "memory_efficient_attention", "overwrite",
          "retry_failed", "report")
NAMES: list[str] = []  # this command's flags, in --help order (flags.flags)
NOT_SAVED = ("overwrite",)


def _define(kind: str, name: str, default, *args):
    NAMES.append(name)
    common.define_once(SHARED, kind, name, default, *args)


def define_flags():
    common.section(COMMAND, "inputs")
    _define("list", "sets", [], "name=PATH,...: each set of one identity's photos the attacker fine-tunes on; PATH "
            "is a workdir of experiments.dladiff (its protected/ images) or a folder of photos (pkg:samples = the "
            "shipped samples). Names: letters, digits, _ - . (PATHs without commas).")
    _define("string", "clean", "", "Folder of the identity's clean photos: the ISM reference (mean dlib descriptor).")
    common.section(COMMAND, "attacker")
    _define("list", "attackers", ["dreambooth", "lora"], "dreambooth and/or lora.")
    _define("list", "attacker_seeds", ["0", "1"], "Attacker seeds: one fine-tuning per set, attacker and seed "
            "(the same draws for every set).")
    _define("string", "instance_prompt", "a photo of sks person", "Fine-tuning prompt (DLADiff §3.1).")
    _define("string", "class_prompt", "a photo of person", "Class prompt of the prior term (DLADiff §3.1).")
    _define("integer", "num_class_images", 200, "Class images sampled once from the base model (prior > 0).")
    _define("integer", "class_steps", 50, "DDIM steps per class image.")
    _define("float", "ft_weight_decay", 1e-2, "AdamW weight decay of both fine-tunings.")
    _define("float", "ft_max_grad_norm", 1.0, "Gradient clipping of both fine-tunings (<= 0: off).")
    common.section(COMMAND, "dreambooth")
    _define("integer", "db_steps", 400, "DreamBooth steps.")
    _define("integer", "db_batch_size", 4, "DreamBooth batch size.")
    _define("float", "db_lr", 5e-6, "DreamBooth learning rate (AdamW).")
    _define("bool", "db_train_text_encoder", True, "DreamBooth trains the text encoder too.")
    _define("float", "db_prior_weight", 1.0, "DreamBooth prior-preservation weight (0 = none).")
    common.section(COMMAND, "lora")
    _define("integer", "lora_steps", 1000, "LoRA steps.")
    _define("integer", "lora_batch_size", 1, "LoRA batch size.")
    _define("float", "lora_lr", 1e-4, "LoRA learning rate (AdamW).")
    _define("integer", "lora_rank", 4, "LoRA rank r on the UNet attention projections.")
    _define("float", "lora_alpha", 4.0, "LoRA alpha (scale alpha / r).")
    _define("float", "lora_prior_weight", 1.0, "LoRA prior-preservation weight (0 = none).")
    common.section(COMMAND, "sampling and scores")
    _define("list", "sample_prompts", ["a photo of sks person", "a dslr portrait of sks person"],
            "Prompts the fine-tuned model is sampled with (comma separated).")
    _define("integer", "samples_per_prompt", 20, "Samples per prompt and unit.")
    _define("integer", "sample_steps", 100, "DDIM steps per sample (eta 0).")
    _define("float", "sample_guidance", 7.5, "Classifier-free guidance of the samples and class images.")
    _define("integer", "sample_batch_size", 4, "Images per sampling call.")
    _define("bool", "brisque", True, "Score BRISQUE (the brisque package of the faces extra).")
    common.section(COMMAND, "model")
    _define("string", "weights_dir", "", "Local diffusers-format SD folder, miniature:NAME (a shipped miniature "
            f"model) or {common.TINY} (the built-in random tiny model: plumbing only); required.")
    _define("integer", "resolution", 512, "Fine-tuning and sampling side (centre crop, multiple of 8).")
    _define("enum", "dtype", "float32", common.DTYPES, common.DTYPE_HELP)
    _define("bool", "memory_efficient_attention", False, common.MEA_HELP)
    common.section(COMMAND, "output")
    _define("string", "outdir", "runs/evaluate_customization", "Output folder (never a set's folder).")
    _define("bool", "overwrite", False, "Start the outdir afresh (its previous outputs removed); without it an "
            "outdir made with other settings is refused (exit 2). Not saved in flags.flags.")
    _define("bool", "retry_failed", False, "On resume, retry units that failed before.")
    _define("bool", "report", True, "Write report.html.")
    common.section("", "")


define_flags()


def _sets(items) -> tuple:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--sets: {item!r} is not name=PATH")
        out.append((name, common.resolve_package_path(path)))
    return tuple(out)


def config_from_flags(F):
    """The flags as an ``EvalConfig`` (``ValueError``: a usage error)."""
    from tdae_jax.editors.finetune import FinetuneConfig
    from tdae_jax.evaluate.customization import EvalConfig

    if not F.weights_dir:
        raise ValueError("--weights_dir is required: a local diffusers SD folder (SD-2.1-base for the paper's "
                         f"attacker), miniature:NAME (a shipped miniature model) or {common.TINY} (plumbing only)")
    try:
        weights = common.resolve_weights(F.weights_dir)
    except FileNotFoundError as e:
        raise ValueError(f"--weights_dir={F.weights_dir}: {e}") from e
    try:
        seeds = tuple(int(s) for s in F.attacker_seeds)
    except ValueError as e:
        raise ValueError(f"--attacker_seeds must be integers, got {','.join(F.attacker_seeds)}") from e
    shared = dict(weight_decay=F.ft_weight_decay, max_grad_norm=F.ft_max_grad_norm)
    try:
        db = FinetuneConfig(method="dreambooth", steps=F.db_steps, batch_size=F.db_batch_size, lr=F.db_lr,
                            train_text_encoder=F.db_train_text_encoder, prior_weight=F.db_prior_weight, **shared)
    except ValueError as e:
        raise ValueError(f"--db_steps / --db_batch_size / --db_lr: {e}") from e
    try:
        lora = FinetuneConfig(method="lora", steps=F.lora_steps, batch_size=F.lora_batch_size, lr=F.lora_lr,
                              lora_rank=F.lora_rank, lora_alpha=F.lora_alpha, prior_weight=F.lora_prior_weight,
                              **shared)
    except ValueError as e:
        raise ValueError(f"--lora_steps / --lora_batch_size / --lora_lr / --lora_rank: {e}") from e
    return EvalConfig(
        sets=_sets(F.sets), clean=common.resolve_package_path(F.clean), outdir=F.outdir, weights_dir=weights,
        attackers=tuple(F.attackers), seeds=seeds, instance_prompt=F.instance_prompt, class_prompt=F.class_prompt,
        dreambooth=db, lora=lora, num_class_images=F.num_class_images, class_steps=F.class_steps,
        prompts=tuple(F.sample_prompts),
        samples_per_prompt=F.samples_per_prompt, sample_steps=F.sample_steps, guidance=F.sample_guidance,
        sample_batch=F.sample_batch_size, resolution=F.resolution, brisque=F.brisque, dtype=F.dtype,
        memory_efficient_attention=F.memory_efficient_attention, retry_failed=F.retry_failed, report=F.report,
        overwrite=F.overwrite)


def flagfile_text(F) -> str:
    """This command's resolved flags (``--overwrite`` left out), so the run can be repeated exactly."""
    lines = [F[n].serialize() for n in NAMES if n not in NOT_SAVED and n in F]
    return "\n".join(line for line in lines if line) + "\n"


def main(argv):
    """Flags -> ``EvalConfig`` -> ``customization.run``; the usage errors (exit 2) come before anything is
    written."""
    if len(argv) > 1:
        return common.usage_error(f"unexpected arguments: {argv[1:]}")
    from tdae_jax.evaluate import customization as cz
    from tdae_jax.runs import errors

    try:
        cfg = config_from_flags(FLAGS)
    except (ValueError, TypeError) as e:
        return common.usage_error(e)
    command = f"python -m {COMMAND} --flagfile={FLAGS.outdir}/flags.flags"
    try:
        result = cz.run(cfg, progress=logging.getLogger("tdae_jax").info, command=command,
                        flagfile=flagfile_text(FLAGS))
    except errors.UsageError as e:
        return common.usage_error(e)
    except errors.RunError as e:  # the outdir became unwritable: re-running resumes
        return common.run_error(e)
    print(f"attacked {len(result.done)} unit(s), {len(result.failed)} failed (in all; {len(result.skipped)} "
          f"skipped: finished by an earlier run in this outdir); outputs in {cfg.outdir}")
    for uid, err in result.failed:
        print(f"FAILED {uid}: {err}", file=sys.stderr)
    return 1 if result.failed else 0


def run_cli(argv: list[str]) -> int:
    """In-process run of ``argv`` (tests); see ``common.run_cli``."""
    return common.run_cli(main, argv)


if __name__ == "__main__":
    common.run_main(main)
