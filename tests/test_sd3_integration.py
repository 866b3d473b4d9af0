"""SD3 as a surrogate in ``experiments.tdae`` and as a victim editor (``editors/sd3_img2img.py``), tiny models.

- The editor against diffusers 0.39.0's PyTorch ``StableDiffusion3Img2ImgPipeline`` built from tiny random
  components (SD3.5-style transformer with qk RMSNorm and a dual-attention block, 16-channel VAE, CLIP-L/G
  and T5 with character tokenizers saved as real tokenizer files), the same embeddings and the same injected
  noise (the generator's two draws: posterior sample, then start noise). Metric: max|a - b| / max|b|.
- The editor is per-image independent and deterministic for a key.
- ``python -m experiments.tdae --surrogate=sd3`` runs pge with ``--defense=fdm`` and pgd with ``--defense=tdae``
  to exit 0 and writes PNGs inside the budget; SA, and DPD with the text-free pge host, are refused (usage error).
- DPD with ``eps_t5``: separate L_inf budgets on the CLIP rows [0:77] and T5 rows [77:] of prompt_embeds,
  per-segment range clamp, the CLIP zero padding untouched.
"""
import csv
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from experiments import tdae as cli
from tdae_jax import configs, editors
from tdae_jax.defenses import dpd as dpd_lib
from tdae_jax.models import sd3, sd3_text

PARITY_TOL = 1e-3
# behaviour tests: compile cheaply (as tests/test_editors.py), without the fusion emitters (a third less compile time)
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
MAX_SEQ = 16
TR = dict(sd3.TINY_TRANSFORMER)  # 3 layers, qk rms_norm, dual attention in block 0


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------------------------------ torch parity
@pytest.fixture(scope="module")
def torch_tiny(tmp_path_factory):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def randomize(module, seed, std=0.2):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in module.named_parameters():
                noise = torch.randn(p.shape, generator=g) * std
                norm_w = p.ndim == 1 and "norm" in name and name.endswith("weight")
                p.copy_(1.0 + noise if norm_w else noise)
        return module.eval()

    root = str(tmp_path_factory.mktemp("sd3_img2img"))
    mods = {"transformer": randomize(diffusers.SD3Transformer2DModel(**TR), 0)}
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL(**sd3.TINY_VAE).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            elif name.endswith("weight"):
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
    mods["vae"] = vae
    mods["text_encoder"] = randomize(CLIPTextModelWithProjection(CLIPTextConfig(**sd3.TINY_CLIP,
                                                                               hidden_act="quick_gelu")), 2)
    mods["text_encoder_2"] = randomize(CLIPTextModelWithProjection(CLIPTextConfig(**sd3.TINY_CLIP,
                                                                                 hidden_act="gelu")), 3)
    mods["text_encoder_3"] = randomize(T5EncoderModel(T5Config(**sd3.TINY_T5)), 4)
    for name, m in mods.items():
        m.save_pretrained(os.path.join(root, name), safe_serialization=True)
    toks = {"tokenizer": sd3_text.char_tokenizer(77), "tokenizer_2": sd3_text.char_tokenizer(77, pad="!"),
            "tokenizer_3": sd3_text.char_tokenizer(MAX_SEQ, clip=False)}
    for name, t in toks.items():
        t.save_pretrained(os.path.join(root, name))
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.save_pretrained(os.path.join(root, "scheduler"))
    pipe = diffusers.StableDiffusion3Img2ImgPipeline(scheduler=sched, **mods, **toks)
    pipe.set_progress_bar_config(disable=True)
    return pipe, sd3.create(root, max_sequence_length=MAX_SEQ)


