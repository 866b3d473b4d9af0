r"""Protect one identity's photos with DLADiff (layer 1 anti-fine-tuning, layer 2 anti-zero-shot) or the
Anti-DreamBooth baselines (ASPL, FSMG).

    python -m experiments.dladiff --flagfile=experiments/flags/dladiff_both.flags
    python -m experiments.dladiff --flagfile=experiments/flags/dladiff_layer1.flags \
        --images=ids/n000050/set_B --clean_images=ids/n000050/set_A --weights_dir=/models/sd21base

All inputs of a run are one identity. Exit code: 0 every input protected, 1 some inputs failed (the others
are done), 2 usage error. Re-running with the same --workdir resumes (done images are skipped; ADFT resumes
from its last epoch checkpoint when --ckpt_every > 0).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS


SHARED = ("images", "workdir", "weights_dir", "surrogate", "seed", "size", "resize", "num_devices", "ckpt_every",
          "memory_efficient_attention", "dtype", "retry_failed", "report")


def _define(kind: str, name: str, default, *args):
    """Define a flag once. The IO flags (``SHARED``) mean the same in experiments.tdae: when both modules are
    imported in one process (the test suite) whichever comes first defines them, and ours allow the other's
    definition to replace them (the flagfiles set every value they rely on). ``args``: the help string
    (enum: the choices, then the help string)."""
    if name in FLAGS:
        return
    common.track(getattr(flags, f"DEFINE_{kind}"))(name, default, *args, allow_override=name in SHARED)


def define_flags():
    # shared IO flags
    _define("string", "images", "", "Folder or glob of one identity's photos to protect. Empty = the shipped samples.")
    _define("string", "workdir", "runs/dladiff", "Output folder (never an input folder).")
    _define("string", "weights_dir", "", "Local diffusers-format SD directory; empty = built-in tiny surrogate.")
    _define("enum", "surrogate", "sd", ["sd", "ip2p", "inpaint", "sd3"], "Surrogate family (DLADiff: sd).")
    _define("integer", "seed", 0, "Base PRNG seed; keys are derived per image id and step.")
    _define("integer", "size", 512, "Working resolution (multiple of 8).")
    _define("enum", "resize", "center_crop", ["none", "center_crop", "resize", "pad"], "Input -> working size.")
    _define("integer", "num_devices", 0, "Devices in the data mesh; 0 = all.")
    _define("bool", "memory_efficient_attention", False, common.MEA_HELP)
    _define("enum", "dtype", "float32", common.DTYPES, common.DTYPE_HELP)
    _define("integer", "ckpt_every", 0, "Orbax checkpoint every k ADFT epochs (0 = off).")
    _define("bool", "retry_failed", False, "On resume, retry inputs that failed before.")
    _define("bool", "report", True, "Write report.html.")
    # what to run
    _define("enum", "method", "dladiff", ["dladiff", "aspl", "fsmg", "none"], "Layer 1 (none = layer 2 alone).")
    _define("bool", "layer2", False, "Add DLADiff's anti-zero-shot identity layer (after layer 1).")
    _define("string", "clean_images", "", "Extra clean photos of the identity (set_A); X_clean = these + inputs.")
    _define("string", "prompt", "a photo of sks person", "Instance prompt (DLADiff §3.2).")
    # DSUR / FSMG surrogate fine-tuning
    _define("integer", "static_steps", 400, "DSUR / FSMG surrogate DreamBooth steps.")
    _define("float", "static_lr", 5e-6, "DSUR learning rate (Adam).")
    _define("integer", "static_batch", 4, "DSUR batch size.")
    _define("float", "max_grad_norm", 1.0, "Gradient clipping of every fine-tuning (<= 0: off).")
    _define("bool", "latent_sample", True, "z0 = VAE posterior sample (diffusers) instead of the mean.")
    # ADFT
    _define("float", "eps_ft", 7.0 / 255.0, "Layer-1 L_inf budget in [0,1] units.")
    _define("float", "step_ft", 5e-3, "Layer-1 PGD step in [0,1] units.")
    _define("integer", "epochs", 50, "ADFT epochs iter_opt (ASPL: outer epochs).")
    _define("integer", "iter1", 3, "Stage 1 (attention) PGD steps per epoch.")
    _define("integer", "iter2", 3, "Stage 2 (L_cond) PGD steps per epoch.")
    _define("integer", "iter3", 3, "Stage 3 UNet_d training steps per epoch.")
    _define("float", "adft_lr", 5e-7, "Stage 3 AdamW learning rate.")
    _define("float", "adft_wd", 1e-2, "Stage 3 AdamW weight decay.")
    _define("integer", "att_resolution", 16, "Attention maps of this side feed L_att.")
    _define("list", "att_layers", [], "Explicit attention module path prefixes (overrides att_resolution).")
    _define("list", "att_kinds", ["attn1", "attn2"], "attn1 = self, attn2 = cross attention.")
    _define("float", "w_cross", 1.0, "Weight of the cross-attention term.")
    _define("float", "w_self", 1.0, "Weight of the self-attention term.")
    _define("enum", "update", "sign", ["sign", "raw"], "PGD update: sign (project default) or raw gradient.")
    # baselines
    _define("integer", "aspl_clean_steps", 3, "ASPL: surrogate-copy steps on clean photos per epoch.")
    _define("integer", "aspl_pgd_steps", 6, "ASPL: PGD steps per epoch.")
    _define("integer", "aspl_adv_steps", 3, "ASPL: training steps on the perturbed photos per epoch.")
    _define("integer", "fsmg_steps", 100, "FSMG: PGD steps against the fixed surrogate.")
    _define("float", "baseline_lr", 5e-7, "ASPL training learning rate (AdamW).")
    # layer 2
    _define("float", "eps_zs", 11.0 / 255.0, "Layer-2 L_inf budget in [0,1] units.")
    _define("float", "step_zs", 8e-4, "Layer-2 PGD step in [0,1] units.")
    _define("integer", "zs_max_steps", 1000, "Layer-2 step limit.")
    _define("float", "zs_threshold", 0.1, "Layer 2 stops when max_i cos_i < this.")
    _define("integer", "zs_check_every", 10, "Check the stop rule every k steps.")
    _define("float", "zs_jitter_linear", 0.01, "Std of the alignment jitter on the 2x2 part.")
    _define("float", "zs_jitter_translation", 1.0, "Std of the alignment jitter on the translation (px).")
    _define("enum", "zs_space", "aligned", ["aligned", "image"], "Where delta_zs lives.")
    _define("list", "encoders", ["dlib"], "Identity encoders: dlib, onnx:<path.onnx> (insightface ArcFace), "
            "iresnet18/34/50/100 (random init unless --encoder_params), iresnet_tiny.")
    _define("list", "encoder_params", [], "name=path.msgpack Flax params for IResNet encoders.")
    _define("string", "landmarks", "", "JSON {id or file name: [[x,y]]*5 insightface order | {arcface|dlib: ...}}.")
    _define("enum", "detector", "auto", ["auto", "dlib", "none"], "Face landmarks when not in --landmarks.")
    _define("enum", "missing_face", "layer1_only", ["layer1_only", "fail"], "Layer 2 on an image with no face.")


define_flags()


def config_from_flags(F):
    from tdae_jax.data import io as dio
    from tdae_jax.defenses.dladiff import adft, baselines, dsur, run, zeroshot

    if F.surrogate != "sd" and F.method != "none":
        raise ValueError(f"DLADiff protects against Stable Diffusion fine-tuning: --surrogate must be sd, got {F.surrogate}")
    return run.DLADiffRunConfig(
        images=F.images or str(dio.sample_dir()), workdir=F.workdir, clean_images=F.clean_images,
        weights_dir=F.weights_dir, surrogate=F.surrogate, method=F.method, layer2=F.layer2, prompt=F.prompt,
        static=dsur.static_config(F.static_steps, F.static_lr, F.static_batch, F.max_grad_norm, F.latent_sample),
        adft=adft.ADFTConfig(eps=F.eps_ft, step_size=F.step_ft, epochs=F.epochs, iter1=F.iter1, iter2=F.iter2,
                             iter3=F.iter3, lr=F.adft_lr, weight_decay=F.adft_wd, max_grad_norm=F.max_grad_norm,
                             w_cross=F.w_cross, w_self=F.w_self, update=F.update, latent_sample=F.latent_sample),
        att_resolution=F.att_resolution, att_layers=tuple(F.att_layers), att_kinds=tuple(F.att_kinds),
        baseline=baselines.BaselineConfig(
            method=F.method if F.method in ("aspl", "fsmg") else "aspl", eps=F.eps_ft, step_size=F.step_ft,
            epochs=F.epochs, clean_steps=F.aspl_clean_steps,
            pgd_steps=F.fsmg_steps if F.method == "fsmg" else F.aspl_pgd_steps, adv_steps=F.aspl_adv_steps,
            lr=F.baseline_lr, max_grad_norm=F.max_grad_norm, latent_sample=F.latent_sample, update=F.update),
        zs=zeroshot.ZSConfig(eps=F.eps_zs, step_size=F.step_zs, max_steps=F.zs_max_steps, threshold=F.zs_threshold,
                             check_every=F.zs_check_every, jitter_linear=F.zs_jitter_linear,
                             jitter_translation=F.zs_jitter_translation, space=F.zs_space),
        encoders=tuple(F.encoders), encoder_params=tuple(F.encoder_params), landmarks=F.landmarks,
        detector=F.detector, missing_face=F.missing_face, size=None if F.resize == "none" else F.size,
        resize=F.resize, seed=F.seed, num_devices=F.num_devices or None, ckpt_every=F.ckpt_every,
        memory_efficient_attention=F.memory_efficient_attention, dtype=F.dtype,
        retry_failed=F.retry_failed, report=F.report)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from tdae_jax.defenses.dladiff import run

    try:
        cfg = config_from_flags(FLAGS)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = run.run(cfg, progress=logging.getLogger("tdae_jax").info)
    except run.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    common.write_flagfile(FLAGS, Path(cfg.workdir) / "flags.flags")
    return common.summarize(result, cfg.workdir)


def run_cli(argv: list[str]) -> int:
    """In-process run of ``argv`` (tests); see ``common.run_cli``."""
    return common.run_cli(main, argv)


if __name__ == "__main__":
    common.run_main(main)
