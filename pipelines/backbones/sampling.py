"""Scheduler choice and fp32 VAE decoding for the backbones' stock pipelines."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

__all__ = ["set_scheduler", "decode_vae_in_fp32", "story_iter_ddim"]


def story_iter_ddim():
    """The DDIM the official Story-Iter code passes to its SDXL pipeline (eta 0 is the
    pipeline's default)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def set_scheduler(pipe, kind: str, family: str) -> None:
    """``model``: keep what the folder ships; ``ddim``: :func:`story_iter_ddim` (SDXL);
    ``euler``: Euler from the shipped config (SDXL) / flow-matching Euler (FLUX)."""
    if kind == "model":
        return
    if kind == "ddim":
        if family != "sdxl":
            raise ValueError("--scheduler ddim is for SDXL")
        pipe.scheduler = story_iter_ddim()
    elif kind == "euler":
        if family == "sdxl":
            from diffusers import EulerDiscreteScheduler as Euler
        else:
            from diffusers import FlowMatchEulerDiscreteScheduler as Euler
        pipe.scheduler = Euler.from_config(pipe.scheduler.config)
    else:
        raise ValueError(f"unknown scheduler {kind!r}")


def decode_vae_in_fp32(pipe, model: Optional[str] = None) -> None:
    """Run the VAE in fp32 and feed its decoder fp32 latents, whatever the run's dtype.

    The stock SDXL pipeline already upcasts an fp16 VAE whose config says
    ``force_upcast``, but not a bf16 one and not a VAE without that flag; FLUX never does.
    With ``model`` (the pipeline folder) the VAE is loaded again from ``model/vae`` in
    fp32, so its weights keep their stored precision rather than the run's rounding.
    Latents reach ``vae.decode`` in the denoiser's dtype, so the decoder casts them."""
    vae = pipe.vae
    if getattr(vae, "_storyattn_fp32_decode", False):
        return
    if (vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
            and hasattr(pipe, "upcast_vae")):
        # the stock SDXL pipeline upcasts this one itself, scaling the latents in fp32 first:
        # leave it so (that is what the official fp16 Story-Iter run does)
        return
    if model is not None and (Path(model) / "vae" / "config.json").is_file():
        from diffusers import AutoencoderKL

        device = next(vae.parameters()).device
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32)
        vae.to(device)
        pipe.register_modules(vae=vae)
    vae.to(torch.float32)
    inner = vae.decode

    def decode(z, *args, **kwargs):
        return inner(z.to(torch.float32), *args, **kwargs)

    vae.decode = decode
    vae._storyattn_fp32_decode = True


def prepare_pipe(pipe, backbone, family: str) -> None:
    """What every backbone does to a loaded pipeline before a run: move it to the run's
    device, set the scheduler, the fp32 VAE decode and the per-step bar.  ``backbone`` is
    the FLUX or SDXL backbone (its device, scheduler, vae_fp32, dtype, model and
    step_progress)."""
    pipe.to(backbone.device)
    set_scheduler(pipe, backbone.scheduler, family)
    if backbone.vae_fp32 and backbone.dtype != torch.float32:
        # FLUX.2's VAE is not an AutoencoderKL: cast the loaded one instead of reloading
        decode_vae_in_fp32(pipe, backbone.model if family != "flux2" else None)
    pipe.set_progress_bar_config(disable=not backbone.step_progress, leave=False, desc="steps",
                                 position=2)