def test_editor_matches_diffusers_img2img_pipeline(torch_tiny):
    import torch

    pipe, model = torch_tiny
    t2n = lambda a: a.detach().numpy()  # noqa: E731
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(["a photo of a cat", "a red car at night"], None, None,
                                                      do_classifier_free_guidance=True, max_sequence_length=MAX_SEQ)
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    steps = 6  # default strength 0.6: t_start = int(6 - 3.5999999999999996) = 2 -> 4 Euler steps
    with torch.no_grad():
        ref = pipe(image=img, height=32, width=32, num_inference_steps=steps, prompt_embeds=pe,
                   negative_prompt_embeds=npe, pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=npooled,
                   generator=torch.Generator().manual_seed(11), output_type="latent",
                   max_sequence_length=MAX_SEQ).images
    assert pipe._num_timesteps == 4
    g = torch.Generator().manual_seed(11)  # the pipeline's draws, in order: posterior sample, start noise
    noise = {"encode": t2n(torch.randn(2, 16, 16, 16, generator=g)), "latents": t2n(torch.randn(2, 16, 16, 16,
                                                                                               generator=g))}
    fn = editors.make_editor("sd3_img2img", model, num_inference_steps=steps, output="latent", compiler_options=FAST)
    assert (fn.config.strength, fn.config.guidance_scale) == (0.6, 7.0) and fn.plan[0].shape == (4,)
    emb = (jnp.asarray(t2n(pe)), jnp.asarray(t2n(pooled)))
    neg = (jnp.asarray(t2n(npe)), jnp.asarray(t2n(npooled)))
    z = fn(jnp.asarray(t2n(img).transpose(0, 2, 3, 1)), emb, neg, jax.random.split(jax.random.key(0), 2),
           noise=noise)
    err = rel(z, t2n(ref))
    print(f"sd3_img2img final latent rel err {err:.2e} (4 Euler steps, CFG 7.0)")
    assert err <= PARITY_TOL
    with torch.no_grad():  # the decoded image, as the pipeline's postprocess
        ref_img = pipe.vae.decode(ref / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
        ref_img = t2n((ref_img / 2 + 0.5).clamp(0, 1)).transpose(0, 2, 3, 1)
    ours = np.clip(np.asarray(jax.jit(lambda m, z: m.decode(z), compiler_options=FAST)(model, z)), 0, 1)
    assert np.abs(ours - ref_img).max() <= PARITY_TOL


# ------------------------------------------------------------------------------------------ editor properties
@pytest.fixture(scope="module")
def tiny():
    from tdae_jax import pipeline

    return pipeline._tiny("sd3")  # the built-in surrogate the CLI runs use (cached per process)


def test_editor_per_image_independent_and_deterministic(tiny):
    fn = editors.make_editor("sd3", tiny, num_inference_steps=2, strength=1.0, compiler_options=FAST)
    x = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3))
    tb = tiny.text_batch(["a cat", "a dog on a hill", "snow"])
    emb, neg = (tb["emb"], tb["pooled"]), (tb["uncond"], tb["uncond_pooled"])
    k = jax.random.split(jax.random.key(7), 3)
    take = lambda idx: (x[idx], (emb[0][idx], emb[1][idx]), (neg[0][idx], neg[1][idx]), k[idx])  # noqa: E731
    a = np.asarray(fn(*take(np.array([0, 1]))))
    b = np.asarray(fn(*take(np.array([2, 1]))))  # image 1 in another batch, at another row
    c = np.asarray(fn(*take(np.array([1, 2]))))
    np.testing.assert_allclose(a[1], b[1], atol=1e-5)
    np.testing.assert_allclose(a[1], c[0], atol=1e-5)
    np.testing.assert_array_equal(a, np.asarray(fn(*take(np.array([0, 1])))))  # same keys: same edit
    xs, es, ns, _ = take(np.array([0, 1]))
    other = np.asarray(fn(xs, es, ns, jax.random.split(jax.random.key(8), 2)))
    assert np.abs(other - a).max() > 1e-3  # other keys: other noise
    assert a.shape == (2, 32, 32, 3) and a.min() >= 0.0 and a.max() <= 1.0


def test_pgd_objective_unrolls_the_editor(tiny):
    """SD3 PhotoGuard-diffusion loss = ||D(editor(x)) - gray||_2 with the editor fed the objective's noise, when
    K equals the editor's step count; fewer K coarsen the same schedule (same start sigma)."""
    from tdae_jax.models import flow_match
    from tdae_jax.objectives import common, photoguard_flow

    x = jax.random.uniform(jax.random.key(2), (3, 32, 32, 3))
    batch = {"x0": x, **tiny.text_batch(["a cat", "a dog on a hill", "snow"])}
    keys = jax.random.split(jax.random.key(4), 3)
    cfg = configs.Objective(name="pgd", denoise_steps=4, guidance_scale=7.0, pgd_grad_reps=1)  # one pass
    loss_fn = photoguard_flow.make_diffusion(tiny, cfg, editor_steps=6)  # 6 steps at strength 0.6: 4 run
    loss = jax.jit(loss_fn, compiler_options=FAST)(jnp.zeros_like(x), batch, batch["emb"], keys)
    shape = (16, 16, 16)  # latents of a 32 px image (tiny VAE: 2x down)
    noise = jax.jit(lambda keys: {  # the objective's draws (one program: eager draws compile one by one)
        "encode": jax.vmap(lambda k: jax.random.normal(k, shape))(common.posterior_sample_keys(keys)),
        "latents": common.draw_noise(keys, 1, shape)[0]}, compiler_options=FAST)(keys)
    fn = editors.make_editor("sd3_img2img", tiny, num_inference_steps=6, output="latent", compiler_options=FAST)
    z = fn(x, (batch["emb"], batch["pooled"]), (batch["uncond"], batch["uncond_pooled"]), keys, noise=noise)
    ref = jax.jit(lambda m, z: common.safe_l2(m.decode(z) - 0.5), compiler_options=FAST)(tiny, z)
    np.testing.assert_allclose(np.asarray(loss), np.asarray(ref), rtol=1e-4)
    # the defaults: the victim's 50-step schedule at strength 0.6 (sigma_s = 0.814 ... 0), coarsened to K steps
    _, victim = flow_match.set_timesteps(tiny.static.scheduler, 50)
    for k in (1, 2, 4):
        ts, sig = photoguard_flow.schedule(tiny, k)
        assert ts.shape == (k,) and sig[0] == victim[20] and sig[-1] == 0.0 and np.all(np.diff(sig) < 0)
        assert abs(float(sig[0]) - 0.814) < 1e-3


