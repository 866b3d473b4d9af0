"""DLADiff layer 2: the anti-zero-shot identity perturbation (DLADiff §4.2, Eq. 10-11, Algorithm 2).

    L_id = 1 - sum_i w_i cos(IE_i(align(x' + delta_img, M_i')), IE_i(align(x, M_i)))     (Eq. 10, w_i = 1/N)
    delta <- clip(delta + s * sign grad L_id, -eta_zs, eta_zs)                           (Eq. 11)

- Alignment: ``M_i [2,3]`` maps image pixels to the encoder's crop (``IdentityEncoder.align``: a similarity
  transform of 5 landmarks to the ArcFace 112x112 template, Umeyama; or dlib's 150x150 chip). Landmarks come
  from the **clean** image (Alg. 2). :func:`warp` is a differentiable bilinear warp
  (``jax.scipy.ndimage.map_coordinates``, order 1, zeros outside).
- EOT against re-detection: each step uses ``M' = M + N(0, diag)`` with std ``jitter_linear`` on the 2x2 part
  and ``jitter_translation`` px on the translation (project default 0.01 / 1.0; the paper: "slight random noise").
- ``space="aligned"`` (default, Alg. 2): ``delta [S,S,3]`` lives in the first encoder's crop and reaches the
  image as ``delta_img = warp_back(delta, M_0)`` (bilinear, a convex combination with zeros, so
  ``|delta_img| <= eta_zs`` and ``delta_img = 0`` outside the face crop). Every encoder sees the round trip
  ``align(x' + delta_img, M_i')``, i.e. what is written to disk, not ``x'_f + delta`` (identical up to
  resampling for one encoder; well defined for an ensemble with different crops). ``space="image"``:
  ``delta`` at full resolution, restricted to the crop's footprint (a project option).
- Stop rule (project default): an image stops once ``max_i cos_i < threshold`` on the **un-jittered** crop,
  checked every ``check_every`` steps, or after ``max_steps``; finished images are frozen (per-image mask).
- Composition (project default): ``x_out = clip(x + delta_ft + delta_img, 0, 1)``; the face region's total is
  ``<= eta_ft + eta_zs``. Units: [0,1] pixels; eta_zs = 11/255, step 8e-4 (DLADiff §5.1).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy import ndimage

from tdae_jax import prng
from tdae_jax.defenses import pgd as pgd_lib
from tdae_jax.metrics import identity as idm


@dataclasses.dataclass(frozen=True)
class ZSConfig:
    eps: float = 11.0 / 255.0
    step_size: float = 8e-4
    max_steps: int = 1000
    threshold: float = 0.1
    check_every: int = 10
    jitter_linear: float = 0.01
    jitter_translation: float = 1.0
    space: str = "aligned"  # aligned | image
    weights: tuple = ()  # per encoder; () = 1/N each

    def __post_init__(self):
        if self.space not in ("aligned", "image"):
            raise ValueError(f"space must be 'aligned' or 'image', got {self.space!r}")
        if not 0 < self.eps < 1 or self.step_size <= 0 or self.max_steps < 0 or self.check_every < 1:
            raise ValueError("need 0 < eps < 1, step_size > 0, max_steps >= 0, check_every >= 1")


    def trace_key(self) -> "ZSConfig":
        """What the compiled step depends on (not the stop rule)."""
        return dataclasses.replace(self, max_steps=0, threshold=0.0, check_every=1)


class ZSState(NamedTuple):
    delta: jax.Array  # [B,S,S,3] (aligned) or [B,H,W,3] (image)
    opt_state: optax.OptState
    step: jax.Array
    active: jax.Array  # [B] bool: still optimizing


# ------------------------------------------------------------------------------------------------ warps
def _sample(img, ys, xs):
    """Bilinear samples of ``img [H,W,C]`` at float pixel coordinates (zeros outside)."""
    return jnp.stack([ndimage.map_coordinates(img[..., c], [ys, xs], order=1, mode="constant", cval=0.0)
                      for c in range(img.shape[-1])], axis=-1)


def _apply_affine(m, xs, ys):
    return m[0, 0] * xs + m[0, 1] * ys + m[0, 2], m[1, 0] * xs + m[1, 1] * ys + m[1, 2]


def invert(m: jax.Array) -> jax.Array:
    """Inverse of a ``[2,3]`` affine."""
    a = m[:, :2]
    ai = jnp.linalg.inv(a)
    return jnp.concatenate([ai, -(ai @ m[:, 2:])], axis=1)


def warp(image: jax.Array, m: jax.Array, size: int | tuple) -> jax.Array:
    """Crop ``[s,s,C]`` of ``image [H,W,C]``: out pixel ``(u,v) = image at M^-1 (u,v)`` (``m``: image -> crop)."""
    oh, ow = (size, size) if isinstance(size, int) else size
    v, u = jnp.meshgrid(jnp.arange(oh, dtype=jnp.float32), jnp.arange(ow, dtype=jnp.float32), indexing="ij")
    xs, ys = _apply_affine(invert(m), u, v)
    return _sample(image, ys, xs)


def warp_back(crop: jax.Array, m: jax.Array, image_hw: tuple) -> jax.Array:
    """Image-sized ``[H,W,C]``: pixel ``(x,y)`` = ``crop`` at ``M (x,y)``; zero outside the crop."""
    h, w = image_hw
    y, x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    u, v = _apply_affine(m, x, y)
    return _sample(crop, v, u)


def face_mask(m: jax.Array, size: int, image_hw: tuple) -> jax.Array:
    """``[H,W,1]`` soft footprint of the crop in the image (warp-back of a ones map)."""
    return warp_back(jnp.ones((size, size, 1), jnp.float32), m, image_hw)


def jitter(key, m: jax.Array, cfg: ZSConfig) -> jax.Array:
    k1, k2 = jax.random.split(key)
    lin = cfg.jitter_linear * jax.random.normal(k1, (2, 2))
    tr = cfg.jitter_translation * jax.random.normal(k2, (2, 1))
    return m + jnp.concatenate([lin, tr], axis=1)


# ------------------------------------------------------------------------------------------------ loss
def _weights(cfg: ZSConfig, n: int):
    w = cfg.weights or (1.0 / n,) * n
    if len(w) != n:
        raise ValueError(f"{len(w)} encoder weights for {n} encoders")
    return w


def delta_image(delta, m0, size0: int, image_hw, cfg: ZSConfig):
    """Per image: the image-space perturbation ``[H,W,3]`` of the parameter ``delta``."""
    if cfg.space == "aligned":
        return warp_back(delta, m0, image_hw)
    return delta * (face_mask(m0, size0, image_hw) > 0)


def cosines(encoders: Sequence[idm.IdentityEncoder], enc_params, x_img, ms, targets, key=None, cfg=None):
    """``[B,N]`` cos of each encoder's embedding of ``x_img [B,H,W,3]`` (aligned by ``ms [B,N,2,3]``, jittered
    when ``key`` is given) to ``targets`` (tuple of ``[B,D_i]`` normalized)."""
    out = []
    for i, (enc, p) in enumerate(zip(encoders, enc_params)):
        m = ms[:, i]
        if key is not None:
            ks = jax.vmap(lambda k: jax.random.fold_in(k, i))(key)
            m = jax.vmap(lambda k, mm: jitter(k, mm, cfg))(ks, m)
        faces = jax.vmap(lambda im, mm: warp(im, mm, enc.size))(x_img, m)
        out.append(idm.cosine(enc.apply(p, faces), targets[i]))
    return jnp.stack(out, axis=1)


def zs_step(state: ZSState, batch: dict, enc_params, base_key, encoders: tuple, cfg: ZSConfig):
    """One sign-PGD step on sum_i w_i cos_i (= descent on -L_id). ``batch``: ``x_adv [B,H,W,3]`` (layer-1
    output), ``M [B,N,2,3]``, ``targets`` tuple of ``[B,D_i]`` (normalized clean embeddings), ``uid [B]``.
    Returns ``(state, {"zs/cos": [B] weighted cos before the step, "budget/linf": [B]})``."""
    keys = prng.image_keys(prng.split_named(base_key, "zs/jitter")["zs/jitter"], batch["uid"], state.step)
    x_adv, ms = batch["x_adv"], batch["M"]
    hw = x_adv.shape[1:3]
    w = jnp.asarray(_weights(cfg, len(encoders)), jnp.float32)

    def obj(delta):
        d_img = jax.vmap(lambda d, m: delta_image(d, m, encoders[0].size, hw, cfg))(delta, ms[:, 0])
        cos = cosines(encoders, enc_params, jnp.clip(x_adv + d_img, 0.0, 1.0), ms, batch["targets"], keys, cfg)
        per = cos @ w
        return jnp.sum(per), per

    (_, per), g = jax.value_and_grad(obj, has_aux=True)(state.delta)
    updates, opt_state = pgd_lib.sign_pgd(cfg.step_size).update(g, state.opt_state, state.delta)
    act = state.active.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)
    delta = optax.projections.projection_linf_ball(state.delta + act * updates, cfg.eps)
    return (ZSState(delta, opt_state, state.step + 1, state.active),
            {"zs/cos": per, "budget/linf": pgd_lib.per_image_linf(delta)})


def zs_eval(delta, batch: dict, enc_params, encoders: tuple, cfg: ZSConfig):
    """``(cos [B,N] on the un-jittered crops, delta_img [B,H,W,3])``."""
    hw = batch["x_adv"].shape[1:3]
    d_img = jax.vmap(lambda d, m: delta_image(d, m, encoders[0].size, hw, cfg))(delta, batch["M"][:, 0])
    x = jnp.clip(batch["x_adv"] + d_img, 0.0, 1.0)
    return cosines(encoders, enc_params, x, batch["M"], batch["targets"]), d_img


def embed_targets(x_clean, ms, encoders: tuple, enc_params):
    """Normalized clean embeddings, one ``[B,D_i]`` per encoder (E_tar of Alg. 2)."""
    out = []
    for i, (enc, p) in enumerate(zip(encoders, enc_params)):
        faces = jax.vmap(lambda im, mm: warp(im, mm, enc.size))(x_clean, ms[:, i])
        out.append(idm.normalize(enc.apply(p, faces)))
    return tuple(out)


zs_step_jit = jax.jit(zs_step, static_argnames=("encoders", "cfg"), donate_argnums=(0,))
zs_eval_jit = jax.jit(zs_eval, static_argnames=("encoders", "cfg"))
embed_targets_jit = jax.jit(embed_targets, static_argnames=("encoders",))


# ------------------------------------------------------------------------------------------------ driver
def alignments(landmarks: Sequence[dict], encoders: Sequence[idm.IdentityEncoder]) -> np.ndarray:
    """``M [B,N,2,3]`` from per-image landmark dicts ``{"arcface": [5,2]} | {"dlib": [5,2]}`` (either is
    converted to the other when an encoder needs it; see ``dlib_face.to_arcface_order``)."""
    out = []
    for lm in landmarks:
        row = []
        for enc in encoders:
            pts = lm.get(enc.landmark_format)
            if pts is None:
                from tdae_jax.metrics import dlib_face as df

                conv = df.to_arcface_order if enc.landmark_format == "arcface" else df.from_arcface_order
                other = "dlib" if enc.landmark_format == "arcface" else "arcface"
                if lm.get(other) is None:
                    raise ValueError(f"no landmarks for encoder {enc.name} (need {enc.landmark_format} or {other})")
                pts = conv(np.asarray(lm[other]))
            row.append(enc.align(pts))
        out.append(np.stack(row))
    return np.asarray(out, np.float32)


def face_box(ms: np.ndarray, sizes: Sequence[int], image_hw: tuple, margin: int = 2) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)``: the image region covering every encoder's crop footprint (plus ``margin``)."""
    pts = []
    for m, s in zip(np.asarray(ms, np.float64), sizes):
        inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
        corners = np.array([[0, 0, 1], [s - 1, 0, 1], [0, s - 1, 1], [s - 1, s - 1, 1]], np.float64).T
        pts.append((inv @ corners)[:2].T)
    p = np.concatenate(pts)
    h, w = image_hw
    x0, y0 = np.floor(p.min(0)).astype(int) - margin
    x1, y1 = np.ceil(p.max(0)).astype(int) + margin + 1
    return max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)


