"""CLIP image and text embeddings (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision", §2.3-2.4), for the CLIP similarity metrics of ``tdae_jax.metrics.clip_sim``.

Loads a local transformers-format ``CLIPModel`` directory (``config.json`` + ``model.safetensors`` or a
sharded index, as ``CLIPModel.save_pretrained(..., safe_serialization=True)`` writes; or ``flax_model.msgpack``;
``vocab.json`` + ``merges.txt`` for the tokenizer, optional) into transformers 4.57.6's Flax
``FlaxCLIPModule``, torch-free, through :mod:`tdae_jax.models.weights` (the two bare ``nn.Parameter`` tensors,
``vision_model.embeddings.class_embedding`` and ``logit_scale``, have no Linear/Conv/Norm/Embedding name rule
and are matched here by name, with the same missing/extra/shape checks and error format).

Preprocessing is ``CLIPImageProcessor``'s, in JAX: resize the shortest side to ``vision_config.image_size``
(bicubic with antialiasing, ``jax.image.resize``; the long side is ``int(size * long / short)``), center crop
(``top = (h - size) // 2``), normalize with ``OPENAI_CLIP_MEAN`` / ``OPENAI_CLIP_STD``. It works on float
images in [0, 1], so it differs from the PIL path only by PIL's uint8 rounding of the resized image.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from transformers import CLIPConfig, CLIPTokenizer
from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule

from tdae_jax.models import weights
from tdae_jax.models.weights import WeightsError

# transformers.utils.constants.OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (the CLIPImageProcessor defaults)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RAW_PARAMS = {("vision_model", "embeddings", "class_embedding"): "vision_model.embeddings.class_embedding",
              ("logit_scale",): "logit_scale"}  # bare nn.Parameter tensors: Flax path -> PyTorch name
_ACTS = ("quick_gelu", "gelu", "gelu_new", "relu")


@dataclasses.dataclass(eq=False)
class ClipStatic:
    """Non-array parts of a :class:`CLIPScorer`; compared and hashed by identity (one per loaded model)."""

    module: FlaxCLIPModule
    tokenizer: Any  # CLIPTokenizer or None (then only :meth:`CLIPScorer.text_features` on token ids)
    max_length: int  # text tokens per prompt (padding and truncation)
    source: str = ""

    __hash__ = object.__hash__


@flax.struct.dataclass
class CLIPScorer:
    """CLIP params (leaves) + static module and tokenizer. Embeddings are ``[B, D]`` float32, D =
    ``projection_dim``; ``*_embeds`` are L2-normalized (as CLIP's cosine logits use them)."""

    params: Any
    static: ClipStatic = flax.struct.field(pytree_node=False)

    @property
    def config(self) -> CLIPConfig:
        return self.static.module.config

    @property
    def image_size(self) -> int:
        return int(self.config.vision_config.image_size)

    def pixel_values(self, images: jax.Array) -> jax.Array:
        """``images: [B,H,W,3]`` in [0,1] -> ``[B,S,S,3]`` normalized CLIP input (S = ``image_size``)."""
        return preprocess(images, self.image_size)

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Preprocessed ``[B,S,S,3]`` (NHWC) -> ``[B,D]`` projected features, unnormalized
        (PyTorch ``CLIPModel.get_image_features`` on the NCHW transpose)."""
        def f(mod, x):
            return mod.visual_projection(mod.vision_model(pixel_values=x, deterministic=True)[1])

        return self.static.module.apply({"params": self.params}, jnp.asarray(pixel_values, jnp.float32), method=f)

    def text_features(self, input_ids, attention_mask=None) -> jax.Array:
        """``[B,T]`` token ids -> ``[B,D]`` projected features, unnormalized (``get_text_features``)."""
        ids = jnp.asarray(input_ids, jnp.int32)
        mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape)

        def f(mod, i, m, p):
            return mod.text_projection(mod.text_model(input_ids=i, attention_mask=m, position_ids=p,
                                                      deterministic=True)[1])

        return self.static.module.apply({"params": self.params}, ids, mask, pos, method=f)

    def image_embeds(self, images) -> jax.Array:
        """``images: [B,H,W,3]`` float in [0,1] -> ``[B,D]`` unit-norm CLIP image embeddings (jit-compiled)."""
        return embed_images(self, jnp.asarray(images, jnp.float32))

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``[B,T]`` int32 ids and attention mask, padded/truncated to ``max_length``."""
        if self.static.tokenizer is None:
            raise WeightsError(f"{self.static.source}: no tokenizer (vocab.json and merges.txt); embed token ids "
                               f"with text_features instead")
        enc = self.static.tokenizer(list(texts), padding="max_length", truncation=True,
                                    max_length=self.static.max_length, return_tensors="np")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    def text_embeds(self, texts: Sequence[str]) -> jax.Array:
        """``B`` strings -> ``[B,D]`` unit-norm CLIP text embeddings (jit-compiled per batch size)."""
        ids, mask = self.tokenize(texts)
        return embed_tokens(self, ids, mask)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@jax.jit
def embed_images(scorer: CLIPScorer, images: jax.Array) -> jax.Array:
    """Jitted ``l2_normalize(image_features(preprocess(images)))`` (one trace per scorer and image shape)."""
    return l2_normalize(scorer.image_features(scorer.pixel_values(images)))


@jax.jit
def embed_tokens(scorer: CLIPScorer, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return l2_normalize(scorer.text_features(input_ids, attention_mask))


def resize_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """``transformers.image_transforms.get_resize_output_image_size(default_to_square=False)``."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (new_long, size) if w <= h else (size, new_long)


def preprocess(images: jax.Array, size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> jax.Array:
    """``CLIPImageProcessor`` in JAX: ``[B,H,W,3]`` in [0,1] -> ``[B,size,size,3]`` normalized.

    Shortest side -> ``size`` (bicubic, antialiased; skipped when already that shape), center crop, then
    ``(x - mean) / std`` per channel. Differentiable."""
    x = jnp.asarray(images, jnp.float32)
    b, h, w, c = x.shape
    nh, nw = resize_shape(h, w, size)
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, c), method="bicubic", antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, top:top + size, left:left + size]
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# ---------------------------------------------------------------------------------------------- loading
def module_from_config(cfg: dict, where: Path, dtype=jnp.float32) -> FlaxCLIPModule:
    """transformers ``CLIPModel`` config.json -> ``FlaxCLIPModule``."""
    if cfg.get("model_type", "clip") != "clip":
        raise WeightsError(f"{where}: model_type={cfg.get('model_type')!r}, expected 'clip' (a CLIPModel with "
                           f"text and vision towers)")
    for part in ("text_config", "vision_config"):
        act = (cfg.get(part) or {}).get("hidden_act", "quick_gelu")
        if act not in _ACTS:
            raise WeightsError(f"{where}: unsupported {part}.hidden_act={act!r} (the Flax modules implement {_ACTS})")
    try:
        config = CLIPConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{where}: not a CLIPModel config ({e})") from e
    return FlaxCLIPModule(config=config, dtype=dtype)


def expected_params(module: FlaxCLIPModule) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Flat ``{path: ShapeDtypeStruct}`` of the params ``module`` builds from its config."""
    s = int(module.config.vision_config.image_size)
    ids = jnp.zeros((1, 2), jnp.int32)
    tree = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, jnp.zeros((1, s, s, 3)),
                                              jnp.ones_like(ids), jnp.zeros_like(ids)))["params"]
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def convert(state: dict[str, np.ndarray], files: dict[str, Path], expected: dict, *, source: Path,
            dtype=jnp.float32) -> dict:
    """PyTorch ``CLIPModel`` state dict -> Flax params (``weights.convert_pytorch`` + the bare parameters)."""
    state, files = dict(state), dict(files)
    raw, problems = {}, []
    for path, name in RAW_PARAMS.items():
        want = tuple(expected[path].shape)
        if name not in state:
            problems.append(f"{source}: missing tensor '{name}' (expected shape {want}; Flax param {'/'.join(path)})")
            continue
        arr, f = state.pop(name), files.pop(name)
        if tuple(arr.shape) != want:
            problems.append(f"{f}: tensor '{name}' has shape {tuple(arr.shape)}, expected {want}")
        raw[path] = jnp.asarray(np.asarray(arr, dtype=np.dtype(dtype)))
    if problems:
        raise WeightsError(f"{source}: {len(problems)} tensor(s) missing or with the wrong shape\n  "
                           + "\n  ".join(problems))
    rest = {p: s for p, s in expected.items() if p not in RAW_PARAMS}
    params = flax.traverse_util.flatten_dict(
        weights.convert_pytorch(state, files, rest, source=source, dtype=dtype))
    return flax.traverse_util.unflatten_dict({**params, **raw})


