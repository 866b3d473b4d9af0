"""Training images for the immunizer: a pool of miniature-world edit pairs (``miniature/world.py``), each
with the instruction its editor consumes, and the batch of every training step as a pure function of the step.

The pool is items ``0 .. pool-1`` of world seed ``seed`` (item i depends only on (seed, i, kinds, objects),
``miniature.train.pairs``). Step n takes items ``n*B .. n*B + B - 1`` of an endless sequence that visits the
pool once per epoch in an order drawn from ``numpy.random.default_rng([seed, PERM_STREAM, epoch])``, so a
resumed training gets exactly the batches the interrupted one would have had. Image ids are
``world<seed>/<item>``: their uids key the per-image noise (``prng.image_keys``).

World seeds: the study uses 31337, the tests 2000, 4242 and 9090, the shipped editors' training and evaluation
0-2, 10-12 and 1000; the immunizer's flagfiles use 5151.
"""
from __future__ import annotations

import numpy as np

from tdae_jax import prng
from tdae_jax.miniature import protection as mini_protection
from tdae_jax.miniature import train as mini_train

PERM_STREAM = 0x494D  # "IM": the per-epoch order of the pool


def item_indices(step: int, batch_size: int, pool: int, seed: int) -> np.ndarray:
    """``[batch_size]`` pool items of training step ``step`` (each epoch a fresh permutation of the pool)."""
    flat = step * batch_size + np.arange(batch_size)
    epochs, pos = np.divmod(flat, pool)
    perms = {int(e): np.random.default_rng([seed, PERM_STREAM, int(e)]).permutation(pool) for e in set(epochs)}
    return np.asarray([perms[int(e)][p] for e, p in zip(epochs, pos)], np.int64)


class WorldPool:
    """A pool of ``pool`` world images (uint8 -> float [0,1]) with their prompts' text batch.

    Args:
      sur: the surrogate whose tokenizer and text encoder embed the prompts (``text_batch``).
      seed: world seed; pool: number of items; size: image side (px); kinds: edit kinds; max_objects: objects
        per scene (1..max_objects), as the shipped editors were trained.
      prompt: the text the surrogate consumes (TDAE spec §1, project default): ``instruction`` for
        InstructPix2Pix, ``edited_caption`` for a text-to-image (SDEdit img2img) surrogate.
    """

    def __init__(self, sur, seed: int, pool: int, size: int, kinds=("recolour", "remove"), max_objects: int = 2,
                 prompt: str = "instruction"):
        if pool < 1:
            raise ValueError(f"the training pool needs at least one image, got {pool}")
        pairs = mini_train.pairs(seed, pool, size, kinds=tuple(kinds), max_objects=max_objects)
        self.seed, self.pool = int(seed), int(pool)
        self.x0 = mini_train.to_unit(pairs["source"])
        if prompt not in ("instruction", "edited_caption"):
            raise ValueError(f"prompt must be 'instruction' or 'edited_caption', got {prompt!r}")
        self.prompts = list(pairs[prompt])
        self.ids = [f"world{seed}/{i}" for i in range(pool)]
        self.uid = prng.uids(self.ids)
        self.text = mini_protection.text_batch(sur, self.prompts) if sur is not None else {}

    def batch_at(self, step: int, batch_size: int) -> dict:
        """The batch of training step ``step``: ``x0``, ``uid`` and the text batch (``emb``, ``uncond``,
        ``token_mask``) of its items."""
        idx = item_indices(step, batch_size, self.pool, self.seed)
        return {"x0": self.x0[idx], "uid": self.uid[idx], **{k: np.asarray(v)[idx] for k, v in self.text.items()}}
