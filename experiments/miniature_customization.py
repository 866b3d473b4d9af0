r"""Does a layer-1 defense stop DreamBooth / LoRA from learning a subject? The customization study on the
miniature world, with intervals and paired tests over subjects.

    python -m experiments.miniature_customization --flagfile=experiments/flags/customization_miniature.flags

Each of ``--subjects`` subjects of the procedural world (a shape in two colours with a pattern and a mark,
``--views`` views each) is protected against the shipped text-to-image model ``--cz_surrogate`` by every
``--defenses`` entry at every ``--budgets`` (``noise``: the uniform-noise control at the same budget; DLADiff
layer 1; the Anti-DreamBooth baselines ASPL and FSMG); the attacker fine-tunes each ``--attacked_models`` model on
the clean or protected views (``--attackers``: DreamBooth, LoRA; seeds ``--attacker_seeds``) and samples "a photo of
<token> <shape>"; the oracle scores subject reproduction. The grid lives in ``--study_dir`` (a stopped study
continues with the same command); ``--page`` gets the tables between its results markers after every subject.
Library: ``tdae_jax/miniature/customization{,_study,_report}.py``. Exit code: 0 done, 2 usage error.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("cz_surrogate", "sd_a", "Shipped text-to-image model the defenses optimise against.")
flags.DEFINE_list("attacked_models", ["sd_a", "sd_b", "sd_c"], "Models the attacker fine-tunes (intra: the "
                  "surrogate).")
flags.DEFINE_list("defenses", ["noise", "dladiff", "aspl", "fsmg"], "noise (control), dladiff, aspl, fsmg.")
flags.DEFINE_list("cz_budgets", ["8", "16"], "Budgets in 1/255 units.")
flags.DEFINE_list("attackers", ["dreambooth", "lora"], "dreambooth (UNet) and/or lora (rank 4).")
flags.DEFINE_list("attacker_seeds", ["0", "1"], "Attacker seeds (fine-tuning and sampling draws).")
flags.DEFINE_integer("subjects", 12, "Subjects: the first of the world's subject stream the oracle accepts.")
flags.DEFINE_integer("views", 4, "Views per subject (the identity's photos).")
flags.DEFINE_integer("subject_seed", 3000, "World seed of the subjects.")
flags.DEFINE_integer("defense_epochs", 10, "ADFT / ASPL epochs.")
flags.DEFINE_float("defense_lr", 1e-4, "Surrogate fine-tuning learning rate (DSUR, ADFT stage 3, ASPL).")
flags.DEFINE_integer("defense_static_steps", 100, "DSUR steps (the static surrogate DLADiff and FSMG attack).")
flags.DEFINE_integer("defense_fsmg_steps", 60, "FSMG's PGD steps.")
flags.DEFINE_integer("attack_steps", 200, "Attacker fine-tuning steps (batch 4).")
flags.DEFINE_float("attack_lr", 1e-4, "DreamBooth learning rate.")
flags.DEFINE_float("attack_lora_lr", 1e-3, "LoRA learning rate.")
flags.DEFINE_integer("attack_samples", 16, "Samples of the attacker's model per subject.")
flags.DEFINE_integer("attack_sample_steps", 10, "DDIM steps of the samples.")
flags.DEFINE_float("attack_guidance", 3.0, "Classifier-free guidance of the samples.")
flags.DEFINE_integer("min_px", 12, "Pixels a subject colour must cover in a sample (32 px images).")
flags.DEFINE_string("cz_study_dir", "runs/customization_miniature", "Resumable study folder.")
flags.DEFINE_string("cz_page", "", "Markdown page whose results block is rewritten (empty: print only).")
flags.DEFINE_bool("cz_report_only", False, "Write the page from the study folder; compute nothing.")
common.help_groups("experiments.miniature_customization", {
    "grid": ["cz_surrogate", "attacked_models", "defenses", "cz_budgets", "attackers", "attacker_seeds", "subjects",
             "views", "subject_seed"],
    "defenses": ["defense_epochs", "defense_lr", "defense_static_steps", "defense_fsmg_steps"],
    "attacker": ["attack_steps", "attack_lr", "attack_lora_lr", "attack_samples", "attack_sample_steps",
                 "attack_guidance", "min_px"],
    "output": ["cz_study_dir", "cz_page", "cz_report_only"]})


def config_from_flags(F):
    """The flags as a ``StudyConfig``; a bad value is a ``UsageError``."""
    from tdae_jax.miniature import customization as cz
    from tdae_jax.miniature import customization_study as cs
    from tdae_jax.runs.errors import UsageError

    try:
        return cs.StudyConfig(
            surrogate=F.cz_surrogate, victims=tuple(F.attacked_models), methods=tuple(F.defenses),
            eps=tuple(float(e) for e in F.cz_budgets), attackers=tuple(F.attackers),
            seeds=tuple(int(s) for s in F.attacker_seeds), subjects=F.subjects, views=F.views,
            subject_seed=F.subject_seed,
            defense=cz.DefenseConfig(F.defense_epochs, F.defense_lr, F.defense_static_steps, F.defense_fsmg_steps),
            attack=cz.AttackConfig("dreambooth", F.attack_steps, 4, F.attack_lr, F.attack_samples,
                                   F.attack_sample_steps, F.attack_guidance, F.min_px),
            lora_lr=F.attack_lora_lr)
    except ValueError as e:  # a budget or seed that is not a number, an unknown attacker
        raise UsageError(str(e)) from e


def main(argv):
    if len(argv) > 1:
        return common.usage_error(f"unexpected arguments: {argv[1:]}")
    from tdae_jax.miniature import customization_report as report
    from tdae_jax.miniature import customization_study as cs
    from tdae_jax.runs import lock
    from tdae_jax.runs.errors import UsageError

    try:
        cfg = config_from_flags(FLAGS)
        if not FLAGS.cz_report_only:
            lock.check(Path(FLAGS.cz_study_dir) / cs.LOCK, FLAGS.cz_study_dir)
        store = cs.Store(FLAGS.cz_study_dir, cfg)
    except UsageError as e:
        return common.usage_error(str(e))
    t0 = time.time()
    command = "python -m experiments.miniature_customization " + " ".join(
        a for a in sys.argv[1:] if a.startswith("--") and not a.startswith("--cz_report_only"))

    def write(wall):
        md = report.page(store, cfg, command, wall)
        if FLAGS.cz_page:
            common.replace_results(FLAGS.cz_page, md)
        return md

    if not FLAGS.cz_report_only:
        cs.run(cfg, store, log=logging.getLogger("tdae_jax").info, on_subject=lambda: write(time.time() - t0))
    print(write(None if FLAGS.cz_report_only else time.time() - t0))
    return 0


def run_cli(argv: list[str]) -> int:
    """In-process run of ``argv`` (tests)."""
    return common.run_cli(main, argv)


if __name__ == "__main__":
    common.run_main(main)
