"""The immunizer's training loop: the pure step of ``train.py`` compiled once over a data mesh, orbax
checkpoints every K steps, and resumption that is bit-identical to an uninterrupted run.

- Sharding (docs/design.md convention 5): ``jax.jit`` with explicit ``NamedSharding``s; the batch is split over
  the mesh's ``data`` axis, the training state, the base key and the model (surrogate) are replicated. The
  state is donated. A batch must have a multiple of the data-axis size rows (refused otherwise).
- Keys: the base key travels as raw ``uint32`` key data (as ``protect.Protector`` does) and is wrapped inside
  the step; every draw derives from (image uid, step) (``prng.image_keys``), so a resumed run, another device
  count or another batch layout draws the same noise.
- Resumption: ``checkpoint.UnitCheckpointer`` saves the whole ``TrainState`` (parameters, adam moments, step)
  plus the metric history every ``every`` steps and at the end; a restart restores the latest one with the
  replicated shardings and continues from its step. The batch of step n is a pure function of n (the caller's
  ``batch_at``), so the continued run replays exactly the steps the killed one had left.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from tdae_jax import checkpoint
from tdae_jax.immunizer import train as train_lib
from tdae_jax.parallel import mesh as meshlib


class Trainer:
    """``init(key) -> TrainState`` and ``step(state, batch, key) -> (state, metrics)``, compiled and sharded.

    ``model``: the pytree ``make_loss`` reads (the surrogate), placed once, replicated over ``mesh``.
    """

    def __init__(self, cfg: train_lib.TrainConfig, make_loss: Callable, mesh: Mesh, model: Any = None):
        self.cfg, self.mesh = cfg, mesh
        self.data = meshlib.batch_sharding(mesh)
        self.repl = meshlib.replicated(mesh)
        self.model = meshlib.replicate(model, mesh) if model is not None else None
        self.step_fn = train_lib.make_train_step(cfg, make_loss)
        step = lambda st, b, kd, m: self.step_fn(st, b, jax.random.wrap_key_data(kd), m)  # noqa: E731
        self._step = jax.jit(step, in_shardings=(self.repl, self.data, self.repl, self.repl),
                             out_shardings=(self.repl, self.repl), donate_argnums=0)
        self._init = jax.jit(lambda kd: train_lib.init_state(cfg, jax.random.wrap_key_data(kd)),
                             out_shardings=self.repl)

    def init(self, key: jax.Array) -> train_lib.TrainState:
        return self._init(jax.random.key_data(key))

    def abstract_state(self) -> Any:
        """``ShapeDtypeStruct`` pytree of the state with its (replicated) shardings: the restore target."""
        shape = jax.eval_shape(lambda: train_lib.init_state(self.cfg, jax.random.key(0)))
        return checkpoint.abstract_like(shape, jax.tree.map(lambda _: self.repl, shape))

    def step(self, state, batch: dict, key: jax.Array):
        rows = len(batch["uid"])
        if rows % meshlib.data_size(self.mesh):
            raise ValueError(f"batch of {rows} rows does not split over the {meshlib.data_size(self.mesh)} "
                             "devices of the data axis: use a multiple of the device count")
        batch = meshlib.shard_batch({k: np.asarray(v) for k, v in batch.items()}, self.mesh)
        return self._step(state, batch, jax.random.key_data(key), self.model)


def fit(trainer: Trainer, batch_at: Callable[[int], dict], steps: int, key: jax.Array, *,
        ckpt: checkpoint.UnitCheckpointer | None = None, meta: dict | None = None,
        on_step: Callable[[int, dict], None] | None = None):
    """Train to ``steps`` steps, resuming from ``ckpt``'s latest checkpoint (``ValueError`` if it has another
    ``meta["fingerprint"]``: a training of other settings is never continued). ``batch_at(n)``: the batch of
    step n (0-based), a pure function of n.

    Returns ``(state, history, start)``: the final ``TrainState``, ``{metric: [float per step]}`` for every
    step of the run (the restored ones included) and the step it resumed from (0: a fresh run).
    ``on_step(n, metrics)`` after each step (n = steps done).
    """
    meta = dict(meta or {})
    state, start, history = None, 0, {}
    if ckpt is not None and ckpt.enabled:
        restored = ckpt.restore(trainer.abstract_state(), expect_meta=meta)
        if restored is None and ckpt.latest_step() is not None:
            raise ValueError(f"{ckpt.directory} holds the checkpoint of a training with other settings: not "
                             "resumed (use another directory)")
        if restored is not None:
            start, state, saved = restored
            history = {k: list(v) for k, v in saved.get("history", {}).items()}
    if state is None:
        state = trainer.init(key)
    t0 = time.perf_counter()
    for n in range(start, steps):
        state, m = trainer.step(state, batch_at(n), key)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        for k, v in m.items():
            history.setdefault(k, []).append(v)
        if on_step is not None:
            on_step(n + 1, {**m, "elapsed": time.perf_counter() - t0, "start": start})
        if ckpt is not None and ckpt.enabled:
            ckpt.maybe_save(n + 1, state, {**meta, "history": history}, force=n + 1 == steps)
    return state, history, start
