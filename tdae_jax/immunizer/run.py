"""A training run of the immunizer, the library side of ``python -m experiments.immunizer train``.

``validate(spec)`` refuses every bad combination before anything is read or written (:class:`UsageError`:
the command exits 2 with its one-line message); so does ``preflight`` for a workdir whose ``config.json`` records
other settings. ``train(spec)`` loads the surrogate, builds the miniature-world pool (``data.py``), compiles the
step over the data mesh (``trainer.py``), trains with orbax checkpoints under ``<workdir>/ckpt`` (re-running the
same command resumes; a longer ``--train_steps`` continues a shorter run) and writes into ``<workdir>``:
``config.json`` (the settings), ``git_revision.txt``, ``curves.json`` (every metric per step), ``training.json``
(steps, wall time, machine) and the trained network (``protect.save``: ``immunizer.msgpack`` +
``immunizer.json``), which ``experiments.immunizer protect`` reads.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import jax

from tdae_jax import checkpoint, configs, objectives, prng
from tdae_jax.data import io as dio
from tdae_jax.immunizer import protect as protect_lib
from tdae_jax.immunizer import train as train_lib
from tdae_jax.runs.errors import UsageError
from tdae_jax.runs.workdir import git_revision


FAMILIES = ("ip2p", "sd")  # the miniature world's editors: instruction-driven (ip2p) or caption-driven (sd)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Everything a training run depends on (all of it goes into ``config.json`` and the resume fingerprint)."""

    workdir: str
    train: train_lib.TrainConfig = train_lib.TrainConfig()
    objective: configs.Objective = configs.Objective(name="pgd")
    surrogate: str = "ip2p"
    weights_dir: str = ""  # "" = the tiny random surrogate of the family (tests)
    steps: int = 100
    batch_size: int = 8
    seed: int = 0
    world_seed: int = 5151
    pool: int = 512
    size: int = 32
    kinds: tuple[str, ...] = ("recolour", "remove")
    objects: int = 2
    num_devices: int | None = None
    ckpt_every: int = 50
    log_every: int = 10


def validate(spec: TrainSpec, data_devices: int) -> None:
    """Usage errors of the settings themselves (pure)."""
    name, dpd = spec.objective.name, spec.train.dpd
    if name not in objectives.NAMES:
        raise UsageError(f"--objective must be one of {', '.join(objectives.NAMES)}, got {name!r}")
    if spec.surrogate not in FAMILIES:
        raise UsageError(f"--surrogate={spec.surrogate}: the miniature world's editors are {' and '.join(FAMILIES)}")
    if dpd.enabled and not objectives.uses_text(name):
        raise UsageError(f"DPD: objective {name!r} does not use the text condition (DPD would be a no-op); "
                         "use --defense=fdm or none")
    if spec.steps < 1 or spec.batch_size < 1 or spec.pool < 1 or spec.objects < 1:
        raise UsageError("--train_steps, --batch_size, --train_pool and --train_objects must be >= 1")
    if spec.batch_size % data_devices:
        raise UsageError(f"--batch_size={spec.batch_size} does not split over the {data_devices} devices of the "
                         "data axis: use a multiple of it (or --num_devices)")
    if spec.size % 8:
        raise UsageError(f"--train_size={spec.size} must be a multiple of 8 (the surrogate's VAE)")
    if spec.world_seed in (0, 1, 2, 10, 11, 12, 1000, 2000, 4242, 9090, 31337):
        raise UsageError(f"--train_world_seed={spec.world_seed} is a seed of the editors' training, the tests or "
                         "the study: pick a disjoint one (e.g. 5151)")


def load_surrogate(spec: TrainSpec):
    from tdae_jax import models
    from tdae_jax.miniature import shipped

    try:
        if not spec.weights_dir:
            return models.tiny(spec.surrogate)
        wd = spec.weights_dir
        if wd.startswith("miniature:"):
            wd = str(shipped.path(wd.split(":", 1)[1]))
        return models.load(spec.surrogate, wd)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load surrogate {spec.surrogate!r} from {spec.weights_dir}: {e}") from e