def shift(ms: np.ndarray, y0: int, x0: int) -> np.ndarray:
    """Alignments of a sub-image starting at ``(y0, x0)``: ``M (p + (x0, y0))``."""
    ms = np.array(ms, np.float64)
    ms[..., 2] += ms[..., :2] @ np.array([x0, y0], np.float64)
    return ms.astype(np.float32)


def protect_image(x_clean, x_adv, landmarks: dict, encoders, enc_params, cfg: ZSConfig, base_key, uid: int,
                  bucket: int = 64, on_check=None) -> tuple[np.ndarray, dict]:
    """Algorithm 2 on one full-resolution image ``[H,W,3]`` in [0,1], computed on a window around the face
    only (the cost does not grow with the photo). The window side is rounded up to a multiple of ``bucket``
    (zero padding beyond the image), so faces of similar size share one compilation.
    Returns ``(delta_img [H,W,3], info)`` (``info`` as :func:`protect` for one image, ``zs/mask`` at full
    size, ``zs/box = (y0, y1, x0, x1)`` the face region in image pixels)."""
    encoders = tuple(encoders)
    x_clean, x_adv = np.asarray(x_clean, np.float32), np.asarray(x_adv, np.float32)
    h, w = x_clean.shape[:2]
    ms = alignments([landmarks], encoders)[0]
    y0, y1, x0, x1 = face_box(ms, [e.size for e in encoders], (h, w))
    if y1 - y0 < 2 or x1 - x0 < 2:
        raise ValueError(f"the face crop lies outside the image (box {(y0, y1, x0, x1)})")
    side = bucket * -(-max(y1 - y0, x1 - x0) // bucket)
    pad = ((side, side), (side, side), (0, 0))
    win = lambda a: np.pad(a, pad)[y0 + side:y0 + 2 * side, x0 + side:x0 + 2 * side]  # noqa: E731
    d, info = protect(win(x_clean)[None], win(x_adv)[None], None, encoders, enc_params, cfg, base_key, [uid],
                      ms=shift(ms, y0, x0)[None], on_check=on_check)
    hh, ww = min(side, h - y0), min(side, w - x0)
    full = np.zeros_like(x_clean)
    full[y0:y0 + hh, x0:x0 + ww] = d[0, :hh, :ww]
    mask = np.zeros((h, w, 1), np.float32)
    mask[y0:y0 + hh, x0:x0 + ww] = info["zs/mask"][0, :hh, :ww]
    info = {"zs/steps": info["zs/steps"][0], "zs/cos_before": info["zs/cos_before"][0],
            "zs/cos_after": info["zs/cos_after"][0], "zs/mask": mask, "zs/box": (y0, y1, x0, x1)}
    return full, info


def protect(x_clean, x_adv, landmarks: Sequence[dict], encoders: Sequence[idm.IdentityEncoder], enc_params,
            cfg: ZSConfig, base_key, uid, ms=None, on_check=None) -> tuple[np.ndarray, dict]:
    """Algorithm 2 for a batch of same-size images.

    Args:
      x_clean: ``[B,H,W,3]`` in [0,1], the clean images (alignment targets).
      x_adv: ``[B,H,W,3]``, the layer-1 output ``clip(x + delta_ft)`` (or ``x_clean`` for layer 2 alone).
      landmarks: per image ``{"arcface": [5,2]}`` and/or ``{"dlib": [5,2]}``, in working-image pixels.
      encoders/enc_params: the ensemble (same order).
      uid: ``[B] int32`` image uids (keys).
      ms: optional precomputed alignments ``[B,N,2,3]`` (then ``landmarks`` is unused).
      on_check: optional ``f(step, max_steps, cos [B,N], active [B])``, called at every similarity check (every
        ``cfg.check_every`` steps): the caller's progress line.
    Returns:
      ``(delta_img [B,H,W,3] float32, info)`` with ``info``: ``zs/steps [B]``, ``zs/cos_before [B,N]``,
      ``zs/cos_after [B,N]``, ``zs/mask [B,H,W,1]`` (the first encoder's crop footprint).
    """
    encoders = tuple(encoders)
    enc_params = tuple(enc_params)
    x_clean = jnp.asarray(x_clean, jnp.float32)
    ms = jnp.asarray(alignments(landmarks, encoders) if ms is None else ms)
    targets = embed_targets_jit(x_clean, ms, encoders, enc_params)
    batch = {"x_adv": jnp.asarray(x_adv, jnp.float32), "M": ms, "targets": targets,
             "uid": jnp.asarray(uid, jnp.int32)}
    b, (h, w) = x_clean.shape[0], x_clean.shape[1:3]
    s0 = encoders[0].size
    shape = (b, s0, s0, 3) if cfg.space == "aligned" else (b, h, w, 3)
    delta = jnp.zeros(shape, jnp.float32)
    state = ZSState(delta, pgd_lib.sign_pgd(cfg.step_size).init(delta), jnp.zeros((), jnp.int32),
                    jnp.ones((b,), bool))
    tk = cfg.trace_key()
    cos0, _ = zs_eval_jit(state.delta, batch, enc_params, encoders, tk)
    steps = np.zeros(b, np.int64)
    active = np.asarray(cos0).max(1) >= cfg.threshold
    for s in range(cfg.max_steps):
        if not active.any():
            break
        state = state._replace(active=jnp.asarray(active))
        state, _ = zs_step_jit(state, batch, enc_params, base_key, encoders, tk)
        steps += active
        if (s + 1) % cfg.check_every == 0 or s + 1 == cfg.max_steps:
            cos, _ = zs_eval_jit(state.delta, batch, enc_params, encoders, tk)
            active &= np.asarray(cos).max(1) >= cfg.threshold
            if on_check is not None:
                on_check(s + 1, cfg.max_steps, np.asarray(cos), active.copy())
    cos1, d_img = zs_eval_jit(state.delta, batch, enc_params, encoders, tk)
    mask = jax.vmap(lambda m: face_mask(m, s0, (h, w)))(ms[:, 0])
    info = {"zs/steps": steps, "zs/cos_before": np.asarray(cos0), "zs/cos_after": np.asarray(cos1),
            "zs/mask": np.asarray(mask)}
    return np.asarray(d_img), info
