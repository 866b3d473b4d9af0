r"""Protect one identity's photos with DLADiff (layer 1 anti-fine-tuning, layer 2 anti-zero-shot) or the
layer-1 baselines: Anti-DreamBooth's ASPL and FSMG, DisDiff (built on ASPL) and Anti-Diffusion.

    python -m experiments.dladiff --flagfile=experiments/flags/dladiff_both.flags
    python -m experiments.dladiff --flagfile=experiments/flags/dladiff_layer1.flags \
        --images=ids/n000050/set_B --clean_images=ids/n000050/set_A --weights_dir=/models/sd21base

All inputs of a run are one identity. --images is required; --weights_dir is required for layer 1 above 64 px
(--weights_dir=tiny: the built-in random tiny SD model, plumbing only; layer 2 alone loads no SD model).
Exit code: 0 every input protected, 1 some inputs failed (the others are done), 2 usage error (one line,
nothing written). Re-running with the same --workdir resumes (done images are skipped; ADFT resumes
from its last epoch checkpoint when --ckpt_every > 0).
"""
from __future__ import annotations

import logging
from pathlib import Path

from absl import flags

from experiments import common

FLAGS = flags.FLAGS


SHARED = ("images", "workdir", "weights_dir", "surrogate", "seed", "size", "resize", "num_devices", "ckpt_every",
          "memory_efficient_attention", "dtype", "retry_failed", "report", "overwrite")


COMMAND = "experiments.dladiff"


def _define(kind: str, name: str, default, *args):
    """``common.define_once`` with this command's ``SHARED`` flags."""
    common.define_once(SHARED, kind, name, default, *args)


def define_flags():
    common.section(COMMAND, "inputs")
    _define("string", "images", "", "Folder or glob of one identity's photos to protect (required); pkg:samples = "
            "the shipped sample photos.")
    _define("string", "clean_images", "", "Extra clean photos of the identity (set_A); X_clean = these + inputs.")
    _define("string", "prompt", "a photo of sks person", "Instance prompt (DLADiff §3.2).")
    common.section(COMMAND, "method")
    _define("enum", "method", "dladiff", ["dladiff", "aspl", "fsmg", "disdiff", "antidiffusion", "none"], "Layer 1 "
            "(none = layer 2 alone; aspl / fsmg: Anti-DreamBooth; disdiff: DisDiff, on ASPL's loop; antidiffusion: "
            "Anti-Diffusion, prompt tuning + semantic disturbance + UNet fine-tuning).")
    _define("bool", "layer2", False, "Add DLADiff's anti-zero-shot identity layer (after layer 1).")
    _define("integer", "seed", 0, "Base PRNG seed; keys are derived per image id and step.")
    common.section(COMMAND, "model")
    _define("string", "weights_dir", "", "Local diffusers-format SD directory (layer 1's surrogate) or tiny (the "
            f"built-in random tiny SD model: plumbing only, layer 1 then at 32 px); required for layer 1 above "
            f"{common.TINY_MAX_SIZE} px.")
    _define("enum", "surrogate", "sd", ["sd", "ip2p", "inpaint", "sd3"], "Surrogate family (DLADiff: sd).")
    _define("bool", "memory_efficient_attention", False, common.MEA_HELP)
    _define("enum", "dtype", "float32", common.DTYPES, common.DTYPE_HELP)
    common.section(COMMAND, "compute")
    _define("integer", "size", 512, "Working resolution (multiple of 8).")
    _define("enum", "resize", "center_crop", ["none", "center_crop", "resize", "pad"], "Input -> working size.")
    _define("integer", "num_devices", 0, "Devices in the data mesh; 0 = all.")
    common.section(COMMAND, "output")
    _define("string", "workdir", "runs/dladiff", "Output folder (never an input folder).")
    _define("integer", "ckpt_every", 0, "Orbax checkpoint every k ADFT epochs (0 = off).")
    _define("bool", "retry_failed", False, "On resume, retry inputs that failed before.")
    _define("bool", "overwrite", False, "Start the workdir afresh (its previous outputs removed); without it a "
            "workdir made with other settings is refused (exit 2). Not saved in flags.flags.")
    _define("bool", "report", True, "Write report.html.")
    _define_layer1()
    _define_layer2()
    common.section("", "")


