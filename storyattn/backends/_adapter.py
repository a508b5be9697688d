"""Shared glue for the inference-only adapters (flash-attn, xformers).

Such a library gives single-segment attention with its lse; the segments are
merged here with :func:`storyattn.api.merge_states`.
"""
from __future__ import annotations

import importlib

import torch

from ._merge import merge_states
from .base import SegmentInputs
from .torch_backend import pool_forward


def split_merge_forward(inputs: SegmentInputs, fwd):
    out, lse = fwd(inputs.q, inputs.k, inputs.v, inputs.scale)
    if inputs.ref_k is not None:
        po, pl = pool_forward(inputs.q, inputs.ref_k, inputs.ref_v, inputs.ref_index,
                              inputs.scale, fwd=fwd)
        out, lse = merge_states(out, lse, po, pl)
    return out.to(inputs.q.dtype), lse.to(torch.float32)


def common_check(inputs: SegmentInputs, name: str, max_head_dim: int):
    if inputs.device.type != "cuda":
        return f"{name} needs CUDA tensors, got device {inputs.device}"
    if inputs.dtype not in (torch.float16, torch.bfloat16):
        return f"{name} supports float16/bfloat16, got {inputs.dtype}"
    if inputs.head_dim > max_head_dim:
        return f"{name} supports head_dim <= {max_head_dim}, got {inputs.head_dim}"
    if inputs.needs_grad:
        return (f"the {name} adapter is inference-only (no backward through merged lse); "
                "use backend='triton' or 'torch' for training")
    return None


def guarded_import(module: str, attr: str, install_hint: str):
    """``(object, None)`` when ``module.attr`` imports, else ``(None, reason)`` keeping
    the real error (missing package, CUDA/ABI mismatch) and how to install it."""
    try:
        return getattr(importlib.import_module(module), attr), None
    except Exception as e:
        return None, f"{module.split('.')[0]} does not import ({type(e).__name__}: {e}); " \
                     f"install with: {install_hint}"
