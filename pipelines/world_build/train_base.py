"""The two world stages that are not LoRA: the VAE and the text-to-image base transformer.

Both train on frames rendered on the fly from a seeded pool (:func:`data.make_base_frames`),
full weights, AdamW, one seeded generator per stage.  The LoRA stages (gsa, dpo) are the
project's own trainer, ``python -m pipelines.train``.

VAE: ``AutoencoderKL`` (16 latent channels, 4x downsampling), loss = L1 + MSE of the
reconstruction of a posterior *sample* + ``kl_weight`` x KL.  Afterwards the latents' mean and
standard deviation over the training frames become the VAE's ``shift_factor`` and
``scaling_factor`` (as FLUX's VAE carries them), so the transformer sees unit-scale latents.

Base: ``FluxTransformer2DModel`` trained from scratch with the flow-matching loss of
:mod:`pipelines.flow_matching` (logit-normal sigma, velocity ``noise - x0``), text embeddings of
the frozen tiny encoders, captions dropped with probability 0.1 (the empty prompt is learned
too).  No references: identities are random, so the base draws *some* character where the
prompt asks, in the prompted scene and size.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .. import flow_matching as L
from .. import flux_inputs as TM
from ..world import data as D
from ..model_presets import WORLD_MAX_SEQUENCE_LENGTH as MAX_SEQUENCE_LENGTH
from ..model_presets import images_to_tensor

__all__ = ["train_vae", "train_base"]


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=2.0)


def _update(loss, module, opt, sched) -> None:
    """One optimizer step with the gradient norm clipped to 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    opt.step()
    sched.step()


def _track(bar, hist: List[float], value: float, stage: str, key: str, step: int,
           log: Optional[Callable], every: int) -> None:
    """Keep the value, show its running mean on the bar, log the mean every ``every`` steps."""
    hist.append(value)
    bar.set_postfix({key: f"{np.mean(hist[-every // 4:]):.4f}"}, refresh=False)
    bar.update(1)
    if log and (step + 1) % every == 0:
        log({"stage": stage, "step": step + 1, key: float(np.mean(hist[-every:]))})


def train_vae(vae, steps: int, batch: int, seed: int, device, lr: float = 1e-3,
              kl_weight: float = 1e-6, n_frames: int = 4096, log: Optional[Callable] = None
              ) -> Dict[str, float]:
    frames = D.make_base_frames(n_frames, seed=seed)
    pix = images_to_tensor([f[0] for f in frames])
    g = torch.Generator().manual_seed(seed)
    vae.to(device).train()
    vae.requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, 50))
    bar = _bar(steps, "vae")
    t0 = time.perf_counter()
    hist: List[float] = []
    for step in range(steps):
        idx = torch.randint(0, len(pix), (batch,), generator=g)
        x = pix[idx].to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        mse = (rec - x).pow(2).mean()
        kl = post.kl().mean() / x[0].numel()
        loss = l1 + mse + kl_weight * kl
        _update(loss, vae, opt, sched)
        _track(bar, hist, float(mse.detach()), "vae", "mse", step, log, every=100)
    bar.close()
    vae.eval().requires_grad_(False)
    # latent statistics -> shift and scale factors
    with torch.no_grad():
        lat = torch.cat([vae.encode(pix[i:i + 256].to(device)).latent_dist.mode()
                         for i in range(0, min(len(pix), 1024), 256)])
        shift, std = float(lat.mean()), float(lat.std())
        vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
        rec = vae.decode(lat[:256]).sample
        mse = float((rec - pix[:256].to(device)).pow(2).mean())
    return {"steps": steps, "batch": batch, "final_mse_train": float(np.mean(hist[-50:])),
            "recon_mse_mode": mse, "shift_factor": shift, "scaling_factor": 1.0 / std,
            "time_s": round(time.perf_counter() - t0, 1)}


def train_base(pipe, steps: int, batch: int, seed: int, device, lr: float = 1e-3,
               n_frames: int = 8192, caption_dropout: float = 0.1,
               log: Optional[Callable] = None) -> Dict[str, float]:
    """Train ``pipe.transformer`` (full weights) in place on world frames."""
    frames = D.make_base_frames(n_frames, seed=seed + 1)
    prompts = [f[1] for f in frames]
    pipe.text_encoder.to(device)
    pipe.text_encoder_2.to(device)
    text = TM.encode_prompts(pipe, prompts + [""], device, MAX_SEQUENCE_LENGTH, batch_size=256)
    emb = torch.stack([text[p][0] for p in prompts]).to(device)
    pooled = torch.stack([text[p][1] for p in prompts]).to(device)
    emb_empty, pooled_empty = (t.to(device) for t in text[""])
    vae = pipe.vae.to(device)
    pix = images_to_tensor([f[0] for f in frames])
    lat = torch.cat([TM.encode_latents(vae, pix[i:i + 256]) for i in range(0, len(pix), 256)])
    packed = TM.pack_latents(lat).to(device)                  # [N, 64, 64]
    hw = lat.shape[-1]
    img_ids = TM.image_ids(hw, hw, device, torch.float32)
    tr = pipe.transformer.to(device).train()
    tr.requires_grad_(True)
    opt = torch.optim.AdamW(tr.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, 100))
    g = torch.Generator().manual_seed(seed + 2)
    bar = _bar(steps, "base")
    t0 = time.perf_counter()
    hist: List[float] = []
    for step in range(steps):
        idx = torch.randint(0, len(packed), (batch,), generator=g)
        x0 = packed[idx]
        noise = torch.randn(x0.shape, generator=g).to(device)
        sigma = L.sample_sigmas(batch, g).to(device)
        xt = L.add_noise(x0, noise, sigma)
        drop = (torch.rand(batch, generator=g) < caption_dropout).to(device)
        e = torch.where(drop[:, None, None], emb_empty.expand_as(emb[idx]), emb[idx])
        p = torch.where(drop[:, None], pooled_empty.expand_as(pooled[idx]), pooled[idx])
        pred = TM.flux_forward(tr, xt, e, p, sigma, img_ids, None)
        loss = L.flow_matching_errors(pred, x0, noise).mean()
        _update(loss, tr, opt, sched)
        _track(bar, hist, float(loss.detach()), "base", "loss", step, log, every=200)
    bar.close()
    tr.eval().requires_grad_(False)
    return {"steps": steps, "batch": batch, "first_loss": float(np.mean(hist[:50])),
            "final_loss": float(np.mean(hist[-100:])),
            "time_s": round(time.perf_counter() - t0, 1)}
