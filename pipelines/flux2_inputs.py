"""FLUX.2 [klein] inputs and one transformer call, for the trainers: the twin of
:mod:`pipelines.flux_inputs` (same function names and signatures, so a stage picks the
module by the model's family and runs the same step code).

What differs from FLUX.1, taken from the pipeline's own helpers rather than re-written:

* text: ``Flux2KleinPipeline.encode_prompt`` (Qwen3 hidden states 9, 18, 27 stacked, the
  chat template); there is no pooled embedding (an empty tensor stands in for it);
* latents: :func:`storyattn.flux2.encode_flux2_latents` (posterior mode, 2x2 patchify,
  batch-norm normalisation, flattened) -- the code that records GSA references, so a
  training latent equals a recorded reference's; they come out packed already;
* position ids have 4 axes ``(T, H, W, L)``: image ``(0, row, col, 0)``
  (:func:`storyattn.flux2.flux2_image_ids`), text ``(0, 0, 0, l)``
  (``Flux2KleinPipeline._prepare_text_ids``); the GSA handle places references itself.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from storyattn.flux2 import encode_flux2_latents, flux2_image_ids

from .flux_inputs import encode_unique

__all__ = ["encode_prompts", "encode_latents", "pack_latents", "image_ids", "flux_forward",
           "has_guidance_embeds"]


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], device, max_sequence_length: int,
                   batch_size: int = 8) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Unique prompt -> (Qwen3 embeddings ``[L, D]``, an empty ``[0]`` pooled stand-in), CPU."""
    def encode(chunk):
        emb, _ids = pipe.encode_prompt(prompt=chunk, device=device, num_images_per_prompt=1,
                                       max_sequence_length=max_sequence_length)
        return [(emb[j].cpu(), torch.zeros(0)) for j in range(len(chunk))]
    return encode_unique(prompts, batch_size, encode)


def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] -> FLUX.2 tokens ``[B, (H/2f)(W/2f), 4C]`` (float32)."""
    return encode_flux2_latents(vae, pixels).float()


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX.2 latents are packed when encoded: tokens ``[B, L, 4C]`` pass through."""
    if latents.dim() != 3:
        raise ValueError(f"FLUX.2 tokens are [B, L, C]; got shape {tuple(latents.shape)}")
    return latents


def image_ids(latent_h: int, latent_w: int, device, dtype) -> torch.Tensor:
    """Position ids ``[H/2 * W/2, 4]`` of a lone image (VAE latent size ``latent_h x latent_w``)."""
    return flux2_image_ids(latent_h // 2, latent_w // 2, device=device).to(dtype)


def text_ids(text: torch.Tensor) -> torch.Tensor:
    """Position ids ``[L, 4]`` of ``L`` text tokens, as the klein pipeline makes them."""
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline._prepare_text_ids(text[:1])[0].to(text.device)


def flux_forward(transformer, packed: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
                 sigma: torch.Tensor, img_ids: torch.Tensor, guidance: Optional[float]) -> torch.Tensor:
    """One transformer call on tokens ``[rows, L, 4C]`` at noise levels ``sigma`` ``[rows]``
    (the pipelines pass ``t / 1000 = sigma``); returns the velocity ``[rows, L, 4C]``.
    ``pooled`` is unused (FLUX.2 has none); ``guidance`` feeds a guidance embedding (dev)."""
    del pooled
    g = None
    if guidance is not None:
        g = torch.full((packed.shape[0],), float(guidance), device=packed.device, dtype=torch.float32)
    out = transformer(hidden_states=packed, encoder_hidden_states=text, timestep=sigma,
                      img_ids=img_ids, txt_ids=text_ids(text).to(img_ids.dtype), guidance=g,
                      return_dict=False)
    return out[0]


def has_guidance_embeds(transformer) -> bool:
    return bool(getattr(transformer.config, "guidance_embeds", False))