def _define_layer1():
    common.section(COMMAND, "layer 1: surrogate fine-tuning (DSUR / FSMG)")
    _define("integer", "static_steps", 400, "DSUR / FSMG surrogate DreamBooth steps.")
    _define("float", "static_lr", 5e-6, "DSUR learning rate (Adam).")
    _define("integer", "static_batch", 4, "DSUR batch size.")
    _define("float", "max_grad_norm", 1.0, "Gradient clipping of every fine-tuning (<= 0: off).")
    _define("bool", "latent_sample", True, "z0 = VAE posterior sample (diffusers) instead of the mean.")
    common.section(COMMAND, "layer 1: budget and optimizer (ADFT)")
    _define("float", "eps_ft", 7.0 / 255.0, "Layer-1 L_inf budget in [0,1] units.")
    _define("float", "step_ft", 5e-3, "Layer-1 PGD step in [0,1] units.")
    _define("integer", "epochs", 50, "ADFT epochs iter_opt (ASPL / DisDiff / Anti-Diffusion: outer epochs).")
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
    common.section(COMMAND, "layer 1: baselines (ASPL / FSMG / DisDiff)")
    _define("integer", "aspl_clean_steps", 3, "ASPL / DisDiff: surrogate steps on clean photos per epoch.")
    _define("integer", "aspl_pgd_steps", 6, "ASPL / DisDiff: PGD steps per epoch.")
    _define("integer", "aspl_adv_steps", 3, "ASPL / DisDiff: training steps on the perturbed photos per epoch.")
    _define("integer", "fsmg_steps", 100, "FSMG: PGD steps against the fixed surrogate.")
    _define("float", "baseline_lr", 5e-7, "ASPL / DisDiff / FSMG (adb) / Anti-Diffusion training learning rate "
            "(AdamW).")
    _define("enum", "fsmg_surrogate", "dsur", ["adb", "dsur"], "FSMG's fixed surrogate: adb = Anti-DreamBooth's "
            "DreamBooth recipe on the clean photos (--fsmg_surrogate_steps, --baseline_* below), dsur = DLADiff's "
            "static surrogate (--static_*), the one DLADiff's own layer 1 attacks.")
    _define("integer", "fsmg_surrogate_steps", 1000, "FSMG (adb): DreamBooth steps of the surrogate.")
    _define("integer", "fsmg_surrogate_batch", 2, "FSMG (adb): DreamBooth batch size of the surrogate.")
    _define("bool", "baseline_train_text_encoder", False, "ASPL / DisDiff / FSMG (adb): train the text encoder "
            "too (Anti-DreamBooth, DisDiff: true).")
    _define("float", "baseline_prior_weight", 0.0, "ASPL / DisDiff / FSMG (adb): prior-preservation weight "
            "(Anti-DreamBooth, DisDiff: 1.0; > 0 samples --baseline_num_class_images class images of 'a photo of "
            "person' from the surrogate).")
    _define("integer", "baseline_num_class_images", 200, "ASPL / DisDiff / FSMG (adb): class images for the prior "
            "term.")
    _define("integer", "baseline_class_steps", 50, "ASPL / DisDiff / FSMG (adb): DDIM steps per class image.")
    _define("float", "baseline_step", 2.5e-3, "ASPL / DisDiff / FSMG / Anti-Diffusion PGD step in [0,1] units "
            "(Anti-DreamBooth and DisDiff --pgd_alpha 5e-3 on [-1,1] pixels; Anti-Diffusion 2e-3 there, 1e-3 here); "
            "their budget is --eps_ft.")
    _define_disdiff()
    _define_antidiffusion()


