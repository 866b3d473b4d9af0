"""Closed-over model weights become arguments of the compiled step, not constants baked into it.

A defense's step closes over the surrogate (``objectives.make_objective(name, sur, ...)``), so under
``jax.jit`` every weight is a constant of the traced function. JAX 0.10 embeds such constants in the
lowered HLO (``jax_embedded_constants_max_bytes`` applies only with the transitional
``jax_use_simplified_jaxpr_constants``): the program carries a copy of the weights (3.4 GB for the SD-1.5
UNet + VAE in float32), compiles slowly, and every device gets a replicated copy whatever sharding the
weights had, so a model split over a ``"model"`` mesh axis (SD3.5-large) would be gathered back.

``hoist(fn, *example_args)`` traces ``fn`` once to a jaxpr and returns ``(fn_h, consts)``:
``fn_h(*args, *consts) == fn(*args)``, with every constant of at least ``min_bytes`` passed as a real
argument. ``const_shardings`` keeps each weight's own ``NamedSharding`` when it lives on the step's mesh
(``SD3.shard(mesh)``) and replicates the rest; ``place`` puts them there (multi-process aware).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def hoist(fn: Callable, *example_args: Any, min_bytes: int = 1024) -> tuple[Callable, list]:
    """``(fn_h, consts)`` with ``fn_h(*args, *consts) == fn(*args)`` for args shaped like ``example_args``
    (arrays or ``jax.ShapeDtypeStruct``). Constants under ``min_bytes`` stay embedded."""
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*example_args)
    out_tree = jax.tree.structure(out_shape)
    n_args = len(jax.tree.leaves(example_args))
    big = [i for i, c in enumerate(closed.consts) if _nbytes(c) >= min_bytes]
    small = {i: c for i, c in enumerate(closed.consts) if i not in set(big)}
    n_consts = len(closed.consts)

    def fn_h(*args_and_consts):
        args, hoisted = args_and_consts[: len(example_args)], args_and_consts[len(example_args):]
        flat = jax.tree.leaves(args)
        if len(flat) != n_args or len(hoisted) != len(big):
            raise TypeError(f"hoisted function expects {n_args} array leaves and {len(big)} constants, "
                            f"got {len(flat)} and {len(hoisted)}")
        given = dict(zip(big, hoisted))
        consts = [given[i] if i in given else small[i] for i in range(n_consts)]
        out = jax.core.eval_jaxpr(closed.jaxpr, consts, *flat)
        return jax.tree.unflatten(out_tree, out)

    return fn_h, [closed.consts[i] for i in big]


def _nbytes(c) -> int:
    try:
        dtype = np.dtype(getattr(c, "dtype", None) or np.result_type(c))
    except TypeError:  # extended dtypes (typed PRNG keys) stay embedded
        return 0
    return int(np.prod(np.shape(c), dtype=np.int64)) * dtype.itemsize


def const_shardings(consts: Sequence[Any], mesh: Mesh) -> tuple[NamedSharding, ...]:
    """A weight's own sharding when it is a ``NamedSharding`` on ``mesh``, else replicated over ``mesh``."""
    repl = NamedSharding(mesh, P())

    def one(c):
        s = getattr(c, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == mesh:
            return s
        return repl

    return tuple(one(c) for c in consts)


def place(consts: Sequence[Any], shardings: Sequence[NamedSharding]) -> list:
    """Put each constant on its sharding; host/single-device values become global replicated arrays (every
    process holds the same weights, so each passes its own full copy)."""
    out = []
    for c, s in zip(consts, shardings):
        if isinstance(c, jax.Array) and c.sharding == s:
            out.append(c)
        elif s.spec == P() and jax.process_count() > 1:
            out.append(jax.make_array_from_process_local_data(s, np.asarray(c)))
        else:
            out.append(jax.device_put(c, s))
    return out
