"""Runs a defense's pure step over a batch: compiled once, sharded over the mesh, checkpointed.

``Protector`` binds a step function (``defenses.tdae.make_step``) to a mesh: the batch axis of every
array is split over ``"data"``, the surrogate params (closed over by the objective) are hoisted into
arguments of the compiled step (parallel/hoist.py: replicated, or split over ``"model"`` when the
surrogate was placed so), the state is donated. Batches are always padded to ``batch_size`` rows (a multiple of the device
count), so the step traces once for the whole run; padding rows never reach an output.

``run(batch, steps)`` loops the compiled step, records per-image loss curves, saves an orbax checkpoint
every ``ckpt_every`` iterations and resumes from the latest one (checkpoint.py).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from tdae_jax import checkpoint
from tdae_jax.parallel import hoist
from tdae_jax.parallel import mesh as meshlib
from tdae_jax.parallel import multihost


def state_shardings(state: Any, batch_rows: int, mesh: Mesh) -> Any:
    """Batch-leading arrays sharded over ``data``, everything else (counters, scalars) replicated."""
    b, r = meshlib.batch_sharding(mesh), meshlib.replicated(mesh)
    return jax.tree.map(lambda a: b if getattr(a, "ndim", 0) >= 1 and a.shape[0] == batch_rows else r, state)


class Protector:
    """Compiled, sharded optimisation loop. ``batch_size`` is the *global* batch (all processes);
    each process passes its own ``local_batch_size`` rows to ``run`` (multihost.py)."""

    def __init__(self, init_fn: Callable, step_fn: Callable, mesh: Mesh, batch_size: int):
        d = meshlib.data_size(mesh)
        self.proc = multihost.info()
        self.batch_size = max(d, -(-batch_size // d) * d)
        self.local_batch_size = self.batch_size // self.proc.count
        self.mesh = mesh
        # the base key travels as raw uint32 key data (a global, replicated array in multi-process runs)
        self._init_fn = lambda batch, kd: init_fn(batch, jax.random.wrap_key_data(kd))
        self._step_fn = lambda state, batch, kd: step_fn(state, batch, jax.random.wrap_key_data(kd))
        self._step = None
        self._init = None

    def _compile(self, batch: dict, key_data):
        if self._step is not None:
            return
        data_sh = meshlib.batch_sharding(self.mesh)
        repl = meshlib.replicated(self.mesh)
        batch_sh = data_sh  # a pytree prefix: every batch leaf is split over "data"
        abstract = jax.eval_shape(self._init_fn, batch, key_data)
        self.state_sh = state_shardings(abstract, self.batch_size, self.mesh)
        # the surrogate's weights are closed over: pass them as arguments (hoist.py), with their own shardings
        spec = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)  # noqa: E731
        init_h, init_c = hoist.hoist(self._init_fn, spec(batch), spec(key_data))
        step_h, step_c = hoist.hoist(self._step_fn, abstract, spec(batch), spec(key_data))
        init_sh, step_sh = hoist.const_shardings(init_c, self.mesh), hoist.const_shardings(step_c, self.mesh)
        self._init_consts, self._step_consts = hoist.place(init_c, init_sh), hoist.place(step_c, step_sh)
        jit_init = jax.jit(init_h, in_shardings=(batch_sh, repl, *init_sh), out_shardings=self.state_sh)
        jit_step = jax.jit(
            step_h,
            in_shardings=(self.state_sh, batch_sh, repl, *step_sh),
            out_shardings=(self.state_sh, data_sh),  # metrics: per-image [B] arrays
            donate_argnums=0,
        )
        self._init = lambda b, kd: jit_init(b, kd, *self._init_consts)
        self._step = lambda st, b, kd: jit_step(st, b, kd, *self._step_consts)
        self._jit_step = jit_step
        self.abstract_state = abstract

    def pad(self, batch: dict, n: int) -> tuple[dict, np.ndarray]:
        """Pad this process's ``n`` rows to ``local_batch_size``."""
        return meshlib.pad_batch(batch, n, self.local_batch_size)

    def run(
        self,
        batch: dict,
        n_valid: int,
        steps: int,
        base_key: jax.Array,
        *,
        ckpt: checkpoint.UnitCheckpointer | None = None,
        meta: dict | None = None,
        on_iter: Callable[[int, dict], None] | None = None,
    ):
        """Optimise this process's (unpadded) rows of one global batch for ``steps`` iterations.

        Every process must call ``run`` the same number of times with the same ``steps`` (SPMD); a process
        with no rows left passes ``n_valid=0`` and a dummy row. Returns ``(delta [n,H,W,3] np.float32,
        history: dict name -> [n, steps] np.float32, resumed_from)`` for this process's rows.
        """
        padded, _ = self.pad(batch, max(n_valid, 1))
        padded = multihost.to_global(padded, meshlib.batch_sharding(self.mesh))
        key_data = multihost.to_global(np.asarray(jax.random.key_data(base_key)), meshlib.replicated(self.mesh))
        self._compile(padded, key_data)
        meta = dict(meta or {})
        history: dict[str, list] = {}
        start, resumed_from = 0, None
        state = None
        if ckpt is not None and ckpt.enabled:
            abstract = checkpoint.abstract_like(self.abstract_state, self.state_sh)
            restored = ckpt.restore(abstract, expect_meta=meta)
            if restored is not None:
                start, state, saved = restored
                history = {k: list(v) for k, v in saved.get("history", {}).items()}
                resumed_from = start
        if state is None:
            state = self._init(padded, key_data)
        t0 = time.perf_counter()
        for i in range(start, steps):
            state, m = self._step(state, padded, key_data)
            host = {k: multihost.local_rows(v) for k, v in m.items()}
            for k, v in host.items():
                history.setdefault(k, []).append(np.asarray(v)[:n_valid].astype(np.float32).tolist())
            if on_iter is not None:
                on_iter(i + 1, {"loss": np.asarray(host["loss"])[:n_valid], "elapsed": time.perf_counter() - t0,
                                "done_here": i + 1 - start})
            if ckpt is not None and ckpt.enabled and i + 1 < steps:
                ckpt.maybe_save(i + 1, state, {**meta, "history": history})
        delta = multihost.local_rows(state.delta)[:n_valid]
        hist = {k: np.asarray(v, np.float32).reshape(len(v), n_valid).T for k, v in history.items()}
        return delta, hist, resumed_from
