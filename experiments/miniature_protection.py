r"""Does protection stop the edit, on the surrogate and on editors it never saw? (issue 4, item 5)

    python -m experiments.miniature_protection --n=32 --steps=40 --out=docs/miniature_protection.md

Held-out edit pairs of the procedural world (seed 1000, never trained on; the editors' own distribution:
recolour and remove, 1-2 objects) are protected against the shipped miniature InstructPix2Pix surrogate,
then every shipped editor edits the clean and the protected scene with the same instruction and the same
noise. The oracle (tdae_jax/miniature/oracle.py) scores the
instructed-edit success and PSNR against the exact ground truth. Intra-model = the surrogate itself;
cross-model = the other editors (independently trained; ip2p_c also on another autoencoder).

``--out`` replaces the part of that Markdown file between ``<!-- results:start -->`` and
``<!-- results:end -->`` (the whole file when it has no such markers), so the prose around it stays.
"""
from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common

from tdae_jax import configs, models, objectives, prng
from tdae_jax.data import io as dio
from tdae_jax.defenses import tdae
from tdae_jax.miniature import oracle, sample, shipped
from tdae_jax.miniature import train as T
from tdae_jax.parallel import mesh as meshlib
from tdae_jax.protect import Protector

flags.DEFINE_string("surrogate", "ip2p_a", "Shipped miniature IP2P editor the defense optimises against.")
flags.DEFINE_list("victims", [], "Editors to attack with (default: every shipped ip2p_* model).")
flags.DEFINE_list("eps", ["8", "16"], "Budgets in 1/255 units.")
flags.DEFINE_list("defenses", ["pge", "pgd", "advdm_tdae"],
                  "host[_fdm|_tdae] entries; hosts: any objective (pge, pgd, advdm, mist, ...).")
flags.DEFINE_list("kinds", ["recolour", "remove"], "Edit kinds of the held-out pairs (the editors' training kinds).")
flags.DEFINE_integer("max_objects", 2, "Objects per held-out scene: 1..max_objects.")
flags.DEFINE_integer("denoise_steps", 4, "PhotoGuard diffusion attack (pgd): denoising steps back-propagated.")
flags.DEFINE_integer("n", 32, "Held-out scenes.")
flags.DEFINE_integer("steps", 40, "PGD iterations.")
flags.DEFINE_integer("edit_steps", 10, "DDIM steps of the editors (as in their training evaluation).")
flags.DEFINE_integer("seed", 1000, "World seed of the held-out scenes (training used other seeds).")
flags.DEFINE_string("out", "", "Write the Markdown table here (else print only).")
FLAGS = flags.FLAGS


def parse_spec(spec: str) -> tuple[str, str]:
    """"advdm_tdae" -> ("advdm", "tdae"); "pge_untargeted" -> ("pge_untargeted", "")."""
    for variant in ("fdm", "tdae"):
        if spec.endswith("_" + variant):
            return spec[: -len(variant) - 1], variant
    return spec, ""


def protect(sur, x0_uint8, instructions, eps, spec, steps, denoise_steps=4):
    host, variant = parse_spec(spec)
    # the miniature editors sample without guidance (scales 1): the pgd host back-propagates that sampler
    obj = configs.Objective(name=host, timesteps=2, denoise_steps=denoise_steps, guidance_scale=1.0,
                            image_guidance_scale=1.0)
    loss_fn = objectives.make_objective(host, sur, obj)
    fdm = configs.FDM(mode="finite_difference" if variant in ("fdm", "tdae") else "off")
    dpd = configs.DPD(enabled=variant == "tdae", period=10, steps=5)
    init_fn, step_fn = tdae.make_step(loss_fn, budget=configs.Budget(eps), fdm=fdm, dpd=dpd,
                                      pgd=configs.PGD(step_size=max(eps / 8, 1 / 255), steps=steps))
    p = Protector(init_fn, step_fn, meshlib.make_mesh(), 8)
    x0 = x0_uint8.astype(np.float32) / 255.0
    ids = [f"scene{i}" for i in range(len(x0))]
    out = []
    for i in range(0, len(x0), 8):
        sl = slice(i, i + 8)
        tok = sur.tokenize(instructions[sl])
        batch = {"x0": x0[sl], "uid": prng.uids(ids[sl]), "emb": np.asarray(sur.embed_ids(tok)),
                 "uncond": np.asarray(sur.embed_ids(sur.tokenize([""] * len(tok))))}
        delta, _, _ = p.run(batch, len(tok), steps, prng.base_key(0))
        out.append(dio.quantize_protected(x0_uint8[sl], delta, eps))
    return np.concatenate(out)