def _define_disdiff():
    common.section(COMMAND, "layer 1: DisDiff (CAE term, MSS step, SimAC timestep search)")
    _define("float", "disdiff_att_weight", 0.1, "DisDiff: weight lambda of the Cross-Attention Erasure term "
            "(--att_param; 0 = no CAE term).")
    _define("float", "disdiff_temperature", 100.0, "DisDiff: the CAE softmax's scale over the prompt's tokens.")
    _define("string", "disdiff_token", "sks", "DisDiff: the prompt word whose cross-attention share is erased.")
    _define("integer", "disdiff_att_resolution", 16, "DisDiff: cross-attention maps of this side feed the CAE term.")
    _define("bool", "disdiff_mss", True, "DisDiff: Merit Sampling Scheduler, step x (1 + cos(pi t / (T-1))) / 2.")
    _define("bool", "disdiff_search", True, "DisDiff: SimAC's adaptive timestep search before the epochs "
            "(--use_search); off = t uniform in [0, T).")
    _define("integer", "disdiff_search_steps", 50, "DisDiff: at most this many search rounds (--max_steps).")
    _define("integer", "disdiff_search_candidates", 5, "DisDiff: timesteps scored per search round.")
    _define("integer", "disdiff_search_window", 20, "DisDiff: a round removes [t - w, t + w) around the "
            "lowest-scoring candidate (--delta_t).")
    _define("integer", "disdiff_search_keep", 100, "DisDiff: the search stops once at most this many timesteps "
            "remain.")
    _define("bool", "disdiff_shared_surrogate", True, "DisDiff: train one model on the clean then the perturbed "
            "photos, as DisDiff's code (false: attack a copy, as ASPL).")


def _define_antidiffusion():
    common.section(COMMAND, "layer 1: Anti-Diffusion (prompt tuning, semantic disturbance, UNet fine-tuning)")
    _define("integer", "antidiffusion_pgd_steps", 10, "Anti-Diffusion: PGD steps per phase (the first phase, then "
            "one per epoch; each within --antidiffusion_phase_eps of where it starts).")
    _define("integer", "antidiffusion_tune_steps", 20, "Anti-Diffusion: UNet fine-tuning steps per epoch on the "
            "perturbed photos and the tuned embedding (AdamW, --baseline_lr).")
    _define("integer", "antidiffusion_pto_steps", 30, "Anti-Diffusion: prompt-tuning steps per call (before the "
            "first phase, then after each epoch's phase but the last).")
    _define("float", "antidiffusion_pto_lr", 1e-3, "Anti-Diffusion: prompt-tuning AdamW learning rate.")
    _define("float", "antidiffusion_pto_wd", 1e-2, "Anti-Diffusion: prompt-tuning AdamW weight decay.")
    _define("string", "antidiffusion_init_prompt", "", "Anti-Diffusion: the prompt whose text-encoder output "
            "starts the prompt tuning (empty: the reference's).")
    _define("float", "antidiffusion_sdl_weight", 1.0, "Anti-Diffusion: weight of the semantic disturbance term "
            "(the clipped, scaled cross-attention maps driven to zero; 0 = L_cond alone).")
    _define("float", "antidiffusion_sdl_scale", 100.0, "Anti-Diffusion: the cross-attention maps are multiplied "
            "by this, then clipped to [0, 1].")
    _define("integer", "antidiffusion_att_resolution", 16, "Anti-Diffusion: cross-attention maps of this side feed "
            "the semantic disturbance term.")
    _define("float", "antidiffusion_phase_eps", 0.005, "Anti-Diffusion: L_inf radius in [0,1] units of each PGD "
            "phase around its starting point (0 = off); the total stays within --eps_ft.")