def load_params(directory, module: FlaxCLIPModule, dtype=jnp.float32) -> dict:
    """Validated Flax params of ``module`` from ``directory`` (safetensors, sharded, or Flax msgpack)."""
    fmt, path = weights.find_weights(directory, weights.TRANSFORMERS)
    expected = expected_params(module)
    if fmt == "msgpack":
        return weights.convert_msgpack(path, expected, dtype)
    state, files = weights.read_state_dict(fmt, path)
    return convert(state, files, expected, source=path, dtype=dtype)


def _max_length(tokenizer, config: CLIPConfig) -> int:
    n = int(config.text_config.max_position_embeddings)
    return n if tokenizer is None else min(int(tokenizer.model_max_length), n)


def load(directory, dtype=jnp.float32) -> CLIPScorer:
    """A :class:`CLIPScorer` from a local transformers ``CLIPModel`` directory. The tokenizer is read from
    ``vocab.json`` + ``merges.txt`` in the directory (or its ``tokenizer/``), else left out.
    Raises :class:`WeightsError` naming the file on a missing/mismatched config or tensor."""
    d = Path(directory)
    if not d.is_dir():
        raise WeightsError(f"{d}: CLIP weights directory not found")
    module = module_from_config(weights.read_config(d / "config.json"), d / "config.json", dtype)
    params = load_params(d, module, dtype)
    tokenizer = None
    for t in (d, d / "tokenizer"):
        if (t / "vocab.json").is_file() and (t / "merges.txt").is_file():
            tokenizer = CLIPTokenizer.from_pretrained(str(t), local_files_only=True)
            break
    return CLIPScorer(params, ClipStatic(module, tokenizer, _max_length(tokenizer, module.config), str(d)))


