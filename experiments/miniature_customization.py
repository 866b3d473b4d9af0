r"""Does DLADiff layer 1 stop DreamBooth from learning a subject? Measured on the miniature world.

    python -m experiments.miniature_customization --out=docs/miniature_customization.md

Each of ``--subjects`` distinctive subjects of the procedural world (``world.subjects``: a shape in two colours
with a pattern and a mark, ``--views`` views each) is protected against the shipped miniature text-to-image
model ``--surrogate`` with DLADiff layer 1 (DSUR static surrogate + ADFT) or the ASPL baseline. Then the
attacker DreamBooths each ``--victims`` model on the clean or the protected views with "a photo of <token>
<shape>" and samples that prompt. The oracle scores subject reproduction on pixels: a sample reproduces the
subject when both of its colours cover at least ``--min_px`` pixels and no other colour does
(``subject_success``). Intra-model = the surrogate itself; cross-model = the other text-to-image models.

``--out`` replaces the part of that Markdown file between ``<!-- results:start -->`` and
``<!-- results:end -->`` (the whole file when it has no such markers).
"""
from __future__ import annotations

import sys
import time

import jax
import numpy as np
from absl import app, flags

from experiments import common

from tdae_jax import models
from tdae_jax.data import io as dio
from tdae_jax.defenses.dladiff import adft, baselines, dsur
from tdae_jax.editors import finetune as ft
from tdae_jax.miniature import oracle, shipped, vocab, world

flags.DEFINE_string("surrogate", "sd_a", "Shipped miniature text-to-image model the defense optimises against.")
flags.DEFINE_list("victims", [], "Models the attacker fine-tunes (default: every shipped sd_* model).")
flags.DEFINE_list("methods", ["dladiff", "aspl"], "Layer-1 defenses: dladiff (DSUR + ADFT), aspl, fsmg.")
flags.DEFINE_list("eps", ["8", "16"], "Budgets in 1/255 units.")
flags.DEFINE_integer("subjects", 4, "Subjects (one protection and one attack per subject); the first ones of the "
                     "world's subject stream whose clean views the oracle accepts.")
flags.DEFINE_integer("views", 4, "Views per subject (the identity's photos).")
flags.DEFINE_integer("subject_seed", 3000, "World seed of the subjects.")
flags.DEFINE_integer("epochs", 10, "ADFT / ASPL epochs.")
flags.DEFINE_float("defense_lr", 1e-4, "Surrogate fine-tuning learning rate (DSUR, ADFT stage 3, ASPL).")
flags.DEFINE_integer("static_steps", 100, "DSUR steps (the static surrogate: DreamBooth on the clean views).")
flags.DEFINE_integer("attack_steps", 200, "Attacker DreamBooth steps (batch 4).")
flags.DEFINE_float("attack_lr", 1e-4, "Attacker DreamBooth learning rate.")
flags.DEFINE_integer("samples", 16, "Samples of the attacker's model per subject.")
flags.DEFINE_integer("sample_steps", 10, "DDIM steps of the samples.")
flags.DEFINE_float("guidance", 3.0, "Classifier-free guidance of the samples.")
flags.DEFINE_integer("min_px", 12, "Pixels a subject colour must cover in a sample (32 px images).")
flags.DEFINE_string("out", "", "Write the Markdown results here (else print only).")
FLAGS = flags.FLAGS


def subject_success(img, sub: world.Subject, min_px: int) -> bool:
    """Both subject colours cover >= ``min_px`` pixels (``oracle.classify``) and no other colour does."""
    labels = oracle.classify(img)
    counts = {c: int((labels == vocab.COLOURS.index(c)).sum()) for c in vocab.COLOURS}
    own = {sub.colour, sub.colour2}
    return all(counts[c] >= min_px for c in own) and all(n < min_px for c, n in counts.items() if c not in own)