def _define_layer2():
    common.section(COMMAND, "layer 2: budget and optimizer (anti-zero-shot)")
    _define("float", "eps_zs", 11.0 / 255.0, "Layer-2 L_inf budget in [0,1] units.")
    _define("float", "step_zs", 8e-4, "Layer-2 PGD step in [0,1] units.")
    _define("integer", "zs_max_steps", 1000, "Layer-2 step limit.")
    _define("float", "zs_threshold", 0.1, "Layer 2 stops when max_i cos_i < this.")
    _define("integer", "zs_check_every", 10, "Check the stop rule every k steps.")
    _define("float", "zs_jitter_linear", 0.01, "Std of the alignment jitter on the 2x2 part.")
    _define("float", "zs_jitter_translation", 1.0, "Std of the alignment jitter on the translation (px).")
    _define("enum", "zs_space", "aligned", ["aligned", "image"], "Where delta_zs lives.")
    common.section(COMMAND, "layer 2: identity encoders and landmarks")
    _define("list", "encoders", ["dlib"], "Identity encoders: dlib, onnx:<path.onnx> (insightface ArcFace), "
            "iresnet18/34/50/100 (random init unless --encoder_params), iresnet_tiny.")
    _define("list", "encoder_params", [], "name=path.msgpack Flax params for IResNet encoders.")
    _define("string", "landmarks", "", "JSON {id or file name: [[x,y]]*5 insightface order | {arcface|dlib: ...}}.")
    _define("enum", "detector", "auto", ["auto", "dlib", "none"], "Face landmarks when not in --landmarks.")
    _define("enum", "missing_face", "layer1_only", ["layer1_only", "fail"], "Layer 2 on an image with no face.")


define_flags()


def config_from_flags(F):
    """The flags as a ``DLADiffRunConfig`` (``ValueError``: a usage error); ``--weights_dir=tiny`` -> ``""``."""
    from tdae_jax.defenses.dladiff import adft, antidiffusion, baselines, disdiff, dsur, zeroshot
    from tdae_jax.runs import dladiff as run

    if F.surrogate != "sd" and F.method != "none":
        raise ValueError("DLADiff protects against Stable Diffusion fine-tuning: --surrogate must be sd, got "
                         f"{F.surrogate}")
    if F.method == "antidiffusion" and (F.baseline_train_text_encoder or F.baseline_prior_weight > 0):
        raise ValueError("--method=antidiffusion fine-tunes the UNet alone on its tuned embedding, without a prior "
                         "term: --baseline_train_text_encoder and --baseline_prior_weight do not apply")
    return run.DLADiffRunConfig(
        images=common.resolve_package_path(F.images), workdir=F.workdir,
        clean_images=common.resolve_package_path(F.clean_images),
        weights_dir=common.resolve_weights(F.weights_dir), surrogate=F.surrogate, method=F.method, layer2=F.layer2,
        prompt=F.prompt,
        static=dsur.static_config(F.static_steps, F.static_lr, F.static_batch, F.max_grad_norm, F.latent_sample),
        adft=adft.ADFTConfig(eps=F.eps_ft, step_size=F.step_ft, epochs=F.epochs, iter1=F.iter1, iter2=F.iter2,
                             iter3=F.iter3, lr=F.adft_lr, weight_decay=F.adft_wd, max_grad_norm=F.max_grad_norm,
                             w_cross=F.w_cross, w_self=F.w_self, update=F.update, latent_sample=F.latent_sample),
        att_resolution=F.att_resolution, att_layers=tuple(F.att_layers), att_kinds=tuple(F.att_kinds),
        baseline=baselines.BaselineConfig(
            method=F.method if F.method in ("aspl", "fsmg", "disdiff", "antidiffusion") else "aspl", eps=F.eps_ft,
            step_size=F.baseline_step,
            epochs=F.epochs, clean_steps=F.aspl_clean_steps,
            pgd_steps=F.fsmg_steps if F.method == "fsmg" else F.aspl_pgd_steps, adv_steps=F.aspl_adv_steps,
            lr=F.baseline_lr, max_grad_norm=F.max_grad_norm, latent_sample=F.latent_sample, update=F.update,
            train_text_encoder=F.baseline_train_text_encoder, prior_weight=F.baseline_prior_weight,
            num_class_images=F.baseline_num_class_images, class_steps=F.baseline_class_steps, prompt=F.prompt,
            fsmg_surrogate=F.fsmg_surrogate, fsmg_surrogate_steps=F.fsmg_surrogate_steps,
            fsmg_surrogate_batch=F.fsmg_surrogate_batch),
        disdiff=disdiff.DisDiffConfig(
            att_weight=F.disdiff_att_weight, temperature=F.disdiff_temperature, token=F.disdiff_token,
            resolution=F.disdiff_att_resolution, mss=F.disdiff_mss, search=F.disdiff_search,
            search_steps=F.disdiff_search_steps, search_candidates=F.disdiff_search_candidates,
            search_window=F.disdiff_search_window, search_keep=F.disdiff_search_keep,
            shared_surrogate=F.disdiff_shared_surrogate),
        antidiffusion=antidiffusion.AntiDiffusionConfig(
            pgd_steps=F.antidiffusion_pgd_steps, tune_steps=F.antidiffusion_tune_steps,
            pto_steps=F.antidiffusion_pto_steps, pto_lr=F.antidiffusion_pto_lr,
            pto_weight_decay=F.antidiffusion_pto_wd, sdl_weight=F.antidiffusion_sdl_weight,
            sdl_scale=F.antidiffusion_sdl_scale, resolution=F.antidiffusion_att_resolution,
            phase_eps=F.antidiffusion_phase_eps, init_prompt=F.antidiffusion_init_prompt),
        zs=zeroshot.ZSConfig(eps=F.eps_zs, step_size=F.step_zs, max_steps=F.zs_max_steps, threshold=F.zs_threshold,
                             check_every=F.zs_check_every, jitter_linear=F.zs_jitter_linear,
                             jitter_translation=F.zs_jitter_translation, space=F.zs_space),
        encoders=tuple(F.encoders), encoder_params=tuple(F.encoder_params), landmarks=F.landmarks,
        detector=F.detector, missing_face=F.missing_face, size=None if F.resize == "none" else F.size,
        resize=F.resize, seed=F.seed, num_devices=F.num_devices or None, ckpt_every=F.ckpt_every,
        memory_efficient_attention=F.memory_efficient_attention, dtype=F.dtype,
        retry_failed=F.retry_failed, report=F.report, overwrite=F.overwrite)


