"""Host objectives: pure per-image losses to minimize, ``loss_fn(delta, batch, emb, keys) -> [B]``.

``make_objective(name, surrogate, cfg)`` is the registry the experiments use. Names:
``pge`` (PhotoGuard encoder, targeted), ``pge_untargeted``, ``pgd`` (PhotoGuard diffusion attack),
``advdm``, ``eps_discrepancy`` (TDAE's standalone L_std), ``tdae_v1``, ``sds``, ``mist``, ``ace``, ``sa``.
"""
from __future__ import annotations

from tdae_jax.configs import Objective
from tdae_jax.objectives import diffusion, photoguard, semantic_attention

# name -> (factory, needs text conditioning, needs a random start (zero gradient at delta = 0))
_REGISTRY = {
    "pge": (lambda s, c: photoguard.make_encoder(s, c, targeted=True), False, False),
    "pge_untargeted": (lambda s, c: photoguard.make_encoder(s, c, targeted=False), False, True),
    "pgd": (photoguard.make_diffusion, True, False),
    "advdm": (diffusion.make_advdm, True, False),
    "eps_discrepancy": (diffusion.make_advdm, True, False),
    "tdae_v1": (diffusion.make_tdae_v1, True, False),
    "sds": (diffusion.make_sds, True, False),
    "mist": (diffusion.make_mist, True, False),
    "ace": (diffusion.make_ace, True, False),
    "sa": (semantic_attention.make_sa, True, False),
}

NAMES = tuple(_REGISTRY)


def make_objective(name: str, surrogate, cfg: Objective | None = None):
    """Returns the per-image loss function to minimize for host ``name`` on ``surrogate``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(NAMES)}")
    return _REGISTRY[name][0](surrogate, cfg or Objective(name=name))


def uses_text(name: str) -> bool:
    return _REGISTRY[name][1]


def needs_random_start(name: str) -> bool:
    return _REGISTRY[name][2]
