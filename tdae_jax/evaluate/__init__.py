"""Evaluate protections against victim editors: the library side of ``python -m experiments.evaluate``.

TDAE §IV-A: protection efficacy compares ``edit(protected)`` with ``edit(clean)`` (PSNR↓ SSIM↓
LPIPS↑ VIFp↓ FSIM↓), both edits with the **same** victim, prompt, seed and scheduler noise; the **seed
floor** compares ``edit(clean; seed a)`` with ``edit(clean; seed b)``; imperceptibility compares the
protected file with the original (PSNR↑ SSIM↑ LPIPS↓, at the original resolution, as written on disk).
Purification is added: the victim edits ``P(protected)`` for each purifier P (``tdae_jax.purify``),
the per-image worst case over the set, and the purifier's own cost ``edit(P(clean))`` vs ``edit(clean)``.

Inputs are protect workdirs (``manifest.json`` entries with ``status == "done"``, their ``source`` and
``outputs.protected``; ``config.json`` names the surrogate, eps, working size and prompts). The clean and
protected images are brought to the run's working resolution with the same transform
(``data.io.load_image``), which is what the victim sees. Rows (``EvalResult.rows``), one per
run x image x victim x purifier x seed and ``kind``:

- ``protection``: edit(P(protected)) vs edit(clean), plus ``imp_*`` (protected vs original);
- ``worst``: per metric, the purifier most similar to edit(clean) (``worst_by`` says which), over ``purify``;
- ``seed_floor``: edit(clean; ``seed_b``) vs edit(clean; ``seed``) (``seed_b`` = the next listed seed,
  cyclically, or seed + 1 with a single seed);
- ``purifier_cost``: edit(P(clean)) vs edit(clean), for P != none.

Keys: the victim's noise for image ``id`` and seed ``s`` is ``prng.image_keys(key(s), uid(id), EDIT_STEP)``
(the same for clean, protected and purified inputs, and disjoint from the protect run's per-iteration keys);
random purifiers use ``stream(purifier name)`` instead of ``EDIT_STEP``. PSNR of identical images is capped
at ``psnr_cap_db`` (100 dB) so means stay finite; a metric an image is too small for (VIFp below 41 px,
SSIM below 11 px, LPIPS-AlexNet below 32 px) is NaN (an empty CSV cell).

With ``clip_dir`` (a local transformers CLIPModel directory, ``tdae_jax.models.clip``; ``tiny[@SEED]`` for
plumbing tests) every row also gets ``clip_img``, the CLIP image similarity of the row's two edits (e.g.
edit(protected) vs edit(clean); higher = the protection failed), and ``clip_dir``, the CLIP direction
similarity (``metrics.clip_sim``) of the row's test edit w.r.t. the original along the prompts row's
``caption`` -> ``edited_prompt`` (NaN without both, when ``prompt`` overrides the edit text, or without
tokenizer files in the CLIP directory).

Modules: ``specs`` (victims, EvalConfig, columns), ``runs`` (protect workdirs as inputs), ``scores`` (metrics,
keys, worst case), ``runner`` (the loop), ``outputs`` (files). Everything public is re-exported here.
"""
from tdae_jax.evaluate.specs import (CLIP_METRICS, COLUMNS, EDIT_KIND, EDIT_STEP, IMP_METRICS,
                                     METRICS, MIN_SIDE, OPTION_KEYS, EditSettings, EvalConfig, UsageError,
                                     VictimSpec, load_clip, load_model, parse_model, parse_victims)
from tdae_jax.evaluate.scores import compare, edit_keys, worst_rows
from tdae_jax.evaluate.runs import Item, RunInfo, load_item, prompt_for, read_run
from tdae_jax.evaluate.runner import EvalResult, Runner, centre_mask, run
from tdae_jax.evaluate.outputs import default_outdir, write_outputs

__all__ = ["CLIP_METRICS", "COLUMNS", "EDIT_KIND", "EDIT_STEP", "IMP_METRICS", "METRICS", "MIN_SIDE", "OPTION_KEYS",
           "EditSettings", "EvalConfig", "UsageError", "VictimSpec", "load_clip", "load_model", "parse_model",
           "parse_victims", "compare", "edit_keys", "worst_rows", "Item", "RunInfo", "load_item", "prompt_for",
           "read_run", "EvalResult", "Runner", "centre_mask", "run", "default_outdir", "write_outputs"]
