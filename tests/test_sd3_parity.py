"""SD3 parity with diffusers 0.39.0 / transformers 4.57.6 (PyTorch, CPU) on tiny random models.

The torch modules are built with tiny configs, saved with ``save_pretrained`` (safetensors) and
loaded with our torch-free loaders. Metric: rel err = max|a - b| / max|b|, float32, bound 1e-4.
Random weights use std 0.2 (a realistic conditioning; with std 0.3 and no qk-norm the tiny
random net is chaotic enough that float32 reassociation alone reaches ~1e-4). Implementation
exactness is checked separately in float64 (1e-10) with identical timestep sinusoids.
"""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tdae_jax.models import flow_match, sd3, sd3_io, sd3_text, sd3_transformer  # noqa: E402

TOL = 1e-4
TR_BASE = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
               num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=32,
               pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16)
SD3_MEDIUM = dict(TR_BASE, qk_norm=None, dual_attention_layers=())
SD35_MEDIUM = dict(TR_BASE, qk_norm="rms_norm", dual_attention_layers=(0, 1))
CLIP_L = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              projection_dim=16, max_position_embeddings=77, bos_token_id=97, eos_token_id=2, pad_token_id=1,
              hidden_act="quick_gelu")
CLIP_G = dict(CLIP_L, hidden_size=24, intermediate_size=48, num_attention_heads=3, hidden_act="gelu")
T5 = dict(vocab_size=100, d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
          feed_forward_proj="gated-gelu", is_encoder_decoder=False)
MAX_SEQ = 24
PROMPTS = ["a photo of a cat", "a red car parked on a long street at night, high detail"]
ERRORS = {}  # component -> measured rel err (printed at the end with -s)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def record(name, err):
    ERRORS[name] = max(err, ERRORS.get(name, 0.0))
    return err


def randomize(module, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_norm_weight = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1.0 + noise if is_norm_weight else noise)
    return module.eval()


def torch_transformer(cfg, seed=0):
    torch.manual_seed(seed)
    return randomize(diffusers.SD3Transformer2DModel(**cfg), seed=seed)


def t2n(x):
    return x.detach().numpy()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A diffusers-layout SD3.5-style directory of tiny random torch models + the torch modules."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    root = str(tmp_path_factory.mktemp("sd3"))
    mods = {"transformer": torch_transformer(SD35_MEDIUM)}
    torch.manual_seed(1)
    mods["vae"] = diffusers.AutoencoderKL(**sd3.TINY_VAE).eval()
    with torch.no_grad():  # random, well conditioned: N(0, 1/fan_in) kernels, norms near identity
        for name, p in mods["vae"].named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            elif name.endswith("weight"):
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
    mods["text_encoder"] = randomize(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)), seed=2)
    mods["text_encoder_2"] = randomize(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)), seed=3)
    mods["text_encoder_3"] = randomize(T5EncoderModel(T5Config(**T5)), seed=4)
    for name, m in mods.items():
        m.save_pretrained(os.path.join(root, name), safe_serialization=True)
    toks = {"tokenizer": sd3_text.char_tokenizer(77), "tokenizer_2": sd3_text.char_tokenizer(77, pad="!"),
            "tokenizer_3": sd3_text.char_tokenizer(MAX_SEQ, clip=False)}
    for name, t in toks.items():
        t.save_pretrained(os.path.join(root, name))
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.save_pretrained(os.path.join(root, "scheduler"))
    mods.update(toks, scheduler=sched)
    return root, mods


@pytest.fixture(scope="module")
def model(tiny_dir):
    return sd3.create(tiny_dir[0], max_sequence_length=MAX_SEQ)


# ------------------------------------------------------------------------------------------ transformer
def _run_transformer(tm, module, params, shape, seed=0, t=(981.25, 203.5)):
    g = torch.Generator().manual_seed(seed)
    cfg = tm.config
    x = torch.randn((2, cfg.in_channels) + shape, generator=g)
    c = torch.randn(2, 11, cfg.joint_attention_dim, generator=g)
    pool = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    tt = torch.tensor(t)
    with torch.no_grad():
        ref = t2n(tm(x, c, pool, tt).sample)
    out = jax.jit(module.apply)({"params": params}, *(jnp.asarray(t2n(a)) for a in (x, c, pool, tt)))
    return np.asarray(out), ref


