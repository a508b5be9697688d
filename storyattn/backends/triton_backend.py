"""``triton`` backend: the fused segment-attention kernels of
``storyattn.kernels.segment_attn`` behind an autograd function.

One forward kernel runs a single online softmax over a target's own keys and
then the pool entries of its page-table row; the backward recomputes the
probabilities from the saved lse (natural log, float32) and accumulates the
pool gradients over every reader without atomics.

triton is imported lazily (inside the functions below), so ``import storyattn``
works without it.  On CPU the kernels run under Triton's interpreter, which
must be switched on with ``TRITON_INTERPRET=1`` *before* the kernel module is
first imported (Triton decides at decoration time).
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional

import torch

from . import Backend, SegmentInputs, register

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256


@lru_cache(maxsize=None)
def _import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # keep the real reason (missing, broken install, ABI mismatch)
        return (f"triton does not import ({type(e).__name__}: {e}); "
                "install with: pip install triton")
    return None


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    from storyattn.kernels import segment_attn
    return segment_attn


def _availability() -> Optional[str]:
    why = _import_error()
    if why is not None:
        return why
    if not torch.cuda.is_available() and not _interpret_env():
        return ("triton kernels need a CUDA device here (none found); set TRITON_INTERPRET=1 "
                "before importing storyattn to run them on CPU (slow)")
    return None


def _check(inputs: SegmentInputs) -> Optional[str]:
    dev = inputs.device.type
    if dev == "cpu":
        if not _interpret_env():
            return (f"triton needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
                    f"got device {inputs.device}")
        # Only reached when availability() passed, so triton imports.
        if not _kernels().interpreted():
            return ("TRITON_INTERPRET=1 was set after storyattn.kernels.segment_attn was "
                    "imported, so its kernels were built for a GPU; set it before the import")
    elif dev != "cuda":
        return (f"triton needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
                f"got device {inputs.device}")
    if inputs.dtype not in _DTYPES:
        return f"triton supports float32/float16/bfloat16, got {inputs.dtype}"
    if inputs.head_dim > _MAX_HEAD_DIM:
        return f"head_dim {inputs.head_dim} > {_MAX_HEAD_DIM}"
    return None


class SegmentAttnFunction(torch.autograd.Function):
    """``(out, lse) = segment attention(q, k, v, ref_k, ref_v; ref_index, scale)``.

    Saves ``out`` and ``lse`` for the backward (FlashAttention style: no
    probabilities are stored).  ``lse`` is returned for merging / inspection
    but is not differentiable.
    """

    @staticmethod
    def forward(ctx, q, k, v, ref_k, ref_v, ref_index, scale):
        out, lse = _kernels().segment_attn_fwd(q, k, v, ref_k, ref_v, ref_index, scale)
        ctx.save_for_backward(q, k, v, ref_k, ref_v, ref_index, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, ref_k, ref_v, ref_index, out, lse = ctx.saved_tensors
        dq, dk, dv, dref_k, dref_v = _kernels().segment_attn_bwd(
            dout, q, k, v, ref_k, ref_v, ref_index, out, lse, ctx.scale)
        if ref_k is not None and dref_k is None:
            # An empty pool (P == 0) still gets a gradient of its own (empty) shape.
            dref_k, dref_v = torch.zeros_like(ref_k), torch.zeros_like(ref_v)
        return dq, dk, dv, dref_k, dref_v, None, None


def forward(inputs: SegmentInputs):
    """``(out [B, Lq, H, D] in q's dtype, lse [B, H, Lq] float32 natural log)``; no autograd.

    The public op wraps this and :func:`backward` in one ``torch.library`` custom
    op (storyattn/_custom_op.py) with its autograd formula; :class:`SegmentAttnFunction`
    is the same pair as a plain autograd function for direct use.
    """
    return _kernels().segment_attn_fwd(inputs.q, inputs.k, inputs.v, inputs.ref_k,
                                       inputs.ref_v, inputs.ref_index, inputs.scale)


def backward(inputs: SegmentInputs, dout, out, lse):
    dq, dk, dv, dref_k, dref_v = _kernels().segment_attn_bwd(
        dout, inputs.q, inputs.k, inputs.v, inputs.ref_k, inputs.ref_v, inputs.ref_index,
        out, lse, inputs.scale)
    if inputs.ref_k is not None and dref_k is None:
        dref_k, dref_v = torch.zeros_like(inputs.ref_k), torch.zeros_like(inputs.ref_v)
    return dq, dk, dv, dref_k, dref_v


register(Backend(
    name="triton",
    forward=forward,
    backward=backward,
    availability=_availability,
    check=_check,
    priority={"cuda": 50, "cpu": 1},
))