def train(spec: TrainSpec, progress: Callable[[str], None] = print) -> dict:
    """Train (or resume) the immunizer of ``spec``; returns ``{"steps", "resumed_from", "final": metrics}``."""
    from tdae_jax.immunizer import data as data_lib
    from tdae_jax.immunizer import trainer as trainer_lib
    from tdae_jax.parallel import mesh as meshlib

    try:
        mesh = meshlib.make_mesh(spec.num_devices)
    except ValueError as e:
        raise UsageError(f"--num_devices: {e}") from e
    validate(spec, meshlib.data_size(mesh))
    workdir, settings = Path(spec.workdir), dataclasses.asdict(spec)
    same = trajectory_settings(settings)
    preflight(workdir, same)
    sur = load_surrogate(spec)
    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    dio.atomic_write_bytes(workdir / "config.json", json.dumps(settings, indent=1, default=str).encode())
    (workdir / "git_revision.txt").write_text(git_revision() + "\n")
    pool = data_lib.WorldPool(sur, spec.world_seed, spec.pool, spec.size, spec.kinds, spec.objects,
                              prompt="instruction" if spec.surrogate == "ip2p" else "edited_caption")
    obj = spec.objective
    tr = trainer_lib.Trainer(spec.train, lambda s: objectives.make_objective(obj.name, s, obj), mesh, sur)
    ckpt = checkpoint.UnitCheckpointer(workdir / "ckpt", spec.ckpt_every) if spec.ckpt_every > 0 else None
    state, history, start = trainer_lib.fit(tr, lambda n: pool.batch_at(n, spec.batch_size), spec.steps,
                                            prng.base_key(spec.seed), ckpt=ckpt,
                                            meta={"fingerprint": checkpoint.fingerprint(same)},
                                            on_step=_logger(spec, progress))
    if ckpt is not None:
        ckpt.close()
    curves = {k: [v if v == v else None for v in vs] for k, vs in history.items()}  # NaN -> null
    dio.atomic_write_bytes(workdir / "curves.json", json.dumps(curves).encode())
    protect_lib.save(workdir, spec.train.net, state.params)
    _write_training_record(workdir, spec, start, time.perf_counter() - t0)
    return {"steps": spec.steps, "resumed_from": start or None,
            "final": {k: v[-1] for k, v in history.items() if v}}


def trajectory_settings(settings: dict) -> dict:
    """What the trajectory depends on: not where it is written, how long it runs, how often it is saved or logged,
    nor the device count (a longer run continues a shorter one; sharded == unsharded)."""
    skip = ("workdir", "steps", "ckpt_every", "log_every", "num_devices")
    return json.loads(json.dumps({k: v for k, v in settings.items() if k not in skip}, default=str))


def preflight(workdir: Path, same: dict) -> None:
    """Read-only: ``UsageError`` for a workdir that is a file or holds a training of other settings."""
    if workdir.exists() and not workdir.is_dir():
        raise UsageError(f"workdir {workdir} exists and is not a folder")
    old_path = workdir / "config.json"
    if not old_path.is_file():
        return
    try:
        old = trajectory_settings(json.loads(old_path.read_text()))
    except (OSError, ValueError) as e:
        raise UsageError(f"{old_path}: unreadable ({e}); use another --workdir") from e
    diff = sorted(k for k in set(old) | set(same) if old.get(k) != same.get(k))
    if diff:
        raise UsageError(f"workdir {workdir} holds a training with other settings ({', '.join(diff)} differ); "
                         "re-run with the original settings to resume, or use another --workdir")


def _write_training_record(workdir: Path, spec: TrainSpec, start: int, seconds: float) -> None:
    """``training.json``: steps, wall time (summed over resumptions), machine, revision."""
    path, wall = workdir / "training.json", seconds
    if start and path.is_file():
        wall += float(json.loads(path.read_text()).get("wall_seconds", 0.0))
    record = {"steps": spec.steps, "resumed_from": start or None, "wall_seconds": round(wall, 1),
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "devices": [str(d) for d in jax.devices()],
                          "jax": jax.__version__},
              "git_revision": git_revision()}
    dio.atomic_write_bytes(path, json.dumps(record, indent=1).encode())


def _logger(spec: TrainSpec, progress):
    first = {}  # elapsed time after this run's first step (which includes compilation)

    def on_step(n, m):
        first.setdefault("t", (n, m["elapsed"]))
        n1, t1 = first["t"]
        rate = f"{(m['elapsed'] - t1) / (n - n1):.3f} s/step" if n > n1 else "compiling"
        if n == n1 or n % spec.log_every == 0 or n == spec.steps:
            progress(f"step {n}/{spec.steps} loss={m['loss']:.5g} objective={m['objective']:.5g} "
                     f"grad_norm={m['grad_norm']:.3g} dpd/round={m['dpd/round']:.0f} ({rate}; first step "
                     f"{t1:.1f} s with compilation)")

    return on_step
