"""``torch.library`` custom ops behind :func:`storyattn.segment_attention`.

Every backend with a backward runs through these two ops, so autograd sees one
formula (saved ``out`` + ``lse``, flash-style backward) and ``torch.compile``
sees one opaque op with exact fake shapes instead of tracing into launchers or
data-dependent host code (page-table loops).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import get as _get_backend
from .base import SegmentInputs


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("storyattn::segment_attn_fwd", mutates_args=())
def segment_attn_fwd(q: Tensor, k: Tensor, v: Tensor, ref_k: Optional[Tensor],
                     ref_v: Optional[Tensor], ref_index: Optional[Tensor], scale: float,
                     backend: str) -> Tuple[Tensor, Tensor]:
    be = _get_backend(backend)
    out, lse = be.forward(SegmentInputs(q, k, v, ref_k, ref_v, ref_index, scale))
    return out.contiguous(), lse.to(_lse_dtype(q)).contiguous()


@segment_attn_fwd.register_fake
def _(q, k, v, ref_k, ref_v, ref_index, scale, backend):
    B, Lq, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty((B, H, Lq), dtype=_lse_dtype(q))


@torch.library.custom_op("storyattn::segment_attn_bwd", mutates_args=())
def segment_attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, ref_k: Optional[Tensor],
                     ref_v: Optional[Tensor], ref_index: Optional[Tensor], out: Tensor,
                     lse: Tensor, scale: float, backend: str) -> List[Tensor]:
    """[dq, dk, dv] and, when there is a pool, dref_k and dref_v."""
    be = _get_backend(backend)
    if be.backward is None:
        raise RuntimeError(f"segment_attention backend {backend!r} is inference-only; "
                           "use backend='torch' or 'triton' for gradients")
    inputs = SegmentInputs(q, k, v, ref_k, ref_v, ref_index, scale)
    grads = be.backward(inputs, dout, out, lse)
    if ref_k is None:  # custom ops cannot return None: the list is shorter instead
        grads = grads[:3]
    return [t.contiguous() for t in grads]


@segment_attn_bwd.register_fake
def _(dout, q, k, v, ref_k, ref_v, ref_index, out, lse, scale, backend):
    e = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    if ref_k is None:
        return [e(q), e(k), e(v)]
    return [e(q), e(k), e(v), e(ref_k), e(ref_v)]


def _setup_context(ctx, inputs, output):
    q, k, v, ref_k, ref_v, ref_index, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, ref_k, ref_v, ref_index, out, lse)
    ctx.scale, ctx.backend, ctx.has_pool = scale, backend, ref_k is not None
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, ref_k, ref_v, ref_index, out, lse = ctx.saved_tensors
    grads = segment_attn_bwd(dout, q, k, v, ref_k, ref_v, ref_index, out, lse,
                             ctx.scale, ctx.backend)
    drk, drv = (grads[3], grads[4]) if ctx.has_pool else (None, None)
    return grads[0], grads[1], grads[2], drk, drv, None, None, None


segment_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def run(be, inputs: SegmentInputs) -> Tuple[Tensor, Tensor]:
    """(out, lse float32) of ``inputs`` on backend ``be``."""
    if inputs.ref_k is not None and inputs.ref_k.shape[0] == 0:  # an empty pool is no pool
        inputs = SegmentInputs(inputs.q, inputs.k, inputs.v, None, None, None, inputs.scale)
    if be.backward is None:
        # Inference-only backends (their check refuses calls that need grad) and
        # backends that bring their own autograd run directly.
        out, lse = be.forward(inputs)
    else:
        i = inputs
        out, lse = segment_attn_fwd(i.q, i.k, i.v, i.ref_k, i.ref_v, i.ref_index, i.scale,
                                    be.name)
    return out, lse.to(torch.float32)
