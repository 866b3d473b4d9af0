"""Frozen configs shared by the library and the experiment entry points.

Every value is in [0, 1] pixel units unless stated. Defaults follow ../shared/spec/TDAE.md §9 (the
paper where it speaks, the authors' v1 pseudo-code or the project default where it is silent); each
flagfile repeats them with their provenance.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Budget:
    """L_inf image budget. ``eps`` in [0,1] units (0.03 ~ 7.65/255, TDAE §9)."""

    eps: float = 0.03

    def __post_init__(self):
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps must be in (0, 1) (a fraction of the [0,1] range), got {self.eps}")


@dataclasses.dataclass(frozen=True)
class PGD:
    """Sign-PGD on the image (TDAE Eq. 2). ``step_size`` alpha in [0,1] units; ``steps`` N.

    ``step_decay='linear'`` reproduces PhotoGuard's a_i = a - (a - a/100) i/N schedule.
    ``random_start`` draws delta ~ U(-eps*random_start, eps*random_start) (TDAE §6.4 guard 3).
    """

    step_size: float = 0.005
    steps: int = 100
    step_decay: str = "none"  # none | linear
    random_start: float = 0.0


@dataclasses.dataclass(frozen=True)
class FDM:
    """FlatGrad Defense Mechanism (TDAE §III-C). mode: off | finite_difference | exact | exact_gog.

    ``beta`` = lambda/h (paper: 0.3); ``h`` the L2 probe radius (v1: 0.05). The exact modes use
    lambda_exact = beta*h (TDAE spec §6.3).
    """

    mode: str = "off"
    beta: float = 0.3
    h: float = 0.05

    @property
    def lam(self) -> float:
        return self.beta * self.h


@dataclasses.dataclass(frozen=True)
class TPA:
    """TPA flatness baseline (Fan et al. 2024, TPA Eq. 5/10); project defaults of TDAE spec §5."""

    enabled: bool = False
    n: int = 10
    b: float | None = None  # neighbourhood half-width; None = eps
    k: float = 0.05
    beta: float = 0.3  # lambda/k


@dataclasses.dataclass(frozen=True)
class DPD:
    """Dynamic Prompt Defense (TDAE Eq. 11): every ``period`` iterations, ``steps`` sign-descent steps
    of size ``step_size`` on the text embedding within ``eps`` (raw embedding units)."""

    enabled: bool = False
    period: int = 10
    steps: int = 20
    step_size: float = 2.0 / 255.0
    eps: float = 8.0 / 255.0
    clamp_to_range: bool = True  # v1's [min c, max c] clamp
    resample_noise: bool = False  # False: one key (one xi) for all M steps of a round; True: fresh per step
    # SD3 (TDAE spec §7, SD3.md §4): prompt_embeds = [CLIP rows 0:clip_tokens | T5 rows clip_tokens:]. With eps_t5
    # set, the T5 rows get their own budget eps_t5 (the CLIP rows keep eps), the range clamp is per segment,
    # and the CLIP rows' structural zero padding (channels 0 on every CLIP row of c) is never perturbed.
    # None: one budget eps for every row (SD1.x / IP2P behaviour).
    eps_t5: float | None = None
    clip_tokens: int = 77


@dataclasses.dataclass(frozen=True)
class Objective:
    """Which host loss and its knobs (see tdae_jax/objectives)."""

    name: str = "pge"  # pge | pge_targeted | pgd | advdm | sds | mist | ace | sa | eps_discrepancy | tdae_v1
    timesteps: int = 10  # K samples of (t, eps) per gradient (TDAE §9)
    denoise_steps: int = 4  # PhotoGuard diffusion attack K
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    mist_weight: float = 1e4
    target: str = "zero"  # zero | gray | pattern (targeted objectives)
    remat: bool = True
