"""Runs a defense's pure step over a batch: compiled once, sharded over the mesh, checkpointed.

``Protector`` binds a defense's step to a mesh. It is given ``build(model) -> (init_fn, step_fn)`` (e.g. the
objective made from the surrogate, then ``defenses.tdae.make_step``) and the ``model`` (the surrogate: a pytree);
``build`` is called inside the trace, so the model is an *argument* of the compiled step with explicit shardings,
as maxdiffusion passes its UNet state to ``jax.jit`` (AI-Hypercomputer/maxdiffusion ``generate.py``): replicated,
or each weight's own ``NamedSharding`` when it lives on the step's mesh (``SD3.shard``: split over ``"model"``).
Weights are never constants of the program (a plain closure would embed 3.4 GB of SD-1.5 weights in the HLO and
gather a model-split surrogate back onto every device). The batch axis of every array is split over ``"data"``;
the state is donated. Batches are always padded to ``batch_size`` rows (a multiple of the device count), so the
step traces once for the whole run; padding rows never reach an output.

``run(batch, steps)`` loops the compiled step, records per-image loss curves, saves an orbax checkpoint
every ``ckpt_every`` iterations and resumes from the latest one (checkpoint.py).

Metrics stay on the device between progress reports: the loop keeps each step's metric arrays (futures of the
asynchronous dispatch) and fetches them to the host in one go at the first iteration of a call (compilation is
over: a progress line says so), every ``log_every`` iterations, before each checkpoint (whose metadata holds the
history so far) and at the end, as google/flax ``examples/imagenet/train.py`` ``train_and_evaluate`` collects
``train_metrics`` and calls ``common_utils.get_metrics`` every ``log_every_steps``. The values, and so
checkpoint/resume, are unchanged: only when the host waits for them is.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tdae_jax import checkpoint
from tdae_jax.parallel import mesh as meshlib
from tdae_jax.parallel import multihost

BATCH_FIELDS = ("delta", "text_delta")  # ProtectState (defenses/pgd.py): per-image arrays, batch-major
SCALAR_FIELDS = ("step",)
OPT_FIELDS = ("opt_state", "dpd_opt_state")  # optax states of the batch-major fields above


def state_specs(state: Any, data_axis: str = "data") -> Any:
    """``PartitionSpec`` of every leaf of a ``ProtectState`` (defenses/pgd.py), by field, not guessed from shapes.

    ``delta``/``text_delta`` are ``[B, ...]``: ``P(data)``; ``step`` is a scalar: ``P()``. The optax states hold
    per-parameter moments (shaped like ``delta``/``text_delta``: ``P(data)``) and step counters (scalars: ``P()``),
    which is how optax lays out every transformation's state.
    """
    fields = getattr(state, "_fields", None)
    known = set(BATCH_FIELDS) | set(SCALAR_FIELDS) | set(OPT_FIELDS)
    if fields is None or set(fields) - known:
        raise TypeError(f"state_specs expects a ProtectState, got {type(state).__name__} with fields {fields}")

    def spec(name, value):
        if name in BATCH_FIELDS:
            return jax.tree.map(lambda a: P(data_axis), value)
        if name in SCALAR_FIELDS:
            return jax.tree.map(lambda a: P(), value)
        return jax.tree.map(lambda a: P() if getattr(a, "ndim", 0) == 0 else P(data_axis), value)

    return type(state)(*(spec(n, getattr(state, n)) for n in fields))


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` of every leaf of a ``ProtectState`` over ``mesh`` (:func:`state_specs`)."""
    axis = mesh.axis_names[0]
    return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state, axis),
                        is_leaf=lambda x: isinstance(x, P))


def fetch_metrics(pending: list[dict], n_valid: int) -> dict[str, list]:
    """Device -> host for the kept steps' metrics: name -> one ``[n_valid]`` list per step (this process's rows)."""
    out: dict[str, list] = {}
    for m in pending:
        for k, v in m.items():
            out.setdefault(k, []).append(np.asarray(multihost.local_rows(v))[:n_valid].astype(np.float32).tolist())
    return out


def model_shardings(model: Any, mesh: Mesh) -> Any:
    """Each leaf's own ``NamedSharding`` when it lives on ``mesh`` (``SD3.shard``), else replicated over ``mesh``."""
    repl = meshlib.replicated(mesh)

    def one(a):
        s = getattr(a, "sharding", None)
        return s if isinstance(s, NamedSharding) and s.mesh == mesh else repl

    return jax.tree.map(one, model)


def place_model(model: Any, shardings: Any) -> Any:
    """``model`` on ``shardings``; host or single-device values become global arrays (in a multi-process run
    every process holds the same weights and passes its own full copy)."""
    def one(a, s):
        if isinstance(a, jax.Array) and a.sharding == s:
            return a
        if s.spec == P() and jax.process_count() > 1:
            return jax.make_array_from_process_local_data(s, np.asarray(a))
        return jax.device_put(a, s)

    return jax.tree.map(one, model, shardings)


