"""Model constructors of the miniature models (``tdae_jax/miniature/``, docs/miniature.md): the diffusers /
transformers classes they are built from, kept in the model layer (the only package that imports diffusers or
transformers). ``miniature/train.py`` re-exports them (``train.make_vae`` etc.) and owns the configs they read
(``VAEConfig``, ``DiffusionConfig``: read by attribute, not imported, so this module does not import the trainers).

- ``make_vae``: diffusers' ``FlaxAutoencoderKL`` (Kingma & Welling 2014; LDM, Rombach et al. 2022 §3);
- ``make_unet``: the project's ``sd.UNet`` (a ``FlaxUNet2DConditionModel`` with PyTorch numerics);
- ``make_text_encoder``: transformers' ``FlaxCLIPTextModule`` (Radford et al. 2021);
- ``word_tokenizer``: a ``CLIPTokenizer`` with a byte-level BPE vocabulary learned on a word list (the BPE merge
  loop of Sennrich et al. 2016, restated; the files are what huggingface/transformers
  ``src/transformers/models/clip/tokenization_clip.py`` ``CLIPTokenizer`` reads: ``vocab.json`` over its
  ``bytes_to_unicode`` symbols, and ``merges.txt``).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path


def make_vae(cfg, scaling_factor: float = 1.0):
    """diffusers' ``FlaxAutoencoderKL`` of a ``miniature.train.VAEConfig``."""
    from diffusers import FlaxAutoencoderKL

    n = len(cfg.block_out_channels)
    return FlaxAutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                             up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.block_out_channels),
                             layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                             norm_num_groups=cfg.norm_num_groups, sample_size=cfg.size,
                             scaling_factor=float(scaling_factor))


def make_unet(cfg, latent_channels: int, sample_size: int):
    """The project's ``sd.UNet`` (a ``FlaxUNet2DConditionModel`` with PyTorch numerics): cross-attention at
    every lower level and in the middle block, at the top level only with ``attention_top``."""
    from tdae_jax.models import sd  # lazy, as the other constructors: importing this module stays cheap

    n = len(cfg.block_out_channels)
    top = "CrossAttn" if cfg.attention_top else ""
    down = (top + "DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + (top + "UpBlock2D",)
    in_ch = 2 * latent_channels if cfg.family == "ip2p" else latent_channels
    return sd.UNet(sample_size=sample_size, in_channels=in_ch, out_channels=latent_channels, down_block_types=down,
                   up_block_types=up, block_out_channels=tuple(cfg.block_out_channels),
                   layers_per_block=cfg.layers_per_block, attention_head_dim=cfg.attention_heads,
                   cross_attention_dim=cfg.text_hidden)


def make_text_encoder(cfg, tok):
    """transformers' ``FlaxCLIPTextModule`` of a ``miniature.train.DiffusionConfig`` over tokenizer ``tok``."""
    from transformers import CLIPTextConfig
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPTextModule

    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
                            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                            max_position_embeddings=cfg.max_length, hidden_act="quick_gelu",
                            projection_dim=cfg.text_hidden, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return FlaxCLIPTextModule(config=config)


def word_tokenizer(word_list, max_length: int = 32):
    """A real ``CLIPTokenizer`` whose BPE merges make every word of ``word_list`` a single token.

    Vocabulary: CLIP's 512 byte-level symbols (``c`` and ``c</w>``), then one entry per merge, learned by
    plain BPE on the word list until every word is one symbol, then the two special tokens.
    """
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    word_list = list(word_list)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): 1 for w in word_list}
    merges = []
    while True:
        counts: dict = {}
        for w in words:
            for p in zip(w, w[1:]):
                counts[p] = counts.get(p, 0) + 1
        if not counts:
            break
        best = max(sorted(counts), key=lambda p: counts[p])   # deterministic: first of the most frequent
        merges.append(best)
        tokens.append(best[0] + best[1])
        new = {}
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] = 1
        words = new
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    seen, uniq = set(), []
    for t in tokens:
        if t not in seen:
            seen.add(t), uniq.append(t)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(uniq)}))
        Path(d, "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tok = CLIPTokenizer(str(Path(d, "vocab.json")), str(Path(d, "merges.txt")), model_max_length=max_length,
                            pad_token="<|endoftext|>")
    for w in word_list:
        if len(tok.tokenize(w)) != 1:
            raise AssertionError(f"word {w!r} is not a single token: {tok.tokenize(w)}")
    return tok
