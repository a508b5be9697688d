"""Clean reference images -> FLUX transformer inputs -> a filled :class:`ReferenceKVCache`.

The one code path by which images become GSA references, used by
:meth:`storyattn.GroupSharedAttention.record_images`, by the Story-Iter FLUX backbone
and (the latent half) by the GSA/DPO trainer:

* :func:`encode_latents`: pixels ``[B, 3, H, W]`` in [-1, 1] -> the VAE posterior's
  mode, shifted and scaled the way FLUX normalises latents;
* :func:`pack_latents` / :func:`latent_image_ids`: FLUX's 2x2 patch tokens and their
  rotary position ids ``(0, row, col)``, laid out as ``FluxPipeline`` lays them out
  (written here so nothing depends on the pipeline's private helpers);
* :func:`record_images`: preprocess, encode, pack, then one transformer forward per
  batch at timestep 0 (sigma 0: clean) inside ``gsa.record(cache)``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from .cache import ReferenceKVCache

__all__ = ["encode_latents", "pack_latents", "latent_image_ids", "record_images",
           "unwrap_model", "unwrap_to", "record_inputs"]


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] -> normalised FLUX latents ``[B, C, H/f, W/f]``
    in the VAE's dtype: ``(mode - shift_factor) * scaling_factor``.

    The posterior's mode (not a sample) is used, so the same image always gives the
    same latent: a cached reference equals one encoded on the fly.
    """
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    lat = vae.encode(pixels).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (lat - shift) * vae.config.scaling_factor


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` latents -> FLUX tokens ``[B, (H/2)(W/2), 4C]``: one token per
    2x2 patch, rows then columns, each token's features ordered (channel, dy, dx)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches; latent size {h}x{w} is not even")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def latent_image_ids(latent_h: int, latent_w: int, device=None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rotary ids ``[(H/2)(W/2), 3]`` of a lone image's packed tokens: ``(0, row, col)``."""
    rows = torch.arange(latent_h // 2).repeat_interleave(latent_w // 2)
    cols = torch.arange(latent_w // 2).repeat(latent_h // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()
    return ids.to(device=device, dtype=dtype)


def _as_list(images) -> List:
    """One list entry per image: a PIL image, a ``[3, H, W]`` tensor or an array."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            return [images]
        if images.dim() == 4:
            return list(images.unbind(0))
        raise ValueError(f"record_images: image tensors must be [3, H, W] or [N, 3, H, W], got "
                         f"shape {tuple(images.shape)}")
    if isinstance(images, (list, tuple)):
        out = []
        for im in images:
            out += _as_list(im) if isinstance(im, torch.Tensor) else [im]
        return out
    return [images]  # a single PIL image / numpy array


def _prompts_for(prompts, n: int) -> List[str]:
    if prompts is None:
        return [""] * n
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"record_images: prompts must be None, a string or {n} strings (one per "
                         f"image), got {len(prompts)} item(s)")
    return prompts


def unwrap_model(model):
    """The diffusers model inside torch.compile (``_orig_mod``) and DDP/FSDP-style
    (``module``) wrappers: the one whose blocks GSA hooks and whose processors it replaces.
    None stays None."""
    while model is not None and not hasattr(model, "transformer_blocks") and (
            hasattr(model, "_orig_mod") or hasattr(model, "module")):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def unwrap_to(model, target):
    """``model`` with torch.compile / DDP wrappers taken off until it is ``target`` (a
    compiled module forwards ``transformer_blocks``, so :func:`unwrap_model` would stop at
    it): how ``record_images`` tells that ``pipe.transformer`` is the handle's model."""
    while model is not None and model is not target and (
            hasattr(model, "_orig_mod") or hasattr(model, "module")):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def record_inputs(images, batch_size, cache: Optional[ReferenceKVCache], replace: bool):
    """The checks every ``record_images`` makes of its common arguments: the images as a
    non-empty list, a positive int batch size, and the cache to append to (a new one when
    None; emptied first with ``replace``).  Returns ``(items, cache)``."""
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"record_images: batch_size must be an int >= 1, got {batch_size!r}")
    items = _as_list(images)
    if not items:
        raise ValueError("record_images: no images given")
    cache = ReferenceKVCache() if cache is None else cache
    if not isinstance(cache, ReferenceKVCache):
        raise TypeError(f"record_images: cache must be a ReferenceKVCache, got "
                        f"{type(cache).__name__}")
    if replace:
        cache.reset()
    return items, cache


def record_images(gsa, pipe, images, prompts=None,
                  cache: Optional[ReferenceKVCache] = None, *, height: Optional[int] = None,
                  width: Optional[int] = None, batch_size: int = 4, guidance: float = 3.5,
                  max_sequence_length: Optional[int] = None,
                  replace: bool = False) -> ReferenceKVCache:
    """See :meth:`storyattn.GroupSharedAttention.record_images`.

    ``gsa`` is that handle; its class is not imported here because ``storyattn.gsa``
    imports this module (one direction only)."""
    for attr in ("vae", "image_processor", "encode_prompt"):
        if not hasattr(pipe, attr):
            raise TypeError(f"record_images needs a diffusers FluxPipeline (vae, image_processor, "
                            f"encode_prompt, transformer); got {type(pipe).__name__} without "
                            f"{attr!r}")
    if unwrap_to(getattr(pipe, "transformer", None), gsa.transformer) is not gsa.transformer:
        raise ValueError("record_images: pipe.transformer is not the transformer this "
                         "GroupSharedAttention was installed on")
    items, cache = record_inputs(images, batch_size, cache, replace)
    texts = _prompts_for(prompts, len(items))
    cache.reserve(len(cache) + len(items))

    device, dtype = gsa._device(), gsa.transformer.dtype
    if max_sequence_length is None:
        max_sequence_length = min(512, int(pipe.tokenizer_2.model_max_length))
    with_guidance = bool(getattr(gsa.transformer.config, "guidance_embeds", False))
    with torch.no_grad():
        for s in range(0, len(items), int(batch_size)):
            chunk, chunk_texts = items[s:s + batch_size], texts[s:s + batch_size]
            n = len(chunk)
            px = pipe.image_processor.preprocess(chunk, height=height, width=width)
            lat = encode_latents(pipe.vae, px.to(device)).to(dtype)
            _, _, h, w = lat.shape
            embeds, pooled, text_ids = pipe.encode_prompt(
                prompt=chunk_texts, prompt_2=None, device=device,
                max_sequence_length=max_sequence_length)
            g = torch.full((n,), float(guidance), device=device, dtype=torch.float32) \
                if with_guidance else None
            with gsa.record(cache):
                pipe.transformer(hidden_states=pack_latents(lat), encoder_hidden_states=embeds,
                                 pooled_projections=pooled,
                                 timestep=torch.zeros(n, device=device, dtype=dtype),
                                 img_ids=latent_image_ids(h, w, device, dtype), txt_ids=text_ids,
                                 guidance=g, return_dict=False)
    return cache
