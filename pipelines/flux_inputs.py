"""FLUX inputs and one transformer call, as the trainers and the world's sampler make them:
prompts -> embeddings, pixels -> packed latents and their position ids, the forward.

Shared by ``python -m pipelines.train`` (GSA / DPO stages), the story world's build (base
training, sampling) and the benchmarks; the latent half is storyattn's own
(:mod:`storyattn.references`), so a training latent equals a recorded reference's.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from storyattn.references import encode_latents as _encode_latents
from storyattn.references import latent_image_ids
from storyattn.references import pack_latents as _pack_latents

__all__ = ["encode_unique", "encode_prompts", "encode_latents", "pack_latents", "image_ids",
           "flux_forward", "has_guidance_embeds"]


def encode_unique(prompts: Sequence[str], batch_size: int, encode) -> Dict[str, Tuple]:
    """Each distinct prompt once, ``batch_size`` at a time: ``encode(chunk)`` returns one
    ``(embedding, pooled)`` per prompt of the chunk (the FLUX.1 and FLUX.2 encoders both
    run through here)."""
    uniq = list(dict.fromkeys(prompts))
    out: Dict[str, Tuple] = {}
    for i in range(0, len(uniq), batch_size):
        chunk = uniq[i:i + batch_size]
        out.update(zip(chunk, encode(chunk)))
    return out


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], device, max_sequence_length: int,
                   batch_size: int = 8) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Unique prompt -> (T5 embeddings ``[L, D]``, CLIP pooled ``[P]``), kept on the CPU."""
    def encode(chunk):
        emb, pooled, _ = pipe.encode_prompt(prompt=chunk, prompt_2=None, device=device,
                                            num_images_per_prompt=1,
                                            max_sequence_length=max_sequence_length)
        return [(emb[j].cpu(), pooled[j].cpu()) for j in range(len(chunk))]
    return encode_unique(prompts, batch_size, encode)


def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] -> normalised FLUX latents ``[B, 16, H/f, W/f]``
    (float32), by the same code that records GSA references
    (:func:`storyattn.references.encode_latents`: posterior mode, so a cached latent
    equals an on-the-fly one and training stays deterministic)."""
    return _encode_latents(vae, pixels).float()


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> FLUX packed ``[B, H/2 * W/2, 4C]`` (2x2 patches)."""
    return _pack_latents(latents)


def image_ids(latent_h: int, latent_w: int, device, dtype) -> torch.Tensor:
    """Position ids ``[H/2 * W/2, 3]`` of a lone image, as FluxPipeline makes them."""
    return latent_image_ids(latent_h, latent_w, device, dtype)


def flux_forward(transformer, packed: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
                 sigma: torch.Tensor, img_ids: torch.Tensor, guidance: Optional[float]) -> torch.Tensor:
    """One transformer call on ``[rows, L, 64]`` packed latents at noise levels ``sigma``
    ``[rows]``; returns the predicted velocity ``[rows, L, 64]``."""
    txt_ids = torch.zeros(text.shape[1], 3, device=packed.device, dtype=img_ids.dtype)
    g = None
    if guidance is not None:
        g = torch.full((packed.shape[0],), float(guidance), device=packed.device, dtype=torch.float32)
    out = transformer(hidden_states=packed, encoder_hidden_states=text, pooled_projections=pooled,
                      timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, guidance=g,
                      return_dict=False)
    return out[0]


def has_guidance_embeds(transformer) -> bool:
    return bool(getattr(transformer.config, "guidance_embeds", False))
