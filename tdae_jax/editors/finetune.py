"""Fine-tuning threats: DreamBooth and LoRA on a Surrogate, and DDIM sampling from the result.

- DreamBooth (Ruiz et al. 2023, Eq. 1; DLADiff §3.1, Eq. 4): ``E||target - UNet(z_t, t, c)||^2 +
  lambda E||target' - UNet(z'_t, t', c')||^2`` with the prior term optional (``prior_weight``) and the text
  encoder optionally trained. ``target`` is the scheduler's prediction type (eps / v / x0).
- LoRA (Hu et al. 2022, Eq. 3): for each selected attention projection kernel ``W [in, out]`` (``to_q``,
  ``to_k``, ``to_v``, ``to_out_0`` of every Flax ``FlaxAttention``), ``W + (alpha / r) A @ B`` with ``A [in, r]``
  (normal, std 1/r) and ``B [r, out]`` (zeros) trainable. The delta is applied functionally before
  ``unet.apply``; the base params are never written.

Optimizer: ``optax.chain(clip_by_global_norm, adamw)`` (diffusers' train_dreambooth*.py: AdamW, eps 1e-8,
weight decay 1e-2, max_grad_norm 1.0); ``weight_decay=0`` is plain Adam (DLADiff Alg. 1). The train step is
one pure function compiled once per (config, shapes) (``train_step_jit``, module level, so every caller
shares the compilation); the batch is sharded over the ``data`` mesh axis, the state replicated. Keys are
derived per draw: ``fold_in(fold_in(base, uid), draw)`` with ``draw = step * batch + slot``, so results do
not depend on device count. Batches are drawn host-side from per-epoch seeded permutations (resumable).

``sample(surrogate, prompt, n, key, steps)`` is the attacker's text-to-image generation (DDIM, eta 0, CFG).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tdae_jax import checkpoint, prng
from tdae_jax.editors import schedulers
from tdae_jax.parallel import mesh as meshlib

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Attacker / surrogate fine-tuning. Defaults: DLADiff's victim (DLADiff §5.1: batch 4, 400 steps, lr 5e-6)."""

    method: str = "dreambooth"  # dreambooth | lora
    steps: int = 400
    batch_size: int = 4
    lr: float = 5e-6
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # <= 0: no clipping
    train_text_encoder: bool = False
    prior_weight: float = 0.0  # lambda of Eq. 4; 0 = no prior preservation
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: tuple = LORA_TARGETS
    latent_sample: bool = True  # z0 = latent_dist.sample() (diffusers) or the posterior mean

    def __post_init__(self):
        if self.method not in ("dreambooth", "lora"):
            raise ValueError(f"method must be 'dreambooth' or 'lora', got {self.method!r}")
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"need steps >= 0, batch_size >= 1, lr > 0 (got {self.steps}, {self.batch_size}, {self.lr})")
        if self.method == "lora" and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    def trace_key(self) -> "FinetuneConfig":
        """The fields a compiled train step depends on (steps, batch size, lr and weight decay are not: the
        learning rate and decay live in the optimizer state), so runs that differ only there share one
        compilation."""
        return dataclasses.replace(self, steps=0, batch_size=1, lr=1.0, weight_decay=0.0)


class TrainState(NamedTuple):
    """``trainable``: ``{"unet": ..., ["text_encoder": ...]}`` (DreamBooth) or ``{"lora": {path: {"a", "b"}}}``."""

    trainable: Any
    opt_state: Any
    step: jax.Array


def optimizer(cfg: FinetuneConfig) -> optax.GradientTransformation:
    """clip + AdamW with lr and weight decay as injected hyper-parameters (read from the state in update)."""
    adam = optax.inject_hyperparams(optax.adamw)(learning_rate=cfg.lr, b1=0.9, b2=0.999, eps=1e-8,
                                                 weight_decay=cfg.weight_decay)
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adam) if cfg.max_grad_norm > 0 else adam