@pytest.mark.parametrize("cfg,label", [(SD3_MEDIUM, "sd3-medium"), (SD35_MEDIUM, "sd3.5-medium")])
def test_transformer_parity(tmp_path, cfg, label):
    tm = torch_transformer(cfg)
    tm.save_pretrained(tmp_path, safe_serialization=True)
    module, params = sd3_transformer.load_transformer(str(tmp_path))
    # the last block is context_pre_only: it has no to_add_out / ff_context / norm2_context
    last = params[f"transformer_blocks_{cfg['num_layers'] - 1}"]
    assert not {"ff_context", "norm2_context"} & set(last) and "to_add_out" not in last["attn"]
    assert last["norm1_context"]["linear"]["kernel"].shape == (32, 64)
    assert ("attn2" in params["transformer_blocks_0"]) == bool(cfg["dual_attention_layers"])
    for shape in [(16, 16), (12, 20)]:  # square and non-square latent (token grids 8x8, 6x10 of 16x16)
        out, ref = _run_transformer(tm, module, params, shape)
        assert out.shape == ref.shape
        assert record(f"transformer {label}", rel(out, ref)) <= TOL, (label, shape)


def test_transformer_float64_exact(tmp_path):
    """Implementation check: float64 end to end, torch fed our (float32) timestep sinusoid."""
    tm = torch_transformer(SD35_MEDIUM)
    tm.save_pretrained(tmp_path, safe_serialization=True)
    tm = tm.double()
    with jax.enable_x64(True):
        module, params = sd3_transformer.load_transformer(str(tmp_path), dtype=jnp.float64, param_dtype=np.float64)
        t = np.array([981.25, 203.5])
        emb = torch.tensor(np.asarray(sd3_transformer.timestep_embedding(jnp.asarray(t))))
        tm.time_text_embed.time_proj.forward = lambda _: emb
        g = torch.Generator().manual_seed(3)
        x, c, pool = torch.randn(2, 16, 12, 20, generator=g), torch.randn(2, 5, 48, generator=g), torch.randn(2, 32, generator=g)
        with torch.no_grad():
            ref = t2n(tm(x.double(), c.double(), pool.double(), torch.tensor(t)).sample)
        out = np.asarray(jax.jit(module.apply)({"params": params}, *(jnp.asarray(t2n(a), jnp.float64) for a in (x, c, pool)),
                                               jnp.asarray(t)))
    # torch's RMSNorm computes the variance in float32: ~1e-8 with qk-norm (1e-13 without)
    assert record("transformer float64", rel(out, ref)) <= 1e-6


def test_transformer_grad_parity(tiny_dir, model):
    """Gradient w.r.t. the latent and the text embeddings (what attacks differentiate)."""
    tm = tiny_dir[1]["transformer"]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 12, 20, generator=g, requires_grad=True)
    c = torch.randn(1, 9, 48, generator=g, requires_grad=True)
    pool, t = torch.randn(1, 32, generator=g), torch.tensor([700.0])
    w = torch.randn(1, 16, 12, 20, generator=g)
    (tm(x, c, pool, t).sample * w).sum().backward()

    def loss(xj, cj):
        return jnp.sum(model.velocity_t(xj, 700.0, cj, jnp.asarray(t2n(pool))) * jnp.asarray(t2n(w)))

    gx, gc = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(t2n(x)), jnp.asarray(t2n(c)))
    assert record("transformer grad", max(rel(gx, t2n(x.grad)), rel(gc, t2n(c.grad)))) <= TOL


def test_pos_embed_table_matches_buffer():
    for m in (24, 96):
        cfg = dict(SD3_MEDIUM, pos_embed_max_size=m, num_layers=1)
        tm = diffusers.SD3Transformer2DModel(**cfg)
        ours = sd3_transformer.pos_embed_rows(sd3_transformer.SD3Config.from_dict(cfg), np.arange(m * m))
        assert record("pos table", rel(ours.astype(np.float32), t2n(tm.pos_embed.pos_embed[0]))) <= 1e-6


