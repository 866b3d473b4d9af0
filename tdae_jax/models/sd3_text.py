"""SD3 text conditioning: CLIP-L + CLIP-G + T5, assembled as ``StableDiffusion3Pipeline.encode_prompt``
(diffusers 0.39.0 ``pipeline_stable_diffusion_3.py`` L233–530).

    hL = CLIP-L.hidden_states[-2] [B,77,768]   hG = CLIP-G.hidden_states[-2] [B,77,1280]
    prompt_embeds = concat([pad_to_4096(concat([hL, hG], -1)), T5(ids)[0] [B,256,4096]], axis=1)  [B,333,4096]
    pooled = concat([CLIP-L.text_embeds, CLIP-G.text_embeds], -1)                                  [B,2048]

No encoder gets an attention mask. Without a T5 (``text_encoder_3`` absent) the T5 part is zeros of
``[B, max_sequence_length, joint_attention_dim]``, as diffusers does. The encoders are transformers'
Flax CLIP / T5 modules; weights load torch-free from safetensors (single or sharded). Text encoding is
host-side and frozen: encode once, outside the attack's jit, and reuse ``(prompt_embeds, pooled)``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tdae_jax.models import sd3_io

_IGNORABLE = ("text_model.embeddings.position_ids", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _convert(tensors: dict, where: dict, module, init_args, component: str, dtype) -> dict:
    """transformers PyTorch state dict (numpy) -> Flax params for a linen ``module``, strictly checked."""
    from transformers.modeling_flax_pytorch_utils import rename_key_and_reshape_tensor

    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *init_args))["params"]
    expected = sd3_io.flat_shapes(shapes)
    structs = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in expected.items()}
    converted = {}
    for name, arr in tensors.items():
        if name in _IGNORABLE:
            continue
        a = np.asarray(arr).astype(dtype)
        key, a = rename_key_and_reshape_tensor(tuple(name.split(".")), a, structs, "")
        converted[key] = (np.ascontiguousarray(a), name, where.get(name, "<memory>"))
    return sd3_io.check_and_unflatten(converted, expected, component)


def clip_module(config, dtype=jnp.float32):
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPTextModelWithProjectionModule

    return FlaxCLIPTextModelWithProjectionModule(config, dtype=dtype)


def _t5_relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """transformers 4.57.6 ``FlaxT5Attention._relative_position_bucket`` with ``jnp.clip(max=)``: the original
    calls ``jnp.clip(a_max=)``, which jax 0.10 removed (TypeError at the first T5 call)."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0) * num_buckets
        relative_position = jnp.abs(relative_position)
    else:
        relative_position = -jnp.clip(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (jnp.log(relative_position / max_exact) / jnp.log(max_distance / max_exact)
                         * (num_buckets - max_exact))
    large = jnp.clip(large, max=num_buckets - 1)
    relative_buckets += jnp.where(is_small, relative_position, large)
    return relative_buckets.astype("i4")


def t5_module(config, dtype=jnp.float32):
    from transformers.models.t5 import modeling_flax_t5 as mt5

    mt5.FlaxT5Attention._relative_position_bucket = staticmethod(_t5_relative_position_bucket)
    return mt5.FlaxT5EncoderModule(config, dtype=dtype)


def convert_clip(tensors, where, module, dtype=np.float32, component="text_encoder"):
    ids = jnp.zeros((1, 1), jnp.int32)
    return _convert(tensors, where, module, (ids, jnp.ones_like(ids), ids), component, dtype)


def convert_t5(tensors, where, module, dtype=np.float32, component="text_encoder_3"):
    ids = jnp.zeros((1, 1), jnp.int32)
    return _convert(tensors, where, module, (ids, jnp.ones_like(ids)), component, dtype)


def load_clip(directory: str, dtype=jnp.float32, param_dtype=np.float32):
    from transformers import CLIPTextConfig

    cfg = CLIPTextConfig.from_pretrained(directory, local_files_only=True)
    module = clip_module(cfg, dtype)
    tensors, where = sd3_io.load_state_dict(directory, "model")
    return module, convert_clip(tensors, where, module, param_dtype, os.path.basename(directory.rstrip("/")))


def load_t5(directory: str, dtype=jnp.float32, param_dtype=np.float32):
    from transformers import T5Config

    cfg = T5Config.from_pretrained(directory, local_files_only=True)
    module = t5_module(cfg, dtype)
    tensors, where = sd3_io.load_state_dict(directory, "model")
    return module, convert_t5(tensors, where, module, param_dtype, os.path.basename(directory.rstrip("/")))


def clip_embed(module, params, ids, clip_skip: Optional[int] = None):
    """(hidden_states[-(clip_skip or 0) - 2] ``[B,T,W]``, text_embeds ``[B,P]``) for ids ``[B,T]``."""
    pos = jnp.broadcast_to(jnp.arange(ids.shape[-1])[None], ids.shape)
    out = module.apply({"params": params}, ids, jnp.ones_like(ids), pos, deterministic=True,
                       output_hidden_states=True)
    return out.hidden_states[-((clip_skip or 0) + 2)], out.text_embeds


def t5_embed(module, params, ids):
    """T5 encoder last hidden state ``[B, T, d_model]``."""
    return module.apply({"params": params}, ids, jnp.ones_like(ids), deterministic=True)[0]


def assemble(h_l, h_g, pooled_l, pooled_g, t5):
    """The pipeline's concatenation: (prompt_embeds ``[B, 77 + T5, D]``, pooled ``[B, P_l + P_g]``)."""
    clip = jnp.concatenate([h_l, h_g], axis=-1)
    if clip.shape[-1] > t5.shape[-1]:
        raise ValueError(f"CLIP width {clip.shape[-1]} exceeds T5 width {t5.shape[-1]}")
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
    return jnp.concatenate([clip, t5.astype(clip.dtype)], axis=-2), jnp.concatenate([pooled_l, pooled_g], axis=-1)


@dataclasses.dataclass(eq=False)
class SD3TextEncoders:
    """Host-side text conditioning (frozen; not a pytree: it never enters a jitted attack step)."""

    clip_l: Any
    clip_l_params: Any
    clip_g: Any
    clip_g_params: Any
    t5: Any  # None: T5 dropped, zeros are used
    t5_params: Any
    tokenizer_l: Any = None
    tokenizer_g: Any = None
    tokenizer_t5: Any = None
    max_sequence_length: int = 256
    joint_attention_dim: int = 4096
    clip_skip: Optional[int] = None

    __hash__ = object.__hash__

    def __post_init__(self):
        # transformers' Flax modules hold an unhashable config, so they are closed over, not static args
        self._clip_l_fn = jax.jit(functools.partial(clip_embed, self.clip_l, clip_skip=self.clip_skip))
        self._clip_g_fn = jax.jit(functools.partial(clip_embed, self.clip_g, clip_skip=self.clip_skip))
        self._t5_fn = None if self.t5 is None else jax.jit(functools.partial(t5_embed, self.t5))

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """Ids ``[B,77]``, ``[B,77]``, ``[B,max_sequence_length]`` (padding="max_length", truncation)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)

        def tok(t, n, **kw):
            return np.asarray(t(prompts, padding="max_length", max_length=n, truncation=True,
                                return_tensors="np", **kw).input_ids, np.int32)

        n_clip = self.tokenizer_l.model_max_length if self.tokenizer_l is not None else 77
        ids_t5 = None
        if self.t5 is not None:
            ids_t5 = tok(self.tokenizer_t5, self.max_sequence_length, add_special_tokens=True)
        return tok(self.tokenizer_l, n_clip), tok(self.tokenizer_g, n_clip), ids_t5

    def embed_ids(self, ids_l, ids_g, ids_t5=None) -> tuple[jax.Array, jax.Array]:
        """(prompt_embeds ``[B, 77 + max_sequence_length, joint_attention_dim]``, pooled ``[B, 2048]``)."""
        h_l, p_l = self._clip_l_fn(self.clip_l_params, jnp.asarray(ids_l))
        h_g, p_g = self._clip_g_fn(self.clip_g_params, jnp.asarray(ids_g))
        if self.t5 is None:
            t5 = jnp.zeros((h_l.shape[0], self.max_sequence_length, self.joint_attention_dim), h_l.dtype)
        else:
            t5 = self._t5_fn(self.t5_params, jnp.asarray(ids_t5))
        return assemble(h_l, h_g, p_l, p_g, t5)

    def __call__(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        return self.embed_ids(*self.tokenize(prompts))


def char_tokenizer(max_length: int, clip: bool = True, pad: str = "<eos>"):
    """An in-memory character-level tokenizer for tiny random models (no files, no network).

    ``clip``: ``<bos> chars <eos>`` with ``<eos>`` the highest id (CLIP pools at argmax(ids));
    otherwise T5-style ``chars </s>``. Pads with ``pad`` to ``max_length``. Vocab: 100 ids.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]  # 95 printable ASCII
    if clip:
        vocab = {c: i for i, c in enumerate(chars)}
        vocab.update({"<unk>": 95, "<pad>": 96, "<bos>": 97, "<eos>": 99})
        vocab["<unused>"] = 98
        bos, eos = "<bos>", "<eos>"
    else:
        vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
        vocab.update({"<u1>": 98, "<u2>": 99})
        bos, eos = None, "</s>"
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    single = (f"{bos} $A {eos}" if bos else f"$A {eos}")
    special = [(t, vocab[t]) for t in (bos, eos) if t]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    kw = dict(bos_token=bos) if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, unk_token="<unk>",
                                   eos_token=eos, pad_token=pad if clip else "<pad>", **kw)
