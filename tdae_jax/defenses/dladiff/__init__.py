"""DLADiff (Jia et al. 2025, arXiv 2511.19910): dual-layer defense against fine-tuning and zero-shot
customization of diffusion models (no public code found). Guide and project defaults: docs/dladiff.md.

- ``dsur``: the static surrogate (DreamBooth on clean photos) and the attention loss (Eq. 8);
- ``adft``: layer 1, the three-stage ADFT epoch (attention ascent, L_cond ascent, UNet_d fine-tuning);
- ``zeroshot``: layer 2, identity-encoder PGD in the aligned face crop (Eq. 10-11, Algorithm 2);
- ``baselines``: Anti-DreamBooth ASPL and FSMG under the same budget;
- ``disdiff``: DisDiff (cross-attention erasure, MSS step, SimAC timestep search) on ASPL's loop, same budget;
- ``antidiffusion``: Anti-Diffusion (prompt tuning, semantic disturbance loss, UNet fine-tuning), same budget;
- ``run``: the workdir runner behind ``python -m experiments.dladiff``.

Submodules are imported on demand (``from tdae_jax.defenses.dladiff import adft``).
"""
