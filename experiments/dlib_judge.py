"""Judge protected face photos with dlib's own face pipeline (detector, 5-point landmarks, 128-d descriptor).

    python -m experiments.dlib_judge --protected=runs/dladiff --clean=ids/n000050/set_B

Every ``<protected>/protected/<id>.png`` written by a protection run (experiments.dladiff, experiments.tdae) is
compared with its clean photo in ``--clean`` (the file the run named ``<id>``): dlib re-detects the face and its
landmarks on both, and the row gives the descriptor distance (dlib: < 0.6 = the same person), the cosine and the
PSNR. Writes ``--judge_csv`` (default ``<protected>/dlib_judge.csv``) and prints one summary line. An image
without a detectable face is a ``no_face`` row. Exit code: 0 every image judged (faces found or not), 1 some
inputs failed (each named on stderr; the others are judged), 2 usage error (one line, nothing written).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
COMMAND = "experiments.dlib_judge"

flags.DEFINE_string("protected", "", "Workdir of a protection run (its protected/<id>.png are judged).")
flags.DEFINE_string("clean", "", "Folder, glob or file of the clean photos (the run's --images; pkg:samples = "
                    "the shipped samples).")
flags.DEFINE_string("judge_csv", "", "Output CSV; empty = <protected>/dlib_judge.csv.")
common.help_groups(COMMAND, {"inputs": ["protected", "clean"], "output": ["judge_csv"]})


def _plan(F):
    """``(pairs, csv path)``; ``ValueError``: a usage error (nothing is written)."""
    from tdae_jax.data import io as dio
    from tdae_jax.evaluate import dlib_judge
    from tdae_jax.metrics import dlib_face

    if not F.protected or not F.clean:
        raise ValueError(f"--protected and --clean are required, e.g. python -m {COMMAND} "
                         "--protected=runs/dladiff --clean=<the run's --images>")
    if not Path(F.protected).is_dir():
        raise ValueError(f"--protected={F.protected}: not a folder")
    items = dlib_judge.pairs(F.protected, common.resolve_package_path(F.clean))
    out = Path(F.judge_csv or Path(F.protected) / "dlib_judge.csv")
    if not out.parent.is_dir():
        raise ValueError(f"--judge_csv={out}: the folder {out.parent} does not exist")
    try:
        dio.check_output_dir(out.parent, [p for _, _, p in items if p is not None])
        dlib_judge.check_available()
    except (dio.DataError, dlib_face.DlibUnavailable) as e:
        raise ValueError(str(e)) from e
    return items, out


def main(argv):
    """Flags -> pairs -> dlib rows -> CSV + summary; usage errors (exit 2) before anything is written."""
    if len(argv) > 1:
        return common.usage_error(f"unexpected arguments: {argv[1:]}")
    from tdae_jax.data import io as dio
    from tdae_jax.evaluate import dlib_judge

    try:
        items, out = _plan(FLAGS)
    except ValueError as e:
        return common.usage_error(e)
    rows = dlib_judge.judge(items, progress=logging.getLogger("tdae_jax").info)
    try:
        dio.atomic_write_bytes(out, dlib_judge.to_csv(rows).encode())
    except OSError as e:
        return common.run_error(f"{out}: cannot write ({e})")
    print(f"{dlib_judge.summary(rows)}; rows in {out}")
    failed = [r for r in rows if r["status"] == "failed"]
    for r in failed:
        print(f"FAILED {r['note']}", file=sys.stderr)
    return 1 if failed else 0


def run_cli(argv: list[str]) -> int:
    """In-process run of ``argv`` (tests); see ``common.run_cli``."""
    return common.run_cli(main, argv)


if __name__ == "__main__":
    common.run_main(main)