INSTEAD = ("python -m experiments.dladiff --flagfile=experiments/flags/dladiff_layer1.flags --images=DIR "
           "--weights_dir=<SD-2.1-base directory> (--images=pkg:samples --weights_dir=tiny: a plumbing check on "
           "the shipped samples)")


def main(argv):
    """Flags -> ``DLADiffRunConfig`` -> ``run.run``; the usage errors (exit 2) come before anything is written."""
    if len(argv) > 1:
        return common.usage_error(f"unexpected arguments: {argv[1:]}")
    from tdae_jax.runs import dladiff as run
    from tdae_jax.runs import errors

    try:
        cfg = config_from_flags(FLAGS)
        common.require_images(FLAGS, INSTEAD)
        common.require_weights(FLAGS, needs_model=FLAGS.method != "none")
    except (ValueError, TypeError) as e:
        return common.usage_error(e)
    log = logging.getLogger("tdae_jax").info
    if FLAGS.method != "none":
        log(f"layer 1 ({FLAGS.method}): loading the SD surrogate from {FLAGS.weights_dir or common.TINY}, then "
            "compiling (the first progress line includes the compilation)")
    try:
        result = run.run(cfg, progress=log)
        common.write_flagfile(FLAGS, Path(cfg.workdir) / "flags.flags")
    except run.UsageError as e:
        return common.usage_error(e)
    except errors.RunError as e:  # the workdir became unwritable: re-running resumes
        return common.run_error(e)
    except OSError as e:  # flags.flags could not be written
        return common.run_error(errors.write_failure(cfg.workdir, "flags.flags", e))
    return common.summarize(result, cfg.workdir)


def run_cli(argv: list[str]) -> int:
    """In-process run of ``argv`` (tests); see ``common.run_cli``."""
    return common.run_cli(main, argv)


if __name__ == "__main__":
    common.run_main(main)
