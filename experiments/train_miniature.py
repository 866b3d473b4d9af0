r"""Train one of the miniature models that ship with the package (docs/miniature.md).

    python -m experiments.train_miniature --flagfile=experiments/flags/miniature_vae_a.flags
    python -m experiments.train_miniature --flagfile=experiments/flags/miniature_ip2p_a.flags

Re-running the same command with the same --workdir resumes from the last orbax checkpoint.
The result is written to --out_dir (default tdae_jax/assets/miniature/<name>) with training.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "vae", ["vae", "ip2p", "sd"], "What to train.")
flags.DEFINE_string("name", "", "Model name (directory under tdae_jax/assets/miniature/).")
flags.DEFINE_string("out_dir", "", "Output directory; empty = tdae_jax/assets/miniature/<name>.")
flags.DEFINE_string("workdir", "", "Checkpoints and data cache; empty = runs/miniature/<name>.")
flags.DEFINE_integer("seed", 0, "Parameter init / noise seed.")
# optimisation
flags.DEFINE_integer("steps", 1000, "Training steps.")
flags.DEFINE_float("lr", 1e-3, "Peak learning rate (AdamW).")
flags.DEFINE_integer("warmup", 100, "Linear warm-up steps.")
flags.DEFINE_float("clip", 1.0, "Global-norm gradient clip.")
flags.DEFINE_float("weight_decay", 1e-4, "AdamW weight decay.")
flags.DEFINE_float("ema_decay", 0.995, "EMA decay of the shipped weights.")
flags.DEFINE_float("final_lr_fraction", 0.1, "Cosine decay ends at lr * this.")
flags.DEFINE_float("time_limit_min", 0.0, "Stop (and save) after this many minutes of training; 0 = no limit.")
flags.DEFINE_integer("ckpt_every", 100, "Orbax checkpoint every k steps (0 = off).")
flags.DEFINE_integer("log_every", 25, "Progress line every k steps.")
# data
flags.DEFINE_integer("data_seed", 0, "World seed of the training set.")
flags.DEFINE_integer("n_train", 2048, "Training items (scenes or edit pairs).")
flags.DEFINE_integer("size", 64, "Image size.")
flags.DEFINE_list("kinds", ["recolour"], "Edit kinds (ip2p).")
flags.DEFINE_integer("max_objects", 3, "Objects per scene: 1..max_objects.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
# autoencoder
flags.DEFINE_list("vae_channels", ["16", "32", "64"], "AutoencoderKL block_out_channels (3 levels = f 4).")
flags.DEFINE_integer("vae_layers", 1, "AutoencoderKL layers_per_block.")
flags.DEFINE_integer("vae_groups", 8, "AutoencoderKL norm_num_groups.")
flags.DEFINE_integer("latent_channels", 4, "Latent channels.")
flags.DEFINE_float("l1_weight", 1.0, "L1 reconstruction weight.")
flags.DEFINE_float("l2_weight", 1.0, "L2 reconstruction weight.")
flags.DEFINE_float("object_weight", 0.0, "Extra reconstruction weight on coloured (object) pixels.")
flags.DEFINE_float("edge_weight", 0.0, "Weight of the L1 loss on the images' finite differences (sharp outlines).")
flags.DEFINE_float("kl_weight", 1e-4, "KL weight (per latent element).")
# diffusion
flags.DEFINE_string("vae_dir", "", "Trained autoencoder directory (ip2p / sd).")
flags.DEFINE_list("unet_channels", ["32", "64", "64"], "UNet block_out_channels (multiples of 32).")
flags.DEFINE_bool("attention_top", False, "UNet cross-attention at the top latent level too.")
flags.DEFINE_integer("unet_layers", 1, "UNet layers_per_block.")
flags.DEFINE_integer("attention_heads", 4, "UNet attention heads.")
flags.DEFINE_integer("text_hidden", 64, "Text encoder width (= UNet cross_attention_dim).")
flags.DEFINE_integer("text_layers", 2, "Text encoder layers.")
flags.DEFINE_integer("text_heads", 4, "Text encoder heads.")
flags.DEFINE_integer("max_length", 32, "Token sequence length.")
flags.DEFINE_float("p_drop_text", 0.05, "Text-condition dropout (CFG).")
flags.DEFINE_float("p_drop_image", 0.05, "Image-condition dropout (ip2p CFG).")
# output / evaluation
flags.DEFINE_enum("save_dtype", "float16", ["float32", "float16", "bfloat16"], "Stored weight dtype.")
flags.DEFINE_integer("eval_n", 128, "Held-out items for the final evaluation (0 = none).")
flags.DEFINE_integer("eval_seed", 1000, "World seed of the held-out set.")
flags.DEFINE_integer("eval_steps", 10, "DDIM steps of the evaluation sampler.")
flags.DEFINE_string("compilation_cache", "runs/miniature/jax_cache",
                    "Persistent XLA compilation cache (compiles cost minutes on 2 busy cores); empty = off.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    if FLAGS.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from tdae_jax.miniature import recipes
    from tdae_jax.miniature import train as T

    if not FLAGS.name:
        print("error: --name is required", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parents[1]
    out_dir = Path(FLAGS.out_dir or root / "tdae_jax" / "assets" / "miniature" / FLAGS.name)
    workdir = Path(FLAGS.workdir or Path("runs") / "miniature" / FLAGS.name)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "flags.flags").write_text(FLAGS.flags_into_string())
    opt = T.Optim(steps=FLAGS.steps, lr=FLAGS.lr, warmup=FLAGS.warmup, clip=FLAGS.clip,
                  weight_decay=FLAGS.weight_decay, ema_decay=FLAGS.ema_decay,
                  final_lr_fraction=FLAGS.final_lr_fraction)
    data = T.Data(seed=FLAGS.data_seed, n=FLAGS.n_train, size=FLAGS.size, kinds=tuple(FLAGS.kinds),
                  max_objects=FLAGS.max_objects, batch_size=FLAGS.batch_size)
    common = dict(seed=FLAGS.seed, out_dir=out_dir, workdir=workdir, save_dtype=FLAGS.save_dtype,
                  eval_n=FLAGS.eval_n, eval_seed=FLAGS.eval_seed, ckpt_every=FLAGS.ckpt_every,
                  log_every=FLAGS.log_every, time_limit_s=60.0 * FLAGS.time_limit_min)
    if FLAGS.model == "vae":
        cfg = T.VAEConfig(block_out_channels=tuple(int(c) for c in FLAGS.vae_channels),
                          layers_per_block=FLAGS.vae_layers, latent_channels=FLAGS.latent_channels,
                          norm_num_groups=FLAGS.vae_groups, l1_weight=FLAGS.l1_weight, l2_weight=FLAGS.l2_weight,
                          kl_weight=FLAGS.kl_weight, object_weight=FLAGS.object_weight,
                          edge_weight=FLAGS.edge_weight, size=FLAGS.size)
        report = recipes.run_vae(cfg, opt, data, **common)
    else:
        if not FLAGS.vae_dir:
            print("error: --vae_dir is required for ip2p / sd", file=sys.stderr)
            return 2
        cfg = T.DiffusionConfig(family=FLAGS.model, block_out_channels=tuple(int(c) for c in FLAGS.unet_channels),
                                attention_top=FLAGS.attention_top, layers_per_block=FLAGS.unet_layers, attention_heads=FLAGS.attention_heads,
                                text_hidden=FLAGS.text_hidden, text_layers=FLAGS.text_layers,
                                text_heads=FLAGS.text_heads, max_length=FLAGS.max_length,
                                p_drop_text=FLAGS.p_drop_text, p_drop_image=FLAGS.p_drop_image)
        report = recipes.run_diffusion(cfg, opt, data, vae_dir=FLAGS.vae_dir, eval_steps=FLAGS.eval_steps, **common)
    print(json.dumps({k: v for k, v in report.items() if k in ("steps_done", "train_wall_s", "eval", "final")},
                     default=str))
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
