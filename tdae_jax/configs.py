"""Frozen configs shared by the library and the experiment entry points.

Every value is in [0, 1] pixel units unless stated. Defaults follow the TDAE specification §9 (the
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
    lambda_exact = beta*h (Eq. 9's h -> 0 limit, defenses/fdm.py). ``finite_difference`` needs a float32 surrogate: with
    ``--dtype=bfloat16`` the per-pixel probe (h/sqrt(HWC), ~6e-5 at 512 px) is below bf16's resolution at the
    surrogate's first layer, so the command refuses it (``pipeline.validate``); the exact modes differentiate
    instead of differencing and are accepted.
    """

    mode: str = "off"
    beta: float = 0.3
    h: float = 0.05

    @property
    def lam(self) -> float:
        return self.beta * self.h


@dataclasses.dataclass(frozen=True)
class TPA:
    """TPA flatness baseline (Fan et al. 2024, TPA Eq. 5/10); project defaults N = 10, b = eps, k = h, beta = 0.3."""

    enabled: bool = False
    n: int = 10
    b: float | None = None  # neighbourhood half-width; None = eps
    k: float = 0.05  # paper: L2 probe radius; official: L_inf sign-probe step per pixel
    beta: float = 0.3  # lambda/k (paper estimator only)
    # paper = TPA Eq. 10; official = the authors' code (fmy266/TPA toolkit/adv/attack.py TAEFEP): sign probes,
    # (1 - alpha)*grad + alpha*mean probe gradient, heavy-ball momentum on the signed step (defenses/tpa.py).
    estimator: str = "paper"
    alpha: float = 0.8  # official estimator: weight of the probe gradients (TAEFEP alpha; produce_advs.py: 0.8)
    momentum: float = 0.9  # official estimator: SGD momentum on the signed step (TAEFEP.get_optim: 0.9)


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
    # SD3 (project default): prompt_embeds = [CLIP rows 0:clip_tokens | T5 rows clip_tokens:]. With eps_t5
    # set, the T5 rows get their own budget eps_t5 (the CLIP rows keep eps), the range clamp is per segment,
    # and the CLIP rows' structural zero padding (channels 0 on every CLIP row of c) is never perturbed.
    # None: one budget eps for every row (SD1.x / IP2P behaviour).
    eps_t5: float | None = None
    clip_tokens: int = 77


@dataclasses.dataclass(frozen=True)
class Objective:
    """Which host loss and its knobs.

    ``name``: a host of the objectives registry, ``tdae_jax.objectives.NAMES`` (``--objective``; its help lists
    them). ``target``: one of ``tdae_jax.objectives.TARGETS``, read only by the hosts whose registry row has
    ``accepts_target`` (``objectives.accepts_target``); the others ignore it and the command refuses a
    non-default value. The names are not repeated here so that they cannot drift from the registry.
    """

    name: str = "pge"  # a name of tdae_jax.objectives.NAMES
    timesteps: int = 10  # K samples of (t, eps) per gradient (TDAE §9)
    denoise_steps: int = 4  # PhotoGuard diffusion attack K
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    mist_weight: float = 1e4
    mist_separate_draws: bool = True  # Mist: textural and semantic terms encode x with independent posterior draws
    target: str = "zero"  # one of tdae_jax.objectives.TARGETS (hosts with accepts_target only)
    remat: bool = True
    # PhotoGuard diffusion attack (objectives/photoguard.py), defaults = MadryLab/photoguard's
    # demo_complex_attack_inpainting notebook (super_l2 call: grad_reps=10, eta=1): the loss is averaged over
    # pgd_grad_reps independent passes; pgd_eta = DDIM eta of the unrolled chain (SD/IP2P/inpaint surrogates);
    # pgd_strength = img2img strength of the chain, None = the victim editor's default (img2img 0.8, inpaint 1.0,
    # SD3 0.6); InstructPix2Pix always edits from pure noise.
    pgd_grad_reps: int = 10
    pgd_eta: float = 1.0
    pgd_strength: float | None = None
    # Semantic Attack (objectives/semantic_attention.py; Lo et al., CVPR 2024): the prompt's words whose
    # cross-attention is suppressed (() = every content token: the data name no object c_a), the spatial mask
    # (attention = paper Eq. 4 from the clean image, tau = sa_mask_threshold x its maximum; region = batch["mask"];
    # none = every query) and the timesteps (grid = the K-step DDIM grid, 901..1 for K = 10; random = uniform).
    sa_tokens: tuple[str, ...] = ()
    sa_mask: str = "attention"
    sa_mask_threshold: float = 0.5
    sa_timesteps: str = "grid"
