"""Losses and timestep sampling for ``python -m pipelines.train``.

Flow matching as FLUX uses it (rectified flow, ``sigma`` in [0, 1]):

    x_sigma = (1 - sigma) * x0 + sigma * noise        velocity target v = noise - x0

The transformer receives ``timestep = sigma`` (it multiplies by 1000 itself).
References in the GSA stage sit at ``sigma = 0``, i.e. they are fed clean.

Everything here is a pure function of its tensor arguments (and an explicit
``torch.Generator``), so a training step is a deterministic function of
``(seed, step, process index)`` and a resumed run repeats the uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

TIMESTEP_SCHEMES = ("logit_normal", "uniform")


def sample_sigmas(n: int, generator: torch.Generator, scheme: str = "logit_normal",
                  logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 1.0
                  ) -> torch.Tensor:
    """Draw ``n`` flow-matching noise levels in (0, 1), float32, on the CPU.

    ``logit_normal`` (default, as in SD3/FLUX training): ``sigmoid(N(mean, std))``;
    ``uniform``: U(0, 1).  ``shift`` != 1 applies the resolution shift of the FLUX
    scheduler, ``s * sigma / (1 + (s - 1) * sigma)``, which moves mass to high noise.
    """
    if scheme == "logit_normal":
        u = torch.randn(n, generator=generator, dtype=torch.float32) * logit_std + logit_mean
        sigma = torch.sigmoid(u)
    elif scheme == "uniform":
        sigma = torch.rand(n, generator=generator, dtype=torch.float32)
    else:
        raise ValueError(f"unknown timestep scheme {scheme!r}; choose one of {TIMESTEP_SCHEMES}")
    if shift != 1.0:
        sigma = shift * sigma / (1.0 + (shift - 1.0) * sigma)
    # keep strictly inside (0, 1): sigma = 0 is the references' level, sigma = 1 pure noise
    return sigma.clamp(1e-4, 1.0 - 1e-4)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) x0 + sigma noise`` with ``sigma`` [B] broadcast over the other dims."""
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - s) * x0 + s * noise


def flow_matching_errors(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                         accumulate: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-sample mean squared error of the velocity prediction ``[B]``.

    ``pred``, ``x0``, ``noise``: ``[B, ...]`` (packed FLUX latents ``[B, L, 64]``).
    The mean is taken in ``accumulate`` (DPO uses float64: its margin is a
    difference of nearly equal errors, which float32 sums round away).
    """
    target = (noise - x0).to(accumulate)
    err = F.mse_loss(pred.to(accumulate), target, reduction="none")
    return err.flatten(1).mean(dim=1)


def dpo_loss(e_w: torch.Tensor, e_l: torch.Tensor, e_w_ref: torch.Tensor, e_l_ref: torch.Tensor,
             beta: float) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Flow-matching DPO loss (Diffusion-DPO with velocity errors).

    ``loss = -log sigmoid(-beta / 2 * ((e_w - e_w_ref) - (e_l - e_l_ref)))``, averaged
    over pairs.  ``e_*``: per-pair errors of the policy, ``e_*_ref``: of the frozen
    reference policy (no gradient).  When policy == reference the loss is exactly
    ``log 2``.  Returns ``(loss, stats)``; ``stats`` holds the implicit accuracy
    (fraction of pairs where the policy improved the winner more than the loser)
    and the four mean errors, as Python floats.
    """
    e_w_ref = e_w_ref.detach()
    e_l_ref = e_l_ref.detach()
    margin = (e_w - e_w_ref) - (e_l - e_l_ref)
    logits = -0.5 * beta * margin
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        stats = {
            "implicit_acc": float((margin < 0).float().mean()),
            "err_w": float(e_w.mean()),
            "err_l": float(e_l.mean()),
            "err_w_ref": float(e_w_ref.mean()),
            "err_l_ref": float(e_l_ref.mean()),
            "margin": float(margin.mean()),
        }
    return loss, stats


LOG2 = math.log(2.0)
