"""Identity encoders and identity metrics (DLADiff §4.2, §5: ISM, ISM_pro, FDR).

One interface for every face-recognition model the zero-shot layer attacks or the metrics score with:

    IdentityEncoder.apply(params, faces [B,S,S,3] float32 in [0,1], RGB, aligned) -> [B,D] embeddings
    IdentityEncoder.align(landmarks [5,2] (x, y) image pixels) -> M [2,3], image pixel -> face-crop pixel

- :func:`arcface_encoder`: a Flax ArcFace IResNet (Deng et al. 2019, "ArcFace", insightface
  ``recognition/arcface_torch/backbones/iresnet.py``: conv3x3-BN-PReLU stem, IBasicBlocks
  BN-conv-BN-PReLU-conv(stride)-BN with a 1x1 conv+BN shortcut, BN-flatten(C,H,W)-FC-BN head; 512-d),
  ``depth`` 18/34/50/100, input ``2p - 1`` (insightface: (255p - 127.5)/127.5, RGB), 112x112, aligned to
  the insightface 5-point template (``ARCFACE_TEMPLATE``, ``face_align.norm_crop``) by a similarity
  transform (:func:`umeyama`). Random init for tests; pretrained weights are not shipped (see docs/dladiff.md).
- ``tdae_jax.metrics.dlib_face``: dlib's ResNet-29 face descriptor ported to Flax (150x150 dlib chips).

Metrics: :func:`cosine` (per row), :func:`ism` (cosine to the mean clean embedding, ADB
``evaluations/ism_fdfr.py`` convention, undetected faces excluded), :func:`fdr` (share of images with a
detected face; needs a detector, e.g. ``dlib_face.detect``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# insightface utils/face_align.py arcface_dst (112x112): left eye, right eye, nose, left mouth, right mouth.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)
IRESNET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}


# ------------------------------------------------------------------------------------------------ alignment
def umeyama(src: np.ndarray, dst: np.ndarray, estimate_scale: bool = True) -> np.ndarray:
    """Least-squares similarity transform ``dst ~ s R src + t`` (Umeyama 1991, Eq. 40-42), as
    ``skimage.transform.SimilarityTransform.estimate`` (what insightface uses). Returns ``[3,3]``."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    n, dim = src.shape
    ms, md = src.mean(0), dst.mean(0)
    sc, dc = src - ms, dst - md
    a = dc.T @ sc / n
    d = np.ones(dim)
    if np.linalg.det(a) < 0:
        d[-1] = -1
    t = np.eye(dim + 1)
    u, s, v = np.linalg.svd(a)
    rank = np.linalg.matrix_rank(a)
    if rank == 0:
        raise ValueError("degenerate landmarks (all points coincide)")
    if rank == dim - 1 and np.linalg.det(u) * np.linalg.det(v) > 0:
        t[:dim, :dim] = u @ v
    elif rank == dim - 1:
        d2 = d.copy()
        d2[-1] = -1
        t[:dim, :dim] = u @ np.diag(d2) @ v
    else:
        t[:dim, :dim] = u @ np.diag(d) @ v
    scale = (s @ d) / sc.var(0).sum() if estimate_scale else 1.0
    t[:dim, dim] = md - scale * (t[:dim, :dim] @ ms)
    t[:dim, :dim] *= scale
    return t


def template_align(landmarks, template: np.ndarray = ARCFACE_TEMPLATE) -> np.ndarray:
    """``M [2,3]`` mapping image pixels (x, y) to crop pixels, from 5 landmarks ``[5,2]`` (x, y)."""
    lm = np.asarray(landmarks, np.float64).reshape(-1, 2)
    if lm.shape != template.shape:
        raise ValueError(f"need {template.shape[0]} landmarks (x, y), got shape {np.shape(landmarks)}")
    return umeyama(lm, template)[:2].astype(np.float32)


# ------------------------------------------------------------------------------------------------ interface
@dataclasses.dataclass(frozen=True, eq=False)
class IdentityEncoder:
    """A face-recognition model (hashable by identity: a static jit argument).

    ``module.apply({"params": params}, preprocess(faces))`` gives ``[B,D]``; ``size``: input side;
    ``aligner``: landmarks ``[5,2]`` (in ``landmark_format`` order) -> ``M [2,3]`` (image -> crop pixels)."""

    name: str
    module: nn.Module
    size: int
    preprocess: Callable[[jax.Array], jax.Array]
    aligner: Callable[[np.ndarray], np.ndarray]
    landmark_format: str = "arcface"  # which 5-point convention ``aligner`` expects: arcface | dlib

    __hash__ = object.__hash__

    def apply(self, params, faces: jax.Array) -> jax.Array:
        """``faces [B,size,size,3]`` in [0,1] RGB -> embeddings ``[B,D]`` float32 (not normalized)."""
        return self.module.apply({"params": params}, self.preprocess(faces.astype(jnp.float32)))

    def align(self, landmarks) -> np.ndarray:
        return np.asarray(self.aligner(np.asarray(landmarks, np.float64)), np.float32)

    def init(self, key: jax.Array):
        """Random params (seeded by ``key``): shapes from ``jax.eval_shape`` (no forward pass is run), values
        drawn host-side with Flax's default schemes (LeCun-normal kernels, zero biases; BN identity; PReLU
        0.25). Op-by-op Flax init of an IResNet costs tens of CPU seconds; this costs milliseconds."""
        shapes = jax.eval_shape(self.module.init, key, jnp.zeros((1, self.size, self.size, 3), jnp.float32))["params"]
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())

        def fill(path, s):
            name = getattr(path[-1], "key", str(path[-1]))
            if name == "kernel":
                fan_in = int(np.prod(s.shape[:-1]))
                return jnp.asarray(rng.standard_normal(s.shape).astype(np.float32) / np.sqrt(fan_in))
            value = {"scale": 1.0, "var": 1.0, "alpha": 0.25}.get(name, 0.0)
            return jnp.full(s.shape, value, s.dtype)

        return jax.tree_util.tree_map_with_path(fill, shapes)


