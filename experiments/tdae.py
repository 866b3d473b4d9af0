r"""Protect images against diffusion-based editing (TDAE and its hosts/baselines).

    python -m experiments.tdae --flagfile=experiments/flags/quickstart.flags
    python -m experiments.tdae --images=photos/ --workdir=runs/x --weights_dir=/models/ip2p \
        --surrogate=ip2p --objective=pgd --defense=tdae --eps=0.03 --steps=100

Exit code: 0 every input protected, 1 some inputs failed (the others are done), 2 usage error.
Re-running the same command with the same --workdir resumes (done images are skipped; an interrupted
batch restarts from its last orbax checkpoint when --ckpt_every > 0).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
common.define_protect_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from tdae_jax import pipeline
    from tdae_jax.parallel import multihost

    try:
        proc = multihost.initialize(FLAGS.multihost, FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
        cfg = common.run_config_from_flags(FLAGS)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = pipeline.run(cfg, progress=logging.getLogger("tdae_jax").info)
    except pipeline.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if proc.is_main:
        common.write_flagfile(FLAGS, Path(cfg.workdir) / "flags.flags")
    return common.summarize(result, cfg.workdir, f"[process {proc.index}/{proc.count}] " if proc.count > 1 else "")


def run_cli(argv: list[str]) -> int:
    """In-process run of ``argv`` (tests); see ``common.run_cli``."""
    return common.run_cli(main, argv)


if __name__ == "__main__":
    common.run_main(main)
