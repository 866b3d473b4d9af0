r"""Protect images against diffusion-based editing (TDAE and its hosts/baselines).

    python -m experiments.tdae --flagfile=experiments/flags/quickstart.flags
    python -m experiments.tdae --images=photos/ --workdir=runs/x --weights_dir=/models/ip2p \
        --surrogate=ip2p --objective=pgd --defense=tdae --eps=0.03 --steps=100

--images is required (the quickstart names the shipped miniature scenes); --weights_dir is required above
64 px (--weights_dir=tiny: the built-in random tiny model, plumbing only).
Exit code: 0 every input protected, 1 some inputs failed (the others are done) or the run itself failed (one
line), 2 usage error (one line, nothing written). Re-running the same command with the same --workdir resumes
(done images are skipped; an interrupted batch restarts from its last orbax checkpoint when --ckpt_every > 0).
"""
from __future__ import annotations

import logging
from pathlib import Path

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
common.define_protect_flags()


QUICKSTART = "python -m experiments.tdae --flagfile=experiments/flags/quickstart.flags (the shipped miniature scenes)"


def main(argv):
    """Flags -> ``pipeline.RunConfig`` -> ``pipeline.run``; every usage error (exit 2) comes before anything is
    read or written: the flag values (``pipeline.validate``), then ``--images`` and ``--weights_dir``."""
    if len(argv) > 1:
        return common.usage_error(f"unexpected arguments: {argv[1:]}")
    from tdae_jax import pipeline
    from tdae_jax.parallel import multihost
    from tdae_jax.runs import errors

    try:
        proc = multihost.initialize(FLAGS.multihost, FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
        cfg = common.run_config_from_flags(FLAGS)
        pipeline.validate(cfg)
        common.require_images(FLAGS, QUICKSTART)
        common.require_weights(FLAGS)
    except (ValueError, TypeError) as e:  # pipeline.UsageError is a ValueError
        return common.usage_error(e)
    log = logging.getLogger("tdae_jax").info
    log(f"{cfg.surrogate} surrogate from {FLAGS.weights_dir or common.TINY}: loading it, then compiling the "
        "protection step (the first progress line includes the compilation)")
    try:
        result = pipeline.run(cfg, progress=log)
        if proc.is_main:
            common.write_flagfile(FLAGS, Path(cfg.workdir) / "flags.flags")
    except pipeline.UsageError as e:
        return common.usage_error(e)
    except pipeline.RunError as e:  # the workdir became unwritable: the run stops, re-running resumes
        return common.run_error(e)
    except OSError as e:  # flags.flags could not be written
        return common.run_error(errors.write_failure(cfg.workdir, "flags.flags", e))
    return common.summarize(result, cfg.workdir, f"[process {proc.index}/{proc.count}] " if proc.count > 1 else "")


def run_cli(argv: list[str]) -> int:
    """In-process run of ``argv`` (tests); see ``common.run_cli``."""
    return common.run_cli(main, argv)


if __name__ == "__main__":
    common.run_main(main)