def test_sharded_bf16_checkpoint(tmp_path):
    """Sharded (index.json) bf16 checkpoint: read with ml_dtypes, every tensor accounted for."""
    tm = torch_transformer(SD3_MEDIUM).to(torch.bfloat16)
    tm.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.safetensors.index.json")
    _, params = sd3_transformer.load_transformer(str(tmp_path))
    ref = t2n(tm.transformer_blocks[1].attn.to_q.weight.float()).T
    np.testing.assert_array_equal(params["transformer_blocks_1"]["attn"]["to_q"]["kernel"], ref)


def test_loader_errors_name_file_and_tensor(tmp_path):
    from safetensors.numpy import save_file

    tm = torch_transformer(SD3_MEDIUM)
    tm.save_pretrained(tmp_path, safe_serialization=True)
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    sd = {k: np.asarray(v) for k, v in sd3_io.read_safetensors(path).items()}
    bad = dict(sd)
    del bad["transformer_blocks.1.attn.to_k.bias"]
    bad["proj_out.weight"] = np.zeros((3, 3), np.float32)
    bad["transformer_blocks.2.attn.to_add_out.weight"] = np.zeros((32, 32), np.float32)
    save_file(bad, path)
    with pytest.raises(sd3_io.WeightsError) as e:
        sd3_transformer.load_transformer(str(tmp_path))
    msg = str(e.value)
    assert "transformer_blocks_1/attn/to_k/bias" in msg and path in msg
    assert "'proj_out.weight'" in msg and "'transformer_blocks.2.attn.to_add_out.weight'" in msg
    with pytest.raises(sd3_io.WeightsError, match="missing weights file"):
        sd3_io.load_state_dict(str(tmp_path / "nope"), "diffusion_pytorch_model")


# ------------------------------------------------------------------------------------------ VAE
def test_vae_parity(tiny_dir, model):
    tv = tiny_dir[1]["vae"]
    assert "quant_conv" not in model.params["vae"] and "post_quant_conv" not in model.params["vae"]
    g = torch.Generator().manual_seed(7)
    x01 = torch.rand(2, 3, 32, 48, generator=g)  # non-square
    with torch.no_grad():
        dist = tv.encode(x01 * 2 - 1).latent_dist
        z_ref = (dist.mean - 0.0609) * 1.5305
        zin = torch.randn(2, 16, 16, 24, generator=g)
        dec_ref = tv.decode(zin / 1.5305 + 0.0609).sample * 0.5 + 0.5
    x = jnp.asarray(t2n(x01).transpose(0, 2, 3, 1))
    mean, std = jax.jit(lambda m, x: m.moments(x))(model, x)
    assert record("vae posterior std", rel(std, t2n(dist.std))) <= TOL
    assert record("vae encode", rel(jax.jit(lambda m, x: m.encode(x))(model, x), t2n(z_ref))) <= TOL
    dec = jax.jit(lambda m, z: m.decode(z))(model, jnp.asarray(t2n(zin)))
    assert record("vae decode", rel(np.asarray(dec).transpose(0, 3, 1, 2), t2n(dec_ref))) <= TOL
    # a posterior sample is mean + std * noise
    zs = model.encode(x, key=jax.random.key(0))
    assert zs.shape == (2, 16, 16, 24) and not np.allclose(zs, z_ref.numpy())


