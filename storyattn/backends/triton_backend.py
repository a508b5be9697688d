"""``triton`` backend: the fused segment-attention kernels of
``storyattn.kernels.segment_attn`` (forward and backward; autograd is the custom op's).

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

from ._qk import fused_reason
from .base import Backend, QKKernelArgs, QKNormRopeBackend, QKNormRopeInputs, SegmentInputs

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


def forward(inputs: SegmentInputs):
    """``(out [B, Lq, H, D] in q's dtype, lse [B, H, Lq] float32 natural log)``; no autograd.

    The public op wraps this and :func:`backward` in one ``torch.library`` custom
    op (storyattn/backends/_custom_op.py) with its autograd formula.
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


SEGMENT_ATTENTION = Backend(
    name="triton",
    forward=forward,
    backward=backward,
    availability=_availability,
    check=_check,
    priority={"cuda": 50, "cpu": 1},
)


# ----------------------------------------------------------------------------- qk_norm_rope

def _qk_availability() -> Optional[str]:
    return _import_error()


def _qk_check(inputs: QKNormRopeInputs) -> Optional[str]:
    # the interpreter switch is read per call (not in the cached availability): it decides
    # where the kernel may run, and tests flip it
    if inputs.device.type != "cuda" and not (inputs.device.type == "cpu" and _interpret_env()):
        return (f"tensors are on {inputs.device}; the triton kernel needs CUDA "
                "(or TRITON_INTERPRET=1 to run it on the CPU, slowly)")
    return fused_reason(inputs, "triton", _MAX_HEAD_DIM)


def _qk_kernel(a: QKKernelArgs):
    from storyattn.kernels.qk_norm_rope import qk_norm_rope_fwd

    pool = {}
    if a.pool is not None:
        p = a.pool
        pool = dict(v=p.v, pool_k=p.pool_k, pool_v=p.pool_v, pool_index=p.index,
                    pool_start=p.start, pool_cos=p.cos, pool_sin=p.sin)
    return qk_norm_rope_fwd(a.q, a.k, a.weight_q, a.weight_k, a.cos, a.sin, (a.eps_q, a.eps_k),
                            round_before_weight=(a.round_q, a.round_k),
                            normalize=(a.norm_q, a.norm_k), **pool)


QK_NORM_ROPE = QKNormRopeBackend(
    name="triton",
    availability=_qk_availability,
    check=_qk_check,
    priority={"cuda": 50},   # on CPU the interpreter is for tests, never the default
    kernel=_qk_kernel,
)

BACKENDS = (SEGMENT_ATTENTION, QK_NORM_ROPE)
