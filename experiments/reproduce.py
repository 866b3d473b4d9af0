r"""The reproduction study in one command: TDAE's tables on a miniature world, with intervals and paired tests.

    python -m experiments.reproduce --flagfile=experiments/flags/reproduce_miniature.flags
    python -m experiments.reproduce --quick --study_dir=/tmp/study --page=/tmp/study/reproduction.md

Protects ``--pairs`` held-out edit pairs with every ``--rows`` entry at every ``--budgets`` under each threat model
(``blind``: the protector does not know the victim's instruction; ``known``: it does), lets every victim edit the
clean, protected and purified images, and writes the page ``--page`` (Markdown), ``cells.csv`` and plots beside it.
The grid lives in ``--study_dir``: a killed study re-run with the same command continues with the next missing cell.
Protocol and storage: ``tdae_jax/evaluate/study.py``; statistics: ``tdae_jax/evaluate/stats.py``.
Exit code: 0 done, 2 usage error (one line, nothing written).
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("world", "mini32", "Miniature world: mini32 or mini64 (32 / 64 px scenes); the models must be trained in it.")
flags.DEFINE_integer("world_seed", 31337, "World seed of the held-out pairs (never used in training or tests).")
flags.DEFINE_integer("pairs", 128, "Edit pairs per cell.")
flags.DEFINE_list("edit_kinds", ["recolour", "remove"], "Edit kinds (the shipped editors' training kinds).")
flags.DEFINE_integer("scene_objects", 2, "Objects per scene: 1..N (the editors' training range).")
flags.DEFINE_string("surrogate_model", "ip2p_a", "Shipped InstructPix2Pix model the protections optimize against.")
flags.DEFINE_list("ip2p_victims", ["ip2p_a", "ip2p_b", "ip2p_c"], "InstructPix2Pix victims (intra: the surrogate).")
flags.DEFINE_list("sdedit_victims", ["sd_a", "sd_b", "sd_c"], "Text-to-image victims used as SDEdit img2img.")
flags.DEFINE_float("sdedit_strength", 0.6, "SDEdit strength of the text-to-image victims.")
flags.DEFINE_list("purifiers", ["jpeg75", "resize0.5", "blur1", "noise4"], "Purifications for the worst case.")
flags.DEFINE_list("rows", ["noise", "pge", "pgd", "pgd_tdae"], "noise and host[_fdm|_dpd|_tdae|_tpa] specs.")
flags.DEFINE_list("budgets", ["8", "16"], "Budgets in 1/255 units.")
flags.DEFINE_list("threats", ["blind", "known"], "Threat models: blind, known.")
flags.DEFINE_list("beta_sweep", [], "FDM beta values (Fig. 5) for the first *_fdm row at the largest budget.")
flags.DEFINE_integer("pgd_iterations", 40, "Sign-PGD iterations per protection.")
flags.DEFINE_integer("victim_steps", 10, "DDIM steps of every victim edit.")
flags.DEFINE_integer("pgd_denoise_steps", 4, "PhotoGuard diffusion attack: sampler steps back-propagated.")
flags.DEFINE_integer("protect_batch", 16, "Pairs per compiled protection batch.")
flags.DEFINE_string("study_dir", "runs/reproduce_miniature", "Resumable study folder.")
flags.DEFINE_string("page", "docs/reproduction.md", "The page (Markdown); cells.csv and plots go to <page stem>/.")
flags.DEFINE_string("timing_host", "pgd", "Host of the seconds-per-iteration table (host, +FDM, +TDAE, +TPA).")
flags.DEFINE_integer("timing_iters", 5, "Timed iterations per variant (after a warm-up); 0 = no timing table.")
flags.DEFINE_bool("report_only", False, "Write the page from the cells already in --study_dir; compute nothing.")
flags.DEFINE_bool("quick", False, "A few pairs, two rows, one budget, one victim: the plumbing check CI runs.")
common.help_groups("experiments.reproduce", {
    "world": ["world", "world_seed", "pairs", "edit_kinds", "scene_objects"],
    "models": ["surrogate_model", "ip2p_victims", "sdedit_victims", "sdedit_strength", "victim_steps"],
    "grid": ["rows", "budgets", "threats", "purifiers", "beta_sweep"],
    "optimizer": ["pgd_iterations", "pgd_denoise_steps", "protect_batch"],
    "output": ["study_dir", "page", "timing_host", "timing_iters", "report_only", "quick"]})

QUICK = dict(n=8, rows=("noise", "pgd"), eps=(16,), threats=("blind",), victims=("ip2p_a",), sdedit_victims=(),
             purifiers=("jpeg75",), steps=2, edit_steps=4, denoise_steps=1, batch_size=8)


def config_from_flags(F):
    from tdae_jax.evaluate import study

    kw = dict(world=F.world, seed=F.world_seed, n=F.pairs, kinds=tuple(F.edit_kinds), max_objects=F.scene_objects,
              surrogate=F.surrogate_model, victims=tuple(F.ip2p_victims), sdedit_victims=tuple(F.sdedit_victims),
              sdedit_strength=F.sdedit_strength, purifiers=tuple(F.purifiers), rows=tuple(F.rows),
              eps=tuple(float(e) for e in F.budgets), threats=tuple(F.threats), steps=F.pgd_iterations, edit_steps=F.victim_steps,
              denoise_steps=F.pgd_denoise_steps, batch_size=F.protect_batch,
              beta_sweep=tuple(float(b) for b in F.beta_sweep))
    if F.quick:
        kw.update(QUICK)
    return study.StudyConfig(**kw)


def _command() -> str:
    args = [a for a in sys.argv[1:] if a.startswith("--") and a not in ("--report_only", "--report_only=true")]
    return "python -m experiments.reproduce " + " ".join(args)


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments: {argv[1:]}", file=sys.stderr)
        return 2
    from tdae_jax.evaluate import study, study_timing
    from tdae_jax.runs import lock

    try:
        cfg = config_from_flags(FLAGS)
        if FLAGS.timing_iters < 0:
            raise study.StudyError(f"--timing_iters={FLAGS.timing_iters} must be >= 0")
        if not FLAGS.report_only:  # a live study in this folder: refused before anything is written
            lock.check(Path(FLAGS.study_dir) / study.LOCK, FLAGS.study_dir)
        store = study.Store(FLAGS.study_dir, cfg)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    log = logging.getLogger("tdae_jax").info
    out = Path(FLAGS.page)
    if FLAGS.report_only:
        timing = study_timing.load(store)
    else:  # the page is rewritten after every new cell, so a study stopped early still shows what it has
        study.run(cfg, FLAGS.study_dir, log=log,
                  on_cell=lambda s: write_outputs(s, cfg, out, _command(), time.time() - t0, {}))
        iters = 0 if FLAGS.quick else FLAGS.timing_iters
        timing = study_timing.run(cfg, store, FLAGS.timing_host, iters, log) if iters else {}
    write_outputs(store, cfg, out, _command(), None if FLAGS.report_only else time.time() - t0, timing)
    print(f"study written to {out} (workdir {FLAGS.study_dir})")
    return 0


def write_outputs(store, cfg, out: Path, command: str, wall: float, timing: dict) -> None:
    from tdae_jax.data import io as dio
    from tdae_jax.evaluate import study, study_report, study_timing

    assets = out.parent / out.stem
    assets.mkdir(parents=True, exist_ok=True)
    grid = study.cells(cfg)
    dio.atomic_write_bytes(assets / "cells.csv", study_report.csv_text(store, cfg, grid).encode())
    for threat in cfg.threats:
        study_report.plot(store, cfg, threat, grid, assets / f"{cfg.world}_{threat}.png")
    header = study_report.header(store, cfg, command, wall, assets.name)
    extra = study_timing.table(timing) if timing else ""
    dio.atomic_write_bytes(out, study_report.page(store, cfg, header, extra).encode())


def run_cli(argv: list[str]) -> int:
    """In-process run of ``argv`` (tests)."""
    return common.run_cli(main, argv)


if __name__ == "__main__":
    common.run_main(main)
