"""The amortized protector: a network g(x) -> delta trained once with TDAE's objective, then one forward pass
per image (DiffVax, Ozden et al., arXiv:2411.17957, an "immunizer" trained on many images; TDAE, Zhang et al.,
arXiv:2512.14341, Algorithm 1: host loss + FDM flatness penalty + DPD counter-prompt rounds).

- ``net.py``: the fully convolutional U-Net, ``|delta| <= eps`` by construction.
- ``train.py``: ``TrainConfig``, ``TrainState`` and the pure ``train_step`` (the same objectives, FDM and DPD
  functions as the per-image defense, with the network parameters as the optimized variables).
- ``trainer.py``: the step compiled over a data mesh, orbax checkpoints, bit-identical resumption.
- ``data.py``: the miniature-world training pool; ``run.py``: a training run (``experiments.immunizer train``).
- ``protect.py``: a folder of images -> budget-exact PNGs, on the shared run engine (``tdae_jax/runs/``).
- ``measure.py``: edit success against the reproduction study's rows, throughput against the per-image defense.
"""
