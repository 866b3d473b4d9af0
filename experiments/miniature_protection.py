r"""Does protection stop the edit, on the surrogate and on editors it never saw? (issue 4, item 5)

    python -m experiments.miniature_protection --n=32 --steps=40 --out=docs/miniature_protection.md

Held-out recolour scenes of the procedural world (seed 1000, never trained on) are protected against the
shipped miniature InstructPix2Pix surrogate, then every shipped editor edits the clean and the protected
scene with the same instruction and the same noise. The oracle (tdae_jax/miniature/oracle.py) scores the
instructed-edit success and PSNR against the exact ground truth. Intra-model = the surrogate itself;
cross-model = the other editors (independently trained; ip2p_c also on another autoencoder).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from tdae_jax import configs, models, objectives, prng
from tdae_jax.data import io as dio
from tdae_jax.defenses import tdae
from tdae_jax.miniature import oracle, sample, shipped, world
from tdae_jax.parallel import mesh as meshlib
from tdae_jax.protect import Protector

flags.DEFINE_string("surrogate", "ip2p_a", "Shipped miniature IP2P editor the defense optimises against.")
flags.DEFINE_list("victims", [], "Editors to attack with (default: every shipped ip2p_* model).")
flags.DEFINE_list("eps", ["8", "16"], "Budgets in 1/255 units.")
flags.DEFINE_list("defenses", ["pge", "advdm_tdae"], "host[_fdm|_tdae] entries (hosts: pge, advdm).")
flags.DEFINE_integer("n", 32, "Held-out scenes.")
flags.DEFINE_integer("steps", 40, "PGD iterations.")
flags.DEFINE_integer("edit_steps", 10, "DDIM steps of the editors (as in their training evaluation).")
flags.DEFINE_integer("seed", 1000, "World seed of the held-out scenes (training used other seeds).")
flags.DEFINE_string("out", "", "Write the Markdown table here (else print only).")
FLAGS = flags.FLAGS


def protect(sur, x0_uint8, instructions, eps, spec, steps):
    host, _, variant = spec.partition("_")
    obj = configs.Objective(name=host, timesteps=2)
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


def run(surrogate, victims, eps_list, defenses, n, steps, edit_steps, seed):
    pairs = world.make_pairs(seed, n, size=32, kinds=("recolour",))
    sur = models.load("ip2p", shipped.path(surrogate))
    eds = {v: models.load("ip2p", shipped.path(v)) for v in victims}
    rows = []
    clean = {v: oracle.evaluate(edit(s, pairs["source"], pairs["instruction"], edit_steps), pairs) for v, s in eds.items()}
    for v in victims:
        rows.append(("none", 0, v, clean[v]["success"]["all"], clean[v]["psnr"]["all"]))
    for spec in defenses:
        for e in eps_list:
            t0 = time.time()
            prot = protect(sur, pairs["source"], pairs["instruction"], e / 255.0, spec, steps)
            assert dio.linf_uint8(prot, pairs["source"]) <= int(e)
            for v, s in eds.items():
                r = oracle.evaluate(edit(s, prot, pairs["instruction"], edit_steps), pairs)
                rows.append((spec, e, v, r["success"]["all"], r["psnr"]["all"]))
            print(f"{spec} eps {e}/255 done in {time.time() - t0:.0f}s", flush=True)
    return rows


def table(rows, surrogate):
    lines = ["| defense | eps (/255) | editor | intra/cross | edit success | PSNR vs ground truth (dB) |",
             "|---|---|---|---|---|---|"]
    for spec, e, v, succ, psnr in rows:
        kind = "-" if spec == "none" else ("intra" if v == surrogate else "cross")
        lines.append(f"| {spec} | {e if e else '-'} | {v} | {kind} | {succ:.1%} | {psnr:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    victims = FLAGS.victims or [m for m in shipped.names() if m.startswith("ip2p_")]
    rows = run(FLAGS.surrogate, victims, [float(e) for e in FLAGS.eps], FLAGS.defenses, FLAGS.n, FLAGS.steps,
               FLAGS.edit_steps, FLAGS.seed)
    md = table(rows, FLAGS.surrogate)
    print(md)
    if FLAGS.out:
        dio.atomic_write_bytes(FLAGS.out, md.encode())


if __name__ == "__main__":
    app.run(main)