# ------------------------------------------------------------------------------------------------ LoRA
def lora_paths(unet_params, targets: Sequence[str] = LORA_TARGETS) -> list[tuple]:
    """Paths (tuples of keys) of the 2-D ``kernel`` leaves of the selected attention projections."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(unet_params))
    return sorted(p[:-1] for p, v in flat.items()
                  if p[-1] == "kernel" and len(p) >= 2 and p[-2] in targets and np.ndim(v) == 2)


def init_lora(unet_params, cfg: FinetuneConfig, key: jax.Array) -> dict:
    """``{"a/b/c": {"a": [in, r] N(0, 1/r^2), "b": [r, out] zeros}}`` for every selected kernel."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(unet_params))
    out = {}
    for p in lora_paths(unet_params, cfg.lora_targets):
        w = flat[p + ("kernel",)]
        name = "/".join(p)
        k = jax.random.fold_in(key, prng.image_uid(name))
        out[name] = {"a": jax.random.normal(k, (w.shape[0], cfg.lora_rank), jnp.float32) / cfg.lora_rank,
                     "b": jnp.zeros((cfg.lora_rank, w.shape[1]), jnp.float32)}
    if not out:
        raise ValueError(f"no attention kernels named {cfg.lora_targets} in the UNet params")
    return out


def apply_lora(unet_params, lora: dict, scale: float):
    """A new UNet param tree with ``W + scale * A @ B`` on the LoRA'd kernels (inputs untouched)."""
    flat = dict(flax.traverse_util.flatten_dict(flax.core.unfreeze(unet_params)))
    for name, ab in lora.items():
        p = tuple(name.split("/")) + ("kernel",)
        w = flat[p]
        flat[p] = w + (scale * (ab["a"] @ ab["b"])).astype(w.dtype)
    return flax.traverse_util.unflatten_dict(flat)


def full_params(frozen_params: dict, trainable: dict, cfg: FinetuneConfig) -> dict:
    """Surrogate params with the trainable part substituted (DreamBooth) or the LoRA delta applied."""
    if cfg.method == "lora":
        return {**frozen_params, "unet": apply_lora(frozen_params["unet"], trainable["lora"],
                                                    cfg.lora_alpha / cfg.lora_rank)}
    return {**frozen_params, **trainable}


def init_state(surrogate, cfg: FinetuneConfig, key: jax.Array | None = None) -> TrainState:
    """Fresh :class:`TrainState`; ``key`` seeds the LoRA ``A`` matrices (required for LoRA)."""
    if cfg.method == "lora":
        if key is None:
            raise ValueError("LoRA init needs a key")
        trainable = {"lora": init_lora(surrogate.params["unet"], cfg, key)}
    else:
        trainable = {"unet": surrogate.params["unet"]}
        if cfg.train_text_encoder:
            trainable["text_encoder"] = surrogate.params["text_encoder"]
    trainable = jax.tree.map(lambda a: jnp.array(a, copy=True), trainable)
    return TrainState(trainable, optimizer(cfg).init(trainable), jnp.zeros((), jnp.int32))


def frozen_part(surrogate, cfg: FinetuneConfig):
    """The surrogate without the params the state carries (DreamBooth: no second UNet copy on device)."""
    if cfg.method == "lora":
        return surrogate
    drop = {"unet"} | ({"text_encoder"} if cfg.train_text_encoder else set())
    return surrogate.replace(params={k: v for k, v in surrogate.params.items() if k not in drop})


def with_params(surrogate, state_or_trainable, cfg: FinetuneConfig):
    """The fine-tuned surrogate (LoRA merged into the kernels)."""
    tr = state_or_trainable.trainable if isinstance(state_or_trainable, TrainState) else state_or_trainable
    return surrogate.replace(params=full_params(surrogate.params, tr, cfg))


# ------------------------------------------------------------------------------------------------ loss + step
def draw_keys(base_key: jax.Array, uid: jax.Array, draw: jax.Array) -> jax.Array:
    """``[B]`` keys ``fold_in(fold_in(base, uid_i), draw_i)``."""
    return jax.vmap(lambda u, d: jax.random.fold_in(jax.random.fold_in(base_key, u), d))(
        jnp.asarray(uid).astype(jnp.uint32), jnp.asarray(draw).astype(jnp.uint32))


