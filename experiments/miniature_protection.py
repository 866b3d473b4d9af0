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

from absl import app, flags

from experiments import common
from tdae_jax import models
from tdae_jax.data import io as dio
from tdae_jax.miniature import oracle, shipped
from tdae_jax.miniature import protection as mp
from tdae_jax.miniature import train as T

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


def run(surrogate, victims, eps_list, defenses, n, steps, edit_steps, seed, kinds=("recolour", "remove"),
        max_objects=2, denoise_steps=4):
    pairs = T.pairs(seed, n, 32, tuple(kinds), max_objects)
    sur = models.load("ip2p", shipped.path(surrogate))
    eds = {v: models.load("ip2p", shipped.path(v)) for v in victims}
    rows = []
    clean = {v: oracle.evaluate(mp.edit(s, pairs["source"], pairs["instruction"], edit_steps), pairs) for v, s in eds.items()}
    for v in victims:
        rows.append(("none", 0, v, clean[v]["success"], clean[v]["psnr"]["all"]))
    for spec in defenses:
        for e in eps_list:
            t0 = time.time()
            prot = mp.protect(sur, pairs["source"], pairs["instruction"], e / 255.0, spec, steps, denoise_steps)
            assert dio.linf_uint8(prot, pairs["source"]) <= int(e)
            for v, s in eds.items():
                r = oracle.evaluate(mp.edit(s, prot, pairs["instruction"], edit_steps), pairs)
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
    app.run(main, flags_parser=common.parse_flags)
