"""Host objectives: pure per-image losses to minimize, ``loss_fn(delta, batch, emb, keys) -> [B]``.

``make_objective(name, surrogate, cfg)`` is the registry the experiments use; its names are :data:`NAMES`
and its columns say what each host reads (:func:`uses_text`: the text condition, which DPD perturbs;
:func:`accepts_target`: ``Objective.target``, one of :data:`TARGETS`). Help strings, the ``Objective``
docstring and the flagfile comments name hosts and targets from here (tests/test_flagfiles.py checks them).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from tdae_jax.configs import Objective
from tdae_jax.objectives import diffusion, photoguard, semantic_attention

TARGETS = photoguard.TARGETS  # --target values (common.target_image; "zero" = the default)


class Host(NamedTuple):
    """One registry row. ``accepts_target`` defaults to False: a host reads ``Objective.target`` only if it says so."""

    factory: Callable
    uses_text: bool  # reads the text condition (emb): DPD has something to act on
    random_start: bool  # zero gradient at delta = 0: needs a random start
    accepts_target: bool = False  # reads Objective.target (--target, one of TARGETS)


# name -> (factory, uses text, needs a random start[, accepts --target]); rows become Host below
_ROWS = {
    "pge": (lambda s, c: photoguard.make_encoder(s, c, targeted=True), False, False, True),
    "pge_untargeted": (lambda s, c: photoguard.make_encoder(s, c, targeted=False), False, True),
    "pgd": (photoguard.make_diffusion, True, False, True),
    "advdm": (diffusion.make_advdm, True, False),
    "eps_discrepancy": (diffusion.make_advdm, True, False),
    "tdae_v1": (diffusion.make_tdae_v1, True, False),
    "sds": (diffusion.make_sds, True, False),
    # SDS(-) under its explicit name (= "sds") and SDS(+) (Diff-Protect g_mode "-" / "+"; objectives/diffusion.py)
    "sds_minus": (diffusion.make_sds, True, False),
    "sds_plus": (diffusion.make_sds_plus, True, False),
    "mist": (diffusion.make_mist, True, False),
    "ace": (diffusion.make_ace, True, False),
    "sa": (semantic_attention.make_sa, True, False),
}
_REGISTRY = {name: Host(*row) for name, row in _ROWS.items()}

NAMES = tuple(_REGISTRY)


def make_objective(name: str, surrogate, cfg: Objective | None = None):
    """Returns the per-image loss function to minimize for host ``name`` on ``surrogate``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(NAMES)}")
    return _REGISTRY[name][0](surrogate, cfg or Objective(name=name))


def uses_text(name: str) -> bool:
    return _REGISTRY[name].uses_text


def needs_random_start(name: str) -> bool:
    return _REGISTRY[name].random_start


def accepts_target(name: str) -> bool:
    """Whether host ``name`` reads ``Objective.target`` (the others ignore it: a non-default value is refused)."""
    return _REGISTRY[name].accepts_target