def regression_target(surrogate, z0, noise, t):
    """What the UNet regresses to under the scheduler's prediction type."""
    pt = surrogate.static.prediction_type
    if pt == "epsilon":
        return noise
    if pt == "sample":
        return z0
    a = surrogate.alphas_cumprod[t].reshape((-1,) + (1,) * (z0.ndim - 1))
    return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * z0  # v_prediction


def diffusion_draw(surrogate, x, keys, latent_sample: bool = True, z0=None, t=None):
    """``(z0, noise, t)``: the draw of :func:`diffusion_loss` from ``keys`` (streams 1 = t, 2 = noise, 3 = VAE
    posterior sample). ``t [B]``: given timesteps instead of the uniform draw of stream 1."""
    if z0 is None:
        if latent_sample:
            mean, std = surrogate.moments(x)
            e = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 3), mean.shape[1:], mean.dtype))(keys)
            z0 = (mean + std * e) * surrogate.static.scaling_factor
        else:
            z0 = surrogate.encode(x)
    if t is None:
        t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (), 0, surrogate.num_train_timesteps))(
            keys)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 2), z0.shape[1:], z0.dtype))(keys)
    return z0, noise, t


def diffusion_error(surrogate, out, z0, noise, t):
    """Per-image ``mean ||target - out||^2`` ``[B]`` of a UNet output ``out`` on the draw ``(z0, noise, t)``."""
    err = jnp.square(out.astype(jnp.float32) - regression_target(surrogate, z0, noise, t).astype(jnp.float32))
    return jnp.mean(err, axis=tuple(range(1, err.ndim)))


def diffusion_loss(surrogate, x, emb, keys, latent_sample: bool = True, z0=None, t=None):
    """Per-image ``mean ||target - UNet(z_t, t, c)||^2`` ``[B]`` at a random ``t`` and noise from ``keys``.

    Args:
      surrogate: ``sd`` family (its params are what is differentiated).
      x: ``[B,H,W,3]`` in [0,1] (ignored when ``z0`` is given).
      emb: ``[B,T,D]`` text embeddings.
      keys: ``[B]`` typed keys; streams 1 = t, 2 = noise, 3 = VAE posterior sample (:func:`diffusion_draw`).
      t: ``[B]`` timesteps to use instead of stream 1's uniform draw.
    """
    z0, noise, t = diffusion_draw(surrogate, x, keys, latent_sample, z0, t)
    out = surrogate.unet_out(surrogate.add_noise(z0, noise, t), t, emb)
    return diffusion_error(surrogate, out, z0, noise, t)


def _embed(sur, batch, prefix=""):
    if prefix + "emb" in batch:
        return batch[prefix + "emb"]
    return sur.embed_ids(batch[prefix + "ids"])