# ---------------------------------------------------------------------------------------------- tiny
def tiny_config(vocab_size: int, max_length: int = 16, eos: int = 2, bos: int = 1, pad: int = 1) -> CLIPConfig:
    """Tiny ``CLIPConfig`` (width 32, 2 layers, 4 heads, 32 px images, 8 px patches, 16-d projection)."""
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    return CLIPConfig(text_config=dict(common, vocab_size=vocab_size, max_position_embeddings=max_length,
                                       eos_token_id=eos, bos_token_id=bos, pad_token_id=pad),
                      vision_config=dict(common, image_size=32, patch_size=8), projection_dim=16)


def random_params(module: FlaxCLIPModule, seed: int = 0, dtype=jnp.float32) -> dict:
    """Seeded numpy-drawn params (``weights.random_params``' scheme; ``class_embedding`` ``N(0, 0.02^2)``,
    ``logit_scale`` = ``logit_scale_init_value``)."""
    special = {"class_embedding": lambda rng, shape: 0.02 * rng.standard_normal(shape),
               "logit_scale": lambda rng, shape: np.full(shape, module.config.logit_scale_init_value)}
    return weights.random_params(module, seed, dtype, expected=expected_params(module), special=special)


def tiny(seed: int = 0, dtype=jnp.float32) -> CLIPScorer:
    """Tiny random CLIP (seeded) with the tiny BPE tokenizer of ``models.sd`` (tests and plumbing only)."""
    from tdae_jax.models.sd import tiny_tokenizer

    tok = tiny_tokenizer(max_length=16)
    config = tiny_config(len(tok), 16, tok.eos_token_id, tok.bos_token_id, tok.pad_token_id)
    module = FlaxCLIPModule(config=config, dtype=dtype)
    return CLIPScorer(random_params(module, seed, dtype), ClipStatic(module, tok, 16, f"tiny@{seed}"))