def test_integer_timesteps_index_the_shifted_training_grid(tiny):
    """What the UNet objectives draw (ints in [0, 1000)) maps to SD3's training grid, larger = noisier."""
    t = tiny.timestep(jnp.array([999, 500, 0]))
    grid = np.asarray(tiny.train_sigmas)
    np.testing.assert_allclose(np.asarray(t), 1000.0 * grid[[0, 499, 999]], rtol=1e-6)
    assert float(t[0]) == 1000.0 and abs(float(t[2]) - 2.994) < 1e-3
    assert float(tiny.timestep(jnp.array([250.5]))[0]) == 250.5  # floats are 1000 sigma as they are
    z0, n = jnp.ones((1, 2, 2, 2)), jnp.zeros((1, 2, 2, 2))
    np.testing.assert_allclose(tiny.add_noise(z0, n, jnp.array([999])), 0.0, atol=1e-7)  # sigma = 1: pure noise


def test_editor_rejects_unsupported_options(tiny):
    with pytest.raises(ValueError, match="FlowMatchEuler"):
        editors.make_editor("sd3_img2img", tiny, scheduler="ddim")
    with pytest.raises(ValueError, match="SD3 surrogate"):
        editors.make_editor("sd3_img2img", object())


# ------------------------------------------------------------------------------------------ DPD budgets
def test_dpd_separate_clip_and_t5_budgets():
    b, n_clip, n_t5, d, width = 2, 77, 8, 48, 32  # CLIP channels [0:32], zero padding [32:48]
    rng = np.random.default_rng(0)
    emb = np.zeros((b, n_clip + n_t5, d), np.float32)
    emb[:, :n_clip, :width] = rng.uniform(-2, 2, (b, n_clip, width))
    emb[:, n_clip:] = rng.uniform(-0.2, 0.2, (b, n_t5, d))  # T5 part: another scale
    emb = jnp.asarray(emb)
    w = jnp.asarray(rng.standard_normal(emb.shape), jnp.float32)
    cfg = configs.DPD(enabled=True, steps=30, step_size=0.01, eps=0.05, eps_t5=0.02)

    def loss_fn(delta, batch, e, keys):  # the text side minimizes -O = sum(w * e): saturates the box
        return -jnp.sum(w * e, axis=(1, 2))

    r = dpd_lib.run_round(loss_fn, jnp.zeros((b, 4, 4, 3)), {}, emb, jax.random.split(jax.random.key(0), b), cfg)
    td = np.asarray(r.text_delta)
    clip, pad, t5 = td[:, :n_clip, :width], td[:, :n_clip, width:], td[:, n_clip:]
    assert np.all(pad == 0.0)
    assert np.abs(clip).max() <= 0.05 + 1e-6 and np.abs(clip).max() >= 0.05 - 1e-6
    assert np.abs(t5).max() <= 0.02 + 1e-6 and np.abs(t5).max() >= 0.02 - 1e-6
    e = np.asarray(emb) + td  # per-segment clamp to [min c, max c]
    c_np = np.asarray(emb)
    for seg, ref in ((e[:, n_clip:], c_np[:, n_clip:]), (e[:, :n_clip, :width], c_np[:, :n_clip, :width])):
        assert np.all(seg.min(axis=(1, 2)) >= ref.min(axis=(1, 2)) - 1e-6)
        assert np.all(seg.max(axis=(1, 2)) <= ref.max(axis=(1, 2)) + 1e-6)
    assert np.all(np.asarray(r.loss_after) < np.asarray(r.loss_before))
    # eps_t5=None: one budget for every row, as before (SD1.x / IP2P)
    same = dpd_lib.project_text(jnp.full(emb.shape, 1.0), emb, configs.DPD(eps=0.05, clamp_to_range=False))
    assert float(jnp.abs(same).min()) == pytest.approx(0.05)


# ------------------------------------------------------------------------------------------ experiments.tdae
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd3_inputs")
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / "img.png")
    return d