def edit(sur, images_uint8, instructions, edit_steps):
    ids = jnp.asarray(sur.tokenize(instructions))
    y = sample.ip2p_edit(sur, jnp.asarray(images_uint8, jnp.float32) / 255.0, ids, jax.random.key(7),
                         num_steps=edit_steps)
    return np.round(np.asarray(y) * 255.0).astype(np.uint8)


def run(surrogate, victims, eps_list, defenses, n, steps, edit_steps, seed, kinds=("recolour", "remove"),
        max_objects=2, denoise_steps=4):
    pairs = T.pairs(seed, n, 32, tuple(kinds), max_objects)
    sur = models.load("ip2p", shipped.path(surrogate))
    eds = {v: models.load("ip2p", shipped.path(v)) for v in victims}
    rows = []
    clean = {v: oracle.evaluate(edit(s, pairs["source"], pairs["instruction"], edit_steps), pairs) for v, s in eds.items()}
    for v in victims:
        rows.append(("none", 0, v, clean[v]["success"], clean[v]["psnr"]["all"]))
    for spec in defenses:
        for e in eps_list:
            t0 = time.time()
            prot = protect(sur, pairs["source"], pairs["instruction"], e / 255.0, spec, steps, denoise_steps)
            assert dio.linf_uint8(prot, pairs["source"]) <= int(e)
            for v, s in eds.items():
                r = oracle.evaluate(edit(s, prot, pairs["instruction"], edit_steps), pairs)
                rows.append((spec, e, v, r["success"], r["psnr"]["all"]))
            print(f"{spec} eps {e}/255 done in {time.time() - t0:.0f}s", flush=True)
    return rows


def table(rows, surrogate):
    """Markdown: edit success (all and per kind), its relative drop from the clean edit, PSNR."""
    kinds = [k for k in rows[0][3] if k != "all"]
    clean = {v: succ["all"] for spec, _, v, succ, _ in rows if spec == "none"}
    lines = ["| defense | eps (/255) | editor | intra/cross | edit success | drop vs clean | "
             + " | ".join(f"{k}" for k in kinds) + " | PSNR vs ground truth (dB) |",
             "|---|---|---|---|---|---|" + "---|" * len(kinds) + "---|"]
    for spec, e, v, succ, psnr in rows:
        kind = "-" if spec == "none" else ("intra" if v == surrogate else "cross")
        drop = "-" if spec == "none" or not clean[v] else f"{succ['all'] / clean[v] - 1:+.0%}"
        lines.append(f"| {spec} | {e if e else '-'} | {v} | {kind} | {succ['all']:.1%} | {drop} | "
                     + " | ".join(f"{succ[k]:.0%}" for k in kinds) + f" | {psnr:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    victims = FLAGS.victims or [m for m in shipped.names() if m.startswith("ip2p_")]
    t0 = time.time()
    rows = run(FLAGS.surrogate, victims, [float(e) for e in FLAGS.eps], FLAGS.defenses, FLAGS.n, FLAGS.steps,
               FLAGS.edit_steps, FLAGS.seed, FLAGS.kinds, FLAGS.max_objects, FLAGS.denoise_steps)
    cmd = "python -m experiments.miniature_protection " + " ".join(a for a in sys.argv[1:] if a.startswith("--"))
    md = (f"Command: `{cmd}` ({time.time() - t0:.0f} s wall). {FLAGS.n} pairs, world seed {FLAGS.seed}, kinds "
          f"{', '.join(FLAGS.kinds)}, 1-{FLAGS.max_objects} objects; {FLAGS.steps} sign-PGD iterations; editors: "
          f"{FLAGS.edit_steps} DDIM steps, no guidance.\n\n" + table(rows, FLAGS.surrogate))
    print(md)
    if FLAGS.out:
        common.replace_results(FLAGS.out, md)


if __name__ == "__main__":
    app.run(main)