# ------------------------------------------------------------------------------------------------ IResNet
class BN(nn.Module):
    """Inference BatchNorm with its statistics as params (one tree; ONNX/torch converters fill them)."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class PReLU(nn.Module):
    @nn.compact
    def __call__(self, x):
        a = self.param("alpha", nn.initializers.constant(0.25), (x.shape[-1],))
        return jnp.where(x >= 0, x, a * x)


def _conv(feat, k, stride, name):
    pad = (k - 1) // 2
    return nn.Conv(feat, (k, k), (stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False, name=name)


class IBasicBlock(nn.Module):
    planes: int
    stride: int
    downsample: bool

    @nn.compact
    def __call__(self, x):
        out = BN(name="bn1")(x)
        out = _conv(self.planes, 3, 1, "conv1")(out)
        out = PReLU(name="prelu")(BN(name="bn2")(out))
        out = BN(name="bn3")(_conv(self.planes, 3, self.stride, "conv2")(out))
        idt = BN(name="downsample_bn")(_conv(self.planes, 1, self.stride, "downsample_conv")(x)) if self.downsample else x
        return out + idt


class IResNet(nn.Module):
    """ArcFace IResNet on ``[B,112,112,3]`` normalized input -> ``[B,num_features]``."""

    layers: tuple = IRESNET_LAYERS[50]
    width: int = 64
    num_features: int = 512

    @nn.compact
    def __call__(self, x):
        x = PReLU(name="prelu")(BN(name="bn1")(_conv(self.width, 3, 1, "conv1")(x)))
        inplanes = self.width
        for i, n in enumerate(self.layers):
            planes = self.width * 2 ** i
            for j in range(n):
                stride = 2 if j == 0 else 1
                x = IBasicBlock(planes, stride, stride != 1 or inplanes != planes, name=f"layer{i + 1}_{j}")(x)
                inplanes = planes
        x = BN(name="bn2")(x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch flatten order (C, H, W)
        x = nn.Dense(self.num_features, name="fc")(x)
        return BN(name="features")(x)


def arcface_encoder(depth: int = 50, width: int = 64, num_features: int = 512, name: str | None = None
                    ) -> IdentityEncoder:
    """An ArcFace-style IResNet encoder (112x112, insightface template and normalization)."""
    if depth not in IRESNET_LAYERS:
        raise ValueError(f"iresnet depth must be one of {sorted(IRESNET_LAYERS)}, got {depth}")
    module = IResNet(IRESNET_LAYERS[depth], width, num_features)
    return IdentityEncoder(name or f"iresnet{depth}", module, 112, lambda f: f * 2.0 - 1.0, template_align)


# ------------------------------------------------------------------------------------------------ metrics
def normalize(e: jax.Array, eps: float = 1e-12) -> jax.Array:
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), eps)


def cosine(a, b) -> jax.Array:
    """Row-wise cosine similarity ``[B]`` of ``[B,D]`` embeddings (``b`` may be ``[D]``)."""
    a, b = normalize(jnp.asarray(a, jnp.float32)), normalize(jnp.asarray(b, jnp.float32))
    return jnp.sum(a * b, axis=-1)


def ism(embeddings, clean_embeddings, detected: Sequence[bool] | None = None) -> float:
    """Identity score matching: mean cosine of each (detected) face to the mean clean embedding
    (ADB ``ism_fdfr.py``). NaN when no face was detected."""
    e = np.asarray(embeddings, np.float32)
    if detected is not None:
        e = e[np.asarray(detected, bool)]
    if e.shape[0] == 0:
        return float("nan")
    ref = np.asarray(normalize(jnp.asarray(clean_embeddings, jnp.float32))).mean(0)
    return float(np.mean(np.asarray(cosine(e, ref))))


def fdr(images, detector: Callable[[np.ndarray], list]) -> float:
    """Face detection rate: share of ``images`` (uint8 or [0,1] float ``[H,W,3]``) where ``detector`` finds a face."""
    hits = [len(detector(np.asarray(im))) > 0 for im in images]
    return float(np.mean(hits)) if hits else float("nan")
