"""What every q/k norm + rope backend shares: the rotation formula (the torch backend's
math, and :func:`storyattn.rope.rotate_keys`'), how a norm module becomes a fused kernel's
weight and flags, and what any fused kernel needs of its inputs."""
from __future__ import annotations

from typing import Optional

import torch

from .base import QKKernelArgs, QKNormRopeInputs, QKPool

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rotate_half_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x[2i], x[2i+1]) -> (-x[2i+1], x[2i]) on the last dim (FLUX pairing)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)`` formula.

    ``cos``/``sin`` must already broadcast against ``x``. The products run in fp32
    (``x.float()``) and the result is cast back to ``x.dtype``, as diffusers does,
    so a bf16 input is rounded exactly once by the rotation.
    """
    return (x.float() * cos + rotate_half_pairs(x).float() * sin).to(x.dtype)


def is_diffusers_rmsnorm(norm) -> bool:
    cls = type(norm)
    return cls.__name__ == "RMSNorm" and cls.__module__.startswith("diffusers.")


def norm_params(norm, dtype: torch.dtype):
    """``(weight, eps, round_before_weight)`` that make a kernel equal ``norm``, None for
    no norm, or a string saying why no kernel can reproduce it."""
    if norm is None:
        return None
    if isinstance(norm, torch.nn.RMSNorm):
        # torch: fp32 normalise, multiply by the weight in fp32, one cast back.
        eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        return norm.weight, float(eps), False
    if is_diffusers_rmsnorm(norm):
        weight = norm.weight
        if getattr(norm, "bias", None) is not None:
            return "diffusers RMSNorm with a bias"
        if weight is None or (weight.dtype == dtype == torch.float32):
            return weight, float(norm.eps), False
        if weight.dtype == dtype and dtype in (torch.float16, torch.bfloat16):
            # diffusers casts the normalised value to the half weight dtype first.
            return weight, float(norm.eps), True
        return (f"diffusers RMSNorm with a {weight.dtype} weight changes a {dtype} input's "
                "dtype; only the torch backend reproduces that")
    return f"norm module {type(norm).__name__} (only torch.nn.RMSNorm and diffusers RMSNorm)"


def fused_reason(inputs: QKNormRopeInputs, kernel: str, max_head_dim: int) -> Optional[str]:
    """What every fused kernel (triton, cuda) needs: a supported dtype and head dim, norms
    it can reproduce, on q's device, and no gradients."""
    q = inputs.q
    if q.dtype not in FUSED_DTYPES:
        return f"dtype {q.dtype} (supported: float32, float16, bfloat16)"
    if q.shape[-1] > max_head_dim:
        return f"head dim {q.shape[-1]} > {max_head_dim}"
    for norm, name in ((inputs.norm_q, "norm_q"), (inputs.norm_k, "norm_k")):
        p = norm_params(norm, q.dtype)
        if isinstance(p, str):
            return f"{name}: {p}"
        if p is not None and p[0] is not None and p[0].device != q.device:
            return f"{name} weight is on {p[0].device} but q is on {q.device}"
    if inputs.needs_grad:
        return (f"gradients are required and the {kernel} kernel is forward only; use "
                "backend='torch' or run under torch.no_grad()")
    return None


def kernel_args(inputs: QKNormRopeInputs, pool: Optional[QKPool] = None) -> QKKernelArgs:
    """The norm modules as a kernel's weights and flags (only called once a fused backend's
    check passed, so both norms are reproducible)."""
    params = []
    for norm in (inputs.norm_q, inputs.norm_k):
        p = norm_params(norm, inputs.dtype)
        if p is None:  # no norm: the kernel skips it (weight and eps unused)
            params.append((None, 0.0, False, False))
        else:
            w, eps, rnd = p
            params.append((w.detach() if w is not None else None, eps, rnd, True))
    (wq, eq, rq, nq), (wk, ek, rk, nk) = params
    cos, sin = inputs.rotary if inputs.rotary is not None else (None, None)
    return QKKernelArgs(inputs.q, inputs.k, wq, wk, eq, ek, rq, rk, nq, nk, cos, sin, pool)