def protect(method, sur, views, prompt, eps, key):
    """Layer-1 perturbation of one subject's views (float [V,H,W,3] in [0,1]) -> uint8 protected views."""
    x0 = views.astype(np.float32) / 255.0
    uid = np.arange(len(x0), dtype=np.int32)
    emb = np.asarray(ft.embed_ids(sur, sur.tokenize([prompt] * len(x0))))
    v = len(x0)
    if method == "dladiff":
        static = dsur.train_static(sur, x0, prompt, dsur.static_config(FLAGS.static_steps, FLAGS.defense_lr, v),
                                   jax.random.fold_in(key, 1)).surrogate.params["unet"]
        layers = dsur.select_layers(sur, x0.shape[1], resolution=x0.shape[1] // sur.downsample)
        cfg = adft.ADFTConfig(eps=eps, step_size=eps / 4, epochs=FLAGS.epochs, lr=FLAGS.defense_lr, layers=layers)
        state, _ = adft.protect(sur, static, x0, uid, emb, cfg, key)
        delta = state.perturb.delta
    elif method in ("aspl", "fsmg"):
        cfg = baselines.BaselineConfig(method=method, eps=eps, step_size=eps / 4, epochs=FLAGS.epochs,
                                       lr=FLAGS.defense_lr, pgd_steps=6 if method == "aspl" else 6 * FLAGS.epochs)
        if method == "aspl":
            p, _ = baselines.aspl(sur, x0, uid, emb, x0, uid, emb, cfg, key)
        else:
            static = dsur.train_static(sur, x0, prompt, dsur.static_config(FLAGS.static_steps, FLAGS.defense_lr, v),
                                       jax.random.fold_in(key, 1)).surrogate.params["unet"]
            p, _ = baselines.fsmg(sur, static, x0, uid, emb, cfg, key)
        delta = p.delta
    else:
        raise ValueError(f"unknown method {method!r}")
    return dio.quantize_protected(views, np.asarray(delta), eps)


def attack(victim, views_uint8, prompt, sub, key):
    """DreamBooth the victim on the views, sample the prompt; returns the share of samples that reproduce sub."""
    cfg = ft.FinetuneConfig(method="dreambooth", steps=FLAGS.attack_steps, batch_size=4, lr=FLAGS.attack_lr)
    res = ft.finetune(victim, views_uint8.astype(np.float32) / 255.0, prompt, cfg, key)
    imgs = ft.sample(res.surrogate, prompt, FLAGS.samples, jax.random.fold_in(key, 9), steps=FLAGS.sample_steps,
                     guidance_scale=FLAGS.guidance)
    imgs = np.round(np.clip(imgs, 0, 1) * 255).astype(np.uint8)
    return float(np.mean([subject_success(im, sub, FLAGS.min_px) for im in imgs])), imgs


def run():
    victims = FLAGS.victims or [m for m in shipped.names() if m.startswith("sd_")]
    subj = world.subjects(FLAGS.subject_seed, 4 * FLAGS.subjects, FLAGS.views, size=32)
    # subjects whose every clean view the oracle accepts (at 32 px a few colour pairs blur into each other)
    keep = [i for i, sub in enumerate(subj["subjects"])
            if all(subject_success(v, sub, FLAGS.min_px) for v in subj["images"][i])][:FLAGS.subjects]
    if len(keep) < FLAGS.subjects:
        raise ValueError(f"only {len(keep)} of {4 * FLAGS.subjects} subjects pass the oracle on their own views")
    sur = models.load("sd", shipped.path(FLAGS.surrogate))
    eds = {v: (sur if v == FLAGS.surrogate else models.load("sd", shipped.path(v))) for v in victims}
    key = jax.random.key(0)
    results = {}  # (method, eps, victim) -> [per-subject success]
    for s, i in enumerate(keep):
        sub, views = subj["subjects"][i], subj["images"][i]
        prompt = subj["instance_prompts"][i]
        variants = {("none", 0.0): views}
        for m in FLAGS.methods:
            for e in FLAGS.eps:
                t0 = time.time()
                variants[(m, float(e))] = protect(m, sur, views, prompt, float(e) / 255.0, jax.random.fold_in(key, s))
                assert dio.linf_uint8(variants[(m, float(e))], views) <= int(float(e))
                print(f"subject {s} {m} eps {e}: protected in {time.time() - t0:.0f} s", flush=True)
        for (m, e), x in variants.items():
            for v, model in eds.items():
                succ, _ = attack(model, x, prompt, sub, jax.random.fold_in(key, 100 + s))
                results.setdefault((m, e, v), []).append(succ)
                print(f"subject {s} {m} eps {e} victim {v}: subject reproduced in {succ:.0%} of samples", flush=True)
    return results, victims


def table(results, victims):
    clean = {v: float(np.mean(results[("none", 0.0, v)])) for v in victims}
    lines = ["| defense | eps (/255) | attacker's model | intra/cross | subject reproduced | drop vs clean | per subject |",
             "|---|---|---|---|---|---|---|"]
    for (m, e, v), succ in results.items():
        mean = float(np.mean(succ))
        kind = "-" if m == "none" else ("intra" if v == FLAGS.surrogate else "cross")
        drop = "-" if m == "none" or not clean[v] else f"{mean / clean[v] - 1:+.0%}"
        lines.append(f"| {m} | {int(e) if e else '-'} | {v} | {kind} | {mean:.1%} | {drop} | "
                     + ", ".join(f"{x:.0%}" for x in succ) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    t0 = time.time()
    results, victims = run()
    cmd = "python -m experiments.miniature_customization " + " ".join(a for a in sys.argv[1:] if a.startswith("--"))
    md = (f"Command: `{cmd}` ({time.time() - t0:.0f} s wall). {FLAGS.subjects} subjects x {FLAGS.views} views "
          f"(world seed {FLAGS.subject_seed}), surrogate {FLAGS.surrogate}; defenses: {FLAGS.epochs} epochs, "
          f"surrogate lr {FLAGS.defense_lr}, DSUR {FLAGS.static_steps} steps; attacker: DreamBooth "
          f"{FLAGS.attack_steps} steps, batch 4, lr {FLAGS.attack_lr}, {FLAGS.samples} samples "
          f"({FLAGS.sample_steps} DDIM steps, guidance {FLAGS.guidance}); success: both subject colours >= "
          f"{FLAGS.min_px} px and no other colour.\n\n" + table(results, victims))
    print(md)
    if FLAGS.out:
        common.replace_results(FLAGS.out, md)


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
