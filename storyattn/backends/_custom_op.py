"""``torch.library`` custom ops behind :func:`storyattn.segment_attention` and
:func:`storyattn.rope.qk_norm_rope`.

Every segment-attention backend with a backward runs through the first two ops, so
autograd sees one formula (saved ``out`` + ``lse``, flash-style backward); every fused q/k
norm + rope kernel runs through the other two (forward only; the cache-writing one mutates
the pool).  ``torch.compile`` sees one opaque op with exact fake shapes instead of tracing
into launchers or data-dependent host code (page-table loops, pool indices).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import get as _get_backend
from ._qk import kernel_args
from .base import QK_NORM_ROPE, QKKernelArgs, QKNormRopeInputs, QKPool, SegmentInputs


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


# ----------------------------------------------------------------------------- qk_norm_rope

def _qk_outputs(out) -> Tuple[Tensor, Tensor]:
    # custom ops return fresh tensors of the fake's layout (contiguous [B, L, H, D])
    q_out, k_out = out
    return q_out.contiguous(), k_out.contiguous()


@torch.library.custom_op("storyattn::qk_norm_rope_fused", mutates_args=())
def qk_norm_rope_fused(q: Tensor, k: Tensor, weight_q: Optional[Tensor],
                       weight_k: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor],
                       eps_q: float, eps_k: float, round_q: bool, round_k: bool, norm_q: bool,
                       norm_k: bool, backend: str) -> Tuple[Tensor, Tensor]:
    be = _get_backend(backend, QK_NORM_ROPE)
    return _qk_outputs(be.kernel(QKKernelArgs(q, k, weight_q, weight_k, eps_q, eps_k, round_q,
                                              round_k, norm_q, norm_k, cos, sin)))


@qk_norm_rope_fused.register_fake
def _(q, k, weight_q, weight_k, cos, sin, eps_q, eps_k, round_q, round_k, norm_q, norm_k,
      backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("storyattn::qk_norm_rope_fused_into_pool",
                         mutates_args=("pool_k", "pool_v"))
def qk_norm_rope_fused_into_pool(
        q: Tensor, k: Tensor, weight_q: Optional[Tensor], weight_k: Optional[Tensor],
        cos: Optional[Tensor], sin: Optional[Tensor], eps_q: float, eps_k: float,
        round_q: bool, round_k: bool, norm_q: bool, norm_k: bool, v: Tensor, pool_k: Tensor,
        pool_v: Tensor, pool_index: Tensor, pool_start: int, pool_cos: Optional[Tensor],
        pool_sin: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    be = _get_backend(backend, QK_NORM_ROPE)
    pool = QKPool(v, pool_k, pool_v, pool_index, None, pool_start, pool_cos, pool_sin)
    return _qk_outputs(be.kernel(QKKernelArgs(q, k, weight_q, weight_k, eps_q, eps_k, round_q,
                                              round_k, norm_q, norm_k, cos, sin, pool)))


@qk_norm_rope_fused_into_pool.register_fake
def _(q, k, weight_q, weight_k, cos, sin, eps_q, eps_k, round_q, round_k, norm_q, norm_k, v,
      pool_k, pool_v, pool_index, pool_start, pool_cos, pool_sin, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def run_qk(be, inputs: QKNormRopeInputs, pool: Optional[QKPool] = None
           ) -> Tuple[Tensor, Tensor]:
    """``(q, k)`` of ``inputs`` on qk_norm_rope backend ``be`` (and the pool written)."""
    if be.module_forward is not None:
        # calls the norm modules themselves (differentiable): runs as it is
        return be.module_forward(inputs, pool)
    a = kernel_args(inputs)
    scalars = (a.eps_q, a.eps_k, a.round_q, a.round_k, a.norm_q, a.norm_k)
    if pool is None:
        return qk_norm_rope_fused(a.q, a.k, a.weight_q, a.weight_k, a.cos, a.sin, *scalars,
                                  be.name)
    return qk_norm_rope_fused_into_pool(a.q, a.k, a.weight_q, a.weight_k, a.cos, a.sin,
                                        *scalars, pool.v, pool.pool_k, pool.pool_v, pool.index,
                                        pool.start, pool.cos, pool.sin, be.name)