CLI = ["--surrogate=sd3", "--size=32", "--steps=2", "--eps=0.03137254901960784", "--step_size=0.01",
        "--num_devices=1", "--report=false", "--log_every=1", "--timesteps=2"]


def _fast_jit(jit, fun=None, /, **kw):
    """``jax.jit`` with XLA's backend (LLVM) optimisation off, merged under any ``compiler_options`` passed."""
    kw["compiler_options"] = {**FAST, **(kw.get("compiler_options") or {})}
    return jit(fun, **kw) if fun is not None else functools.partial(_fast_jit, jit, **kw)


@pytest.fixture
def fast_compile(monkeypatch):
    """The command's programs (``jax.jit`` at call time: the protection step, its init, the text embedding) compile
    with XLA's backend optimisation off, as the behaviour tests above: these runs check what the command does,
    not its speed; the optimisation level changes no semantics, and a 2-step run of the tiny model stays short."""
    monkeypatch.setattr(jax, "jit", functools.partial(_fast_jit, jax.jit))


def _run(args):
    return cli.run_cli(["tdae"] + CLI + args)


def _check_outputs(work, max_linf=8):
    with open(work / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["done"], rows
    assert 0 < int(rows[0]["linf_255"]) <= max_linf
    out = np.asarray(Image.open(work / "protected" / "img.png"))
    assert out.shape == (40, 48, 3)
    return json.loads((work / "curves" / "img.json").read_text())


def test_cli_sd3_pge_fdm(images, tmp_path, tiny, fast_compile):
    work = tmp_path / "pge"
    assert _run([f"--images={images}", f"--workdir={work}", "--objective=pge", "--defense=fdm"]) == 0
    curves = _check_outputs(work)
    assert all(v == 0.0 for v in curves["dpd/round"])  # no DPD round ran (PGE + TDAE is refused: see below)


def test_cli_sd3_pgd_tdae_with_t5_budget(images, tmp_path, tiny, fast_compile):
    work = tmp_path / "pgd"
    code = _run([f"--images={images}", f"--workdir={work}", "--objective=pgd", "--denoise_steps=1",
                 "--defense=tdae", "--guidance_scale=1.0", "--pgd_grad_reps=1", "--dpd_period=1", "--dpd_steps=2",
                 "--dpd_eps=0.03137254901960784", "--dpd_eps_t5=0.01", "--dpd_step_size=0.02"])
    assert code == 0
    curves = _check_outputs(work)
    assert curves["dpd/round"] == [1.0, 1.0]
    linf = np.asarray(curves["dpd/text_linf"])
    assert np.all(linf > 0) and np.all(linf <= 0.03137254901960784 + 1e-6)
    assert np.all(np.isfinite(curves["loss"]))


def test_cli_sd3_rejects_sa(images, tmp_path, capsys):
    work = tmp_path / "sa"
    assert _run([f"--images={images}", f"--workdir={work}", "--objective=sa"]) == 2
    assert "not applicable to an SD3 surrogate" in capsys.readouterr().err
    assert not work.exists()


def test_cli_sd3_model_parallel(images, tmp_path, tiny, fast_compile):
    """Model parallelism through the command: ``--model_parallel=4`` on the 8 forced devices splits the
    transformer over a ("data", "model") = (2, 4) mesh and protects the image (that the split run equals the
    replicated one, with the weights kept split inside the compiled step, is
    test_sd3_sharding.py::test_protector_keeps_model_sharding_and_matches_replicated)."""
    work = tmp_path / "mp4"
    assert _run([f"--images={images}", "--objective=pgd", "--denoise_steps=1", "--guidance_scale=1.0",
                 "--pgd_grad_reps=1", "--num_devices=8", "--model_parallel=4", f"--workdir={work}"]) == 0
    curves = _check_outputs(work)
    assert np.all(np.isfinite(curves["loss"])) and len(curves["loss"]) == 2
    assert "--model_parallel=4" in (work / "flags.flags").read_text()


@pytest.mark.parametrize("args, message", [
    (["--surrogate=ip2p", "--model_parallel=2"], "parameter sharding is implemented for the sd3"),
    (["--model_parallel=3"], "must be >= 1 and divide the 8 devices"),
    (["--memory_efficient_attention"], "implemented for the UNet surrogates"),
    (["--dtype=bfloat16"], "implemented for the UNet surrogates"),
    (["--objective=pge", "--defense=tdae"], "no text to act on"),
])
def test_cli_model_parallel_usage_errors(images, tmp_path, capsys, args, message):
    work = tmp_path / "bad"
    assert cli.run_cli(["tdae"] + CLI + [f"--images={images}", f"--workdir={work}", "--num_devices=8"] + args) == 2
    assert message in capsys.readouterr().err
    assert not work.exists()
