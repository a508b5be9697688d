"""The world's FLUX model: architecture, an untrained pipeline folder, sampling helpers.

The pipeline is a real diffusers ``FluxPipeline`` folder (``FluxPipeline.from_pretrained``
loads it): ``FluxTransformer2DModel`` + ``AutoencoderKL`` (4x downsampling, so 64x64 images
are 16x16 latents = 64 packed tokens) + the tiny CLIP/T5 text encoders of
:mod:`pipelines.tiny`, whose tokenizers also know the world's words (names, ``centre``) as
whole tokens.  The text encoders stay at their seeded random weights (frozen everywhere):
distinct prompts give distinct embeddings, which is all the transformer needs.

The transformer has no guidance embedding (FLUX.1-schnell's layout): it is trained and
sampled at one conditioning, so no guidance value can be out of its training range.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import torch

from .. import tiny
from . import data as D

__all__ = ["WORLD_WORDS", "world_transformer_config", "world_vae_config", "build_world_pipeline",
           "MAX_SEQUENCE_LENGTH"]

MAX_SEQUENCE_LENGTH = 32
WORLD_WORDS = list(dict.fromkeys(tiny._WORDS + ["centre"] + [n.lower() for n in D.NAMES]
                                 + list(D.NAMES)))


def world_transformer_config() -> dict:
    return {
        "patch_size": 1,
        "in_channels": 64,              # 2x2 packed patches of 16 latent channels
        "out_channels": None,
        "num_layers": 2,
        "num_single_layers": 4,
        "attention_head_dim": 16,
        "num_attention_heads": 6,       # inner dim 96
        "joint_attention_dim": 32,      # T5 d_model
        "pooled_projection_dim": 32,    # CLIP hidden size
        "guidance_embeds": False,
        "axes_dims_rope": (4, 6, 6),
    }


def world_vae_config() -> dict:
    # the tiny preset's FLUX-style VAE (16 latent channels, scale factor 4)
    return tiny._flux_vae_config()


def build_world_pipeline(path, seed: int = 0, transformer=None, vae=None) -> str:
    """Write an untrained (or partly trained: pass ``transformer`` / ``vae``) world FLUX
    pipeline folder to ``path``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = tiny._build_clip_tokenizer(MAX_SEQUENCE_LENGTH, WORLD_WORDS)
    tok2 = tiny._build_t5_tokenizer(MAX_SEQUENCE_LENGTH, WORLD_WORDS)
    with tiny._seeded(seed * 1000 + 101):
        transformer = transformer or FluxTransformer2DModel(**world_transformer_config())
    with tiny._seeded(seed * 1000 + 102):
        vae = vae or AutoencoderKL(**world_vae_config())
    with tiny._seeded(seed * 1000 + 103):
        te = CLIPTextModel(tiny._clip_text_config(len(tok), tok.eos_token_id, tok.bos_token_id,
                                                  hidden=32, heads=2, proj=32,
                                                  max_len=MAX_SEQUENCE_LENGTH))
    with tiny._seeded(seed * 1000 + 104):
        te2 = T5EncoderModel(T5Config(
            vocab_size=len(tok2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=32,
            dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
            pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id,
            decoder_start_token_id=tok2.pad_token_id))
    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=vae.eval(), text_encoder=te.eval(), tokenizer=tok,
                        text_encoder_2=te2.eval(), tokenizer_2=tok2,
                        transformer=transformer.eval())
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def images_to_tensor(images: Sequence) -> torch.Tensor:
    """uint8 HWC arrays / PIL images -> float32 [B, 3, H, W] in [-1, 1]."""
    import numpy as np

    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def tensor_to_uint8(x: torch.Tensor) -> List:
    """[B, 3, H, W] in [-1, 1] -> list of uint8 HWC arrays."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [im.permute(1, 2, 0).cpu().numpy() for im in x]