# ------------------------------------------------------------------------------------------ scheduler
@pytest.mark.parametrize("n", [28, 50])
def test_scheduler_parity(tiny_dir, n):
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(tiny_dir[1]["scheduler"].config)
    sched.set_timesteps(n)
    cfg = flow_match.FlowMatchConfig.from_dict(dict(sched.config))
    ts, sig = flow_match.set_timesteps(cfg, n)
    np.testing.assert_array_equal(ts, t2n(sched.timesteps))
    np.testing.assert_array_equal(sig, t2n(sched.sigmas))
    record("scheduler sigmas", rel(sig, t2n(sched.sigmas)))
    np.testing.assert_array_equal(flow_match.train_sigmas(cfg), t2n(diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0).sigmas))
    g = torch.Generator().manual_seed(n)
    z0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    for strength in (0.3, 0.6, 0.8):  # img2img start, as the pipeline does it
        ref_sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(sched.config)
        ref_sched.set_timesteps(n)
        t_start = int(max(n - min(n * strength, n), 0))
        assert flow_match.img2img_start(n, strength) == t_start
        ref_sched.set_begin_index(t_start)
        ref = ref_sched.scale_noise(z0, ref_sched.timesteps[t_start:t_start + 1].repeat(2), noise)
        out = flow_match.scale_noise(jnp.asarray(t2n(z0)), jnp.asarray(t2n(noise)), sig[t_start])
        assert record("scheduler scale_noise", rel(out, t2n(ref))) <= 1e-6
    # a few Euler steps from the start
    sched.set_begin_index(0)
    z, zj = noise.clone(), jnp.asarray(t2n(noise))
    for i in range(3):
        v = torch.randn(2, 16, 8, 8, generator=g)
        z = sched.step(v, sched.timesteps[i], z).prev_sample
        zj = flow_match.euler_step(jnp.asarray(t2n(v)), sig[i], sig[i + 1], zj)
    assert record("scheduler euler step", rel(zj, t2n(z))) <= 1e-6


def test_flow_matching_eps_adapter(model):
    """eps = z_t + (1-σ) v, x0 = z_t - σ v; eps - ε = (1-σ)(v - (ε - z0))."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    z0, noise, v = (jax.random.normal(k, (2, 16, 4, 4)) for k in (k1, k2, k3))
    t = jnp.array([250.0, 900.0])
    z_t = model.add_noise(z0, noise, t)
    s = (t / 1000.0)[:, None, None, None]
    np.testing.assert_allclose(z_t, (1 - s) * z0 + s * noise, rtol=1e-6, atol=1e-6)
    eps = flow_match.eps_from_velocity(v, z_t, t / 1000.0)
    np.testing.assert_allclose(eps - noise, (1 - s) * (v - flow_match.velocity_target(z0, noise)), atol=1e-5)
    v_true = flow_match.velocity_target(z0, noise)
    np.testing.assert_allclose(model.to_x0(v_true, z_t, t), z0, atol=1e-5)
    np.testing.assert_allclose(flow_match.eps_from_velocity(v_true, z_t, t / 1000.0), noise, atol=1e-5)


# ------------------------------------------------------------------------------------------ text
def test_text_embeddings_parity(tiny_dir, model):
    m = tiny_dir[1]
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=m["transformer"], scheduler=m["scheduler"], vae=m["vae"], text_encoder=m["text_encoder"],
        tokenizer=m["tokenizer"], text_encoder_2=m["text_encoder_2"], tokenizer_2=m["tokenizer_2"],
        text_encoder_3=m["text_encoder_3"], tokenizer_3=m["tokenizer_3"])
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True,
                                                      max_sequence_length=MAX_SEQ)
    ours_pe, ours_pooled = model.embed_text(PROMPTS)
    neg_pe, neg_pooled = model.embed_text([""] * len(PROMPTS))
    assert ours_pe.shape == (2, 77 + MAX_SEQ, 48) and ours_pooled.shape == (2, 32)
    assert float(jnp.abs(ours_pe[:, :77, 40:]).max()) == 0.0  # CLIP rows zero-padded from 16+24 to 48
    err = max(rel(ours_pe[:, :77], t2n(pe[:, :77])), rel(ours_pe[:, 77:], t2n(pe[:, 77:])))
    assert record("text prompt_embeds", err) <= TOL
    assert record("text pooled", rel(ours_pooled, t2n(pooled))) <= TOL
    assert record("text negative", max(rel(neg_pe, t2n(npe)), rel(neg_pooled, t2n(npooled)))) <= TOL


def test_report_errors():
    """Prints the measured max relative errors (run with -s)."""
    for k, v in sorted(ERRORS.items()):
        print(f"  {k:28s} {v:.2e}")