class Protector:
    """Compiled, sharded optimisation loop. ``batch_size`` is the *global* batch (all processes);
    each process passes its own ``local_batch_size`` rows to ``run`` (multihost.py).

    ``build(model) -> (init_fn, step_fn)`` with ``init_fn(batch, key) -> state`` and
    ``step_fn(state, batch, key) -> (state, metrics)`` (``defenses.tdae.make_step``); it is called inside the
    trace, with ``model`` a traced argument (module docstring). ``model`` may be None (a step that reads none).
    """

    def __init__(self, build: Callable[[Any], tuple[Callable, Callable]], model: Any, mesh: Mesh, batch_size: int):
        d = meshlib.data_size(mesh)
        self.proc = multihost.info()
        self.batch_size = max(d, -(-batch_size // d) * d)
        self.local_batch_size = self.batch_size // self.proc.count
        self.mesh = mesh
        self.model_sh = model_shardings(model, mesh)
        self.model = place_model(model, self.model_sh)
        # the base key travels as raw uint32 key data (a global, replicated array in multi-process runs)
        self._init_fn = lambda batch, kd, m: build(m)[0](batch, jax.random.wrap_key_data(kd))
        self._step_fn = lambda state, batch, kd, m: build(m)[1](state, batch, jax.random.wrap_key_data(kd))
        self._jit_step = None
        self._compiled: dict = {}  # working shapes -> (compiled step, jitted init, abstract state, state shardings)

    @staticmethod
    def _shape_key(batch: dict) -> tuple:
        return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items()))

    def _compile(self, batch: dict, key_data):
        """The step compiled ahead of time for ``batch``'s shapes (once per working shape), so its memory is known
        before it runs (:meth:`memory_analysis`); sets ``abstract_state`` / ``state_sh`` for that shape."""
        key = self._shape_key(batch)
        if key not in self._compiled:
            data_sh, repl = meshlib.batch_sharding(self.mesh), meshlib.replicated(self.mesh)
            abstract = jax.eval_shape(self._init_fn, batch, key_data, self.model)
            state_sh = state_shardings(abstract, self.mesh)
            self._jit_step = jax.jit(
                self._step_fn,
                in_shardings=(state_sh, data_sh, repl, self.model_sh),
                out_shardings=(state_sh, data_sh),  # metrics: per-image [B] arrays
                donate_argnums=0,
            )
            compiled = self._jit_step.lower(checkpoint.abstract_like(abstract, state_sh), batch, key_data,
                                            self.model).compile()
            jit_init = jax.jit(self._init_fn, in_shardings=(data_sh, repl, self.model_sh), out_shardings=state_sh)
            self._compiled[key] = (compiled, jit_init, abstract, state_sh)
        compiled, _, self.abstract_state, self.state_sh = self._compiled[key]
        return compiled

    def _init(self, batch, key_data):
        return self._compiled[self._shape_key(batch)][1](batch, key_data, self.model)

    def _step(self, state, batch, key_data):
        return self._compiled[self._shape_key(batch)][0](state, batch, key_data, self.model)

    def _place(self, batch: dict, n_valid: int, base_key: jax.Array) -> tuple[dict, Any]:
        """This process's rows padded and made global (sharded over ``data``), and the replicated key data."""
        padded, _ = self.pad(batch, max(n_valid, 1))
        padded = multihost.to_global(padded, meshlib.batch_sharding(self.mesh))
        return padded, multihost.to_global(np.asarray(jax.random.key_data(base_key)), meshlib.replicated(self.mesh))

    def memory_analysis(self, batch: dict, base_key: jax.Array):
        """XLA's compiled memory analysis of the step (per device) for ``batch``'s working shape, compiling the step
        the run will use (``run`` reuses it). ``batch``: one row is enough (it is padded to the batch size)."""
        padded, key_data = self._place(batch, 1, base_key)
        return self._compile(padded, key_data).memory_analysis()

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
        log_every: int = 1,
    ):
        """Optimise this process's (unpadded) rows of one global batch for ``steps`` iterations.

        Every process must call ``run`` the same number of times with the same ``steps`` (SPMD); a process
        with no rows left passes ``n_valid=0`` and a dummy row. Returns ``(delta [n,H,W,3] np.float32,
        history: dict name -> [n, steps] np.float32, resumed_from)`` for this process's rows.

        ``on_iter(iteration, {"loss": [n], "elapsed", "done_here"})`` runs when the metrics are fetched: at the
        first iteration of this call, every ``log_every`` iterations and at the last (module docstring).
        """
        padded, key_data = self._place(batch, n_valid, base_key)
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
        t0, pending = time.perf_counter(), []
        saving = ckpt is not None and ckpt.enabled
        for i in range(start, steps):
            state, m = self._step(state, padded, key_data)
            pending.append(m)  # device arrays: no wait here
            it = i + 1
            report = on_iter is not None and (it == start + 1 or it % max(log_every, 1) == 0)
            save = saving and it < steps and it % ckpt.every == 0
            if report or save or it == steps:
                for k, rows in fetch_metrics(pending, n_valid).items():
                    history.setdefault(k, []).extend(rows)
                pending = []
                if on_iter is not None and (report or it == steps):
                    on_iter(it, {"loss": np.asarray(history["loss"][-1], np.float32),
                                 "elapsed": time.perf_counter() - t0, "done_here": it - start})
            if save:
                ckpt.maybe_save(it, state, {**meta, "history": history})
        delta = multihost.local_rows(state.delta)[:n_valid]
        hist = {k: np.asarray(v, np.float32).reshape(len(v), n_valid).T for k, v in history.items()}
        return delta, hist, resumed_from