def train_step(state: TrainState, frozen, batch: dict, base_key: jax.Array, cfg: FinetuneConfig):
    """One optimizer step. ``batch``: ``x0 [B,H,W,3]``, ``uid [B]``, ``draw [B]``, and ``ids [B,T]`` (token
    ids; needed when the text encoder trains) or ``emb [B,T,D]``; with a prior: ``prior_x0``, ``prior_uid``,
    ``prior_ids``/``prior_emb``. Returns ``(state, {"loss", "loss/instance", "loss/prior", "grad_norm"})``."""

    def loss_fn(trainable):
        sur = frozen.replace(params=full_params(frozen.params, trainable, cfg))
        keys = draw_keys(base_key, batch["uid"], batch["draw"])
        inst = jnp.mean(diffusion_loss(sur, batch["x0"], _embed(sur, batch), keys, cfg.latent_sample))
        prior = jnp.zeros((), jnp.float32)
        if cfg.prior_weight > 0:
            pk = draw_keys(jax.random.fold_in(base_key, 7), batch["prior_uid"], batch["draw"])
            prior = jnp.mean(diffusion_loss(sur, batch["prior_x0"], _embed(sur, batch, "prior_"), pk,
                                            cfg.latent_sample))
        return inst + cfg.prior_weight * prior, (inst, prior)

    (loss, (inst, prior)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    updates, opt_state = optimizer(cfg).update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": loss, "loss/instance": inst, "loss/prior": prior, "grad_norm": optax.tree.norm(grads)}
    return TrainState(trainable, opt_state, state.step + 1), metrics


train_step_jit = jax.jit(train_step, static_argnames=("cfg",), donate_argnums=(0,))
embed_ids = jax.jit(lambda sur, ids: sur.embed_ids(ids))


# ------------------------------------------------------------------------------------------------ host loop
def draw_indices(n: int, batch: int, step: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Which of ``n`` images fill the batch of ``step``: each epoch is a seeded permutation.
    Returns ``(indices [batch], draw [batch])`` with ``draw`` the global draw number."""
    draw = step * batch + np.arange(batch)
    idx = np.empty(batch, np.int64)
    for j, d in enumerate(draw):
        epoch, pos = divmod(int(d), n)
        idx[j] = np.random.default_rng([seed, epoch]).permutation(n)[pos]
    return idx, draw.astype(np.int32)


def data_mesh(batch_size: int, mesh=None):
    """``mesh`` if its size divides the batch, else a mesh over its first ``gcd(batch, size)`` devices
    (``mesh=None``: all devices). Training batches are never padded (padding rows would change the loss)."""
    n = len(jax.devices()) if mesh is None else mesh.devices.size
    if mesh is not None and batch_size % n == 0:
        return mesh
    return meshlib.make_mesh(math.gcd(batch_size, n))


@dataclasses.dataclass
class FinetuneResult:
    surrogate: Any  # the fine-tuned surrogate (LoRA merged)
    state: TrainState
    history: dict  # name -> [steps] floats
    resumed_from: int | None = None


def finetune(surrogate, images, prompt: str | Sequence[str], cfg: FinetuneConfig, key: jax.Array, *,
             uids=None, prior_images=None, prior_prompt: str = "", mesh=None, state: TrainState | None = None,
             ckpt_dir: str | Path | None = None, ckpt_every: int = 0, log=None) -> FinetuneResult:
    """Fine-tune ``surrogate`` on ``images`` ``[N,H,W,3]`` in [0,1] with ``prompt`` for ``cfg.steps`` steps.

    ``state``: continue from it (ADFT's stage 3 keeps its dynamic state across epochs); ``ckpt_dir`` +
    ``ckpt_every``: orbax checkpoints, resumed when present. ``prior_images`` (class images) are used when
    ``cfg.prior_weight > 0``. ``key``: typed base key (every draw derives from it, ``uids`` and the step).
    """
    images = np.asarray(images, np.float32)
    n = images.shape[0]
    uids = np.arange(n, dtype=np.int32) if uids is None else np.asarray(uids, np.int32)
    prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
    mesh = data_mesh(cfg.batch_size, mesh)
    ids = surrogate.tokenize(prompts)
    text_frozen = not cfg.train_text_encoder
    emb_all = np.asarray(embed_ids(surrogate, ids)) if text_frozen else None
    prior = None
    if cfg.prior_weight > 0:
        if prior_images is None or len(prior_images) == 0:
            raise ValueError("prior_weight > 0 needs prior_images (class images, e.g. from sample())")
        prior = np.asarray(prior_images, np.float32)
        pids = surrogate.tokenize([prior_prompt] * 1)
        pemb = np.asarray(embed_ids(surrogate, pids)) if text_frozen else None
    frozen = meshlib.replicate(frozen_part(surrogate, cfg), mesh)
    base = key
    if state is None:
        state = init_state(surrogate, cfg, jax.random.fold_in(key, 11))
    state = meshlib.replicate(state, mesh)
    ckpt = checkpoint.UnitCheckpointer(ckpt_dir, ckpt_every) if ckpt_dir and ckpt_every > 0 else None
    history: dict[str, list] = {}
    start = int(state.step)
    end = start + cfg.steps
    resumed = None
    if ckpt is not None:
        sh = jax.tree.map(lambda a: a.sharding, state)
        restored = ckpt.restore(checkpoint.abstract_like(state, sh))
        if restored is not None and restored[0] > start:
            step0, state, meta = restored
            history = {k: list(v) for k, v in meta.get("history", {}).items()}
            resumed = start = int(step0)
    for s in range(start, end):
        idx, draw = draw_indices(n, cfg.batch_size, s, 0)
        batch = {"x0": images[idx], "uid": uids[idx], "draw": draw}
        if text_frozen:
            batch["emb"] = emb_all[idx]
        else:
            batch["ids"] = ids[idx]
        if prior is not None:
            pidx, _ = draw_indices(len(prior), cfg.batch_size, s, 1)
            batch.update(prior_x0=prior[pidx], prior_uid=(pidx + 1_000_003).astype(np.int32))
            if text_frozen:
                batch["prior_emb"] = np.repeat(pemb, cfg.batch_size, 0)
            else:
                batch["prior_ids"] = np.repeat(pids, cfg.batch_size, 0)
        batch = meshlib.shard_batch(batch, mesh)
        state, m = train_step_jit(state, frozen, batch, base, cfg.trace_key())
        for k, v in jax.device_get(m).items():
            history.setdefault(k, []).append(float(v))
        if log is not None:
            log(s + 1, {k: v[-1] for k, v in history.items()})
        if ckpt is not None and s + 1 < end:
            ckpt.maybe_save(s + 1, state, {"history": history})
    if ckpt is not None:
        ckpt.close(remove=True)
    return FinetuneResult(with_params(surrogate, state, cfg), state, history, resumed)


# ------------------------------------------------------------------------------------------------ sampling
def _sample(surrogate, emb, uncond, noise, steps: int, guidance_scale: float):
    cfg = schedulers.resolve_config("ddim", surrogate.static.scheduler_config, surrogate.static.prediction_type)
    plan = schedulers.make_plan("ddim", cfg, surrogate.static.alphas_cumprod, steps, None, 0.0)

    def model_fn(z, t):
        if guidance_scale <= 1.0:
            return surrogate.unet_out(z, t, emb)
        out = surrogate.unet_out(jnp.concatenate([z, z]), t, jnp.concatenate([uncond, emb]))
        u, c = jnp.split(out, 2)
        return u + guidance_scale * (c - u)

    z = schedulers.denoise(plan, model_fn, schedulers.start_from_noise(plan, noise))
    return jnp.clip(surrogate.decode(z), 0.0, 1.0)


_sample_jit = jax.jit(_sample, static_argnames=("steps", "guidance_scale"))


def sample(surrogate, prompt: str, n: int, key: jax.Array, steps: int = 50, *, guidance_scale: float = 7.5,
           negative_prompt: str = "", size: int | None = None, batch_size: int = 4) -> np.ndarray:
    """``n`` images ``[n,H,W,3]`` in [0,1] for ``prompt`` (DDIM, eta 0, CFG); image ``i`` uses ``fold_in(key, i)``.

    ``size``: image side (default: the UNet's ``sample_size`` times the VAE factor)."""
    size = size or int(surrogate.static.unet.sample_size) * surrogate.downsample
    h = size // surrogate.downsample
    emb1 = embed_ids(surrogate, surrogate.tokenize([prompt, negative_prompt]))
    out = []
    for s in range(0, n, batch_size):
        m = min(batch_size, n - s)
        noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, s + i), (surrogate.latent_channels, h, h))
                           for i in range(m)])
        emb = jnp.repeat(emb1[:1], m, 0)
        unc = jnp.repeat(emb1[1:], m, 0)
        out.append(np.asarray(_sample_jit(surrogate, emb, unc, noise, steps, float(guidance_scale))))
    return np.concatenate(out, 0)
