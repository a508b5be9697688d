"""Fused segment attention in Triton: forward and backward.

Target ``b`` attends to the concatenation of its own keys and the pool entries
named by its row of a page table, without building that concatenation::

    K_b = [k_b ; ref_k[j] for j in S_b]      V_b likewise
    out_b = softmax(scale * q_b @ K_b^T) @ V_b
    lse_b = logsumexp(scale * q_b @ K_b^T)   (natural log, float32)

Layouts (all made contiguous by the launchers)::

    q, out, do, dq      [B, Lq, H, D]
    k, v, dk, dv        [B, Lk, H, D]
    ref_k, ref_v, dref  [P, Lr, H, D]
    page table          [B, R] int32, entries in [-1, P); -1 = empty slot
    lse, delta          [B, H, Lq] float32

``S_b`` is the list of non-negative entries of row ``b`` in order; an entry that
appears twice is read twice (its keys really are concatenated twice).  With no
explicit ``ref_index`` the launchers build the table ``0..P-1`` for every row.

Inside the kernels scores are kept in base 2 (``qk * scale * log2(e)``) so the
softmax uses ``exp2``; the lse is converted to natural log when it is stored
and back to base 2 when the backward reads it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch
import triton

# log2(e), for the host side.  The kernels write log2(e) and ln(2) as literals:
# a @triton.jit function may only read module globals that are tl.constexpr.
_LOG2E = 1.4426950408889634


# the kernels themselves: launch code only below
from .segment_attn_jit import (_segment_attn_bwd_dkdv_kernel,  # noqa: E402
                               _segment_attn_bwd_dq_kernel,
                               _segment_attn_bwd_preprocess_kernel, _segment_attn_fwd_kernel)


# --------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------- #
def interpreted() -> bool:
    """True when these kernels were built by Triton's CPU interpreter
    (``TRITON_INTERPRET=1`` was set before this module was imported)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_segment_attn_fwd_kernel, InterpretedFunction)


def _f32_dot(q: torch.Tensor) -> bool:
    return q.dtype == torch.float32 or q.device.type != "cuda"


def _block_d(head_dim: int) -> int:
    # tl.dot needs every dimension >= 16; non-powers of two are padded and masked.
    return max(16, triton.next_power_of_2(head_dim))


def _config(kind: str, q: torch.Tensor, max_len: int) -> dict:
    """Block sizes and launch options for one kernel.

    Under the interpreter every block operation costs python overhead, so the
    block is 16 for short sequences (the CPU tests then still cross several
    blocks) and 64 past 128 tokens (16x fewer steps).  On CUDA the sizes follow
    the usual FlashAttention-2 choices for Hopper/Ampere, shrunk as the head dim
    (and so the tiles held in registers and shared memory) grows; fp32 tiles are
    twice as large in bytes, so fp32 takes the next smaller size.  All of them
    compile for sm_80 and sm_90 within the shared memory of A100/H100."""
    if q.device.type != "cuda":
        blk = 16 if max_len <= 128 else 64
        return dict(BLOCK_M=blk, BLOCK_N=blk, num_warps=1, num_stages=1)
    bd = _block_d(q.shape[-1])
    big = bd * (2 if q.dtype == torch.float32 else 1)
    if kind == "fwd":
        if big <= 64:
            return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
        if big <= 128:
            return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
        if big <= 256:
            return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)
    if kind == "dq":
        if big <= 64:
            return dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3)
        if big <= 128:
            return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
        if big <= 256:
            return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1)
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    # dkdv: the key block is held for the whole pass over the readers' queries.
    if big <= 64:
        return dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3)
    if big <= 128:
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)
    if big <= 256:
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=1)
    return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)


def _page_table(q: torch.Tensor, ref_k: Optional[torch.Tensor],
                ref_index: Optional[torch.Tensor]) -> Tuple[torch.Tensor, int, int]:
    """``(table [B, R] int32, R, P)``.  ``R = 0`` (and a 1-element dummy table)
    when there is no pool; ``ref_index=None`` becomes the table ``0..P-1``."""
    B = q.shape[0]
    P = 0 if ref_k is None else ref_k.shape[0]
    if P == 0 or (ref_index is not None and ref_index.shape[1] == 0):
        return torch.zeros(1, dtype=torch.int32, device=q.device), 0, P
    if ref_index is None:
        table = torch.arange(P, dtype=torch.int32, device=q.device).expand(B, P).contiguous()
    else:
        table = ref_index.to(device=q.device, dtype=torch.int32).contiguous()
    return table, table.shape[1], P


def _strides(t: torch.Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Candidates for STORYATTN_TRITON_AUTOTUNE=1 (CUDA only); configs that do not
# fit a GPU's shared memory are skipped by the autotuner.
_CANDIDATES = {
    "fwd": [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(128, 64, 4, 3), _cfg(64, 64, 4, 3),
            _cfg(128, 32, 4, 3), _cfg(64, 128, 8, 2)],
    "dq": [_cfg(128, 32, 8, 2), _cfg(64, 64, 8, 2), _cfg(128, 64, 8, 2), _cfg(64, 32, 4, 3),
           _cfg(32, 64, 4, 2)],
    "dkdv": [_cfg(32, 64, 4, 2), _cfg(32, 128, 8, 2), _cfg(64, 128, 8, 2), _cfg(64, 64, 4, 2),
             _cfg(16, 64, 4, 3), _cfg(32, 128, 4, 3)],
}
_TUNED: dict = {}


def _autotuned(kernel, kind: str):
    if kind not in _TUNED:
        # Outputs are overwritten, never accumulated, so the benchmark runs
        # need no reset; one tuning per head dim / dtype class / segment kind.
        key = ["HEAD_DIM", "F32_DOT"] + (["IS_POOL"] if kind == "dkdv" else [])
        _TUNED[kind] = triton.autotune(configs=_CANDIDATES[kind], key=key)(kernel)
    return _TUNED[kind]


def _launch(kernel, kind: str, grid, cfg: dict, *args, **kwargs) -> None:
    """``kernel[grid(cfg)](*args, **kwargs, **cfg)``.

    The CUDA sizes in :func:`_config` fit Hopper/Ampere shared memory (up to
    227/163 KB); parts with ~100 KB (consumer Ada/Ampere) reject the largest
    ones with ``OutOfResources``, so retry with one stage and then halved
    blocks.  With ``STORYATTN_TRITON_AUTOTUNE=1`` on CUDA the sizes are instead
    measured once per configuration class by ``triton.autotune``."""
    from triton.runtime.errors import OutOfResources
    if os.environ.get("STORYATTN_TRITON_AUTOTUNE", "0") == "1" and args[0].is_cuda:
        _autotuned(kernel, kind)[grid](*args, **kwargs)
        return
    while True:
        try:
            kernel[grid(cfg)](*args, **kwargs, **cfg)
            return
        except OutOfResources:
            if cfg["num_stages"] > 1:
                cfg = dict(cfg, num_stages=1)
            elif max(cfg["BLOCK_M"], cfg["BLOCK_N"]) > 16:
                cfg = dict(cfg, BLOCK_M=max(16, cfg["BLOCK_M"] // 2),
                           BLOCK_N=max(16, cfg["BLOCK_N"] // 2))
            else:
                raise


def _on_device(t: torch.Tensor):
    # Triton launches on the *current* CUDA device; make it the tensors' one so a
    # call with tensors on cuda:1 does not run on cuda:0.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def segment_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     ref_k: Optional[torch.Tensor], ref_v: Optional[torch.Tensor],
                     ref_index: Optional[torch.Tensor], scale: float
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused segment-attention forward.

    Args: ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]``, ``ref_k, ref_v [P, Lr, H, D]``
    or ``None``, ``ref_index`` ``None`` or int ``[B, R]`` (-1 = empty slot),
    ``scale`` the softmax scale.  Inputs are assumed validated (same device and
    dtype, consistent shapes).  Returns ``out [B, Lq, H, D]`` in q's dtype and
    ``lse [B, H, Lq]`` float32, natural log.
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    table, R, P = _page_table(q, ref_k, ref_index)
    if R > 0:
        ref_k, ref_v = ref_k.contiguous(), ref_v.contiguous()
        rk, rv, Lr = ref_k, ref_v, ref_k.shape[1]
    else:
        # No pool: the kernel never reads RK/RV (R = 0); any valid pointer will do.
        rk, rv, Lr = k, v, 0
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf") if Lk == 0 else 0.0)
    cfg = _config("fwd", q, max(Lq, Lk, Lr))
    with _on_device(q):
        _launch(
            _segment_attn_fwd_kernel, "fwd", lambda c: (triton.cdiv(Lq, c["BLOCK_M"]), B * H),
            cfg,
            q, k, v, rk, rv, table, out, lse,
            *_strides(q), *_strides(k), *_strides(rk),
            H, Lq, Lk, Lr, R, float(scale) * _LOG2E,
            HEAD_DIM=D, BLOCK_D=_block_d(D), F32_DOT=_f32_dot(q))
    return out, lse


def _launch_bwd(q, k, v, rk, rv, table, do, out, lse, dq, dk, dv, dref_k, dref_v,
                R, Lr, has_pool, scale):
    """The four backward launches (delta, dq, own dk/dv, pool dk/dv); outputs are
    written in place."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    bd = _block_d(D)
    ieee = _f32_dot(q)
    qk_scale = float(scale) * _LOG2E
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    pre_m = 16 if q.device.type != "cuda" else 64
    _segment_attn_bwd_preprocess_kernel[(triton.cdiv(Lq, pre_m), B * H)](
        out, do, delta, *_strides(q), H, Lq, HEAD_DIM=D, BLOCK_M=pre_m, BLOCK_D=bd)

    _launch(
        _segment_attn_bwd_dq_kernel, "dq", lambda c: (triton.cdiv(Lq, c["BLOCK_M"]), B * H),
        _config("dq", q, max(Lq, Lk, Lr)),
        q, k, v, rk, rv, table, do, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(rk),
        H, Lq, Lk, Lr, R, qk_scale, float(scale),
        HEAD_DIM=D, BLOCK_D=bd, F32_DOT=ieee)

    cfg = _config("dkdv", q, max(Lq, Lk, Lr))
    if Lk > 0:
        _launch(
            _segment_attn_bwd_dkdv_kernel, "dkdv",
            lambda c: (triton.cdiv(Lk, c["BLOCK_N"]), B * H), cfg,
            q, do, lse, delta, k, v, table, dk, dv,
            *_strides(q), *_strides(k),
            H, B, Lq, Lk, R, qk_scale, float(scale),
            HEAD_DIM=D, BLOCK_D=bd, BLOCK_R=16, IS_POOL=False, F32_DOT=ieee)
    if has_pool:
        if R == 0 or dref_k.shape[1] == 0:
            # The pool exists but no target reads it.
            dref_k.zero_()
            dref_v.zero_()
        else:
            P = dref_k.shape[0]
            _launch(
                _segment_attn_bwd_dkdv_kernel, "dkdv",
                lambda c: (triton.cdiv(Lr, c["BLOCK_N"]), P * H), cfg,
                q, do, lse, delta, rk, rv, table, dref_k, dref_v,
                *_strides(q), *_strides(rk),
                H, B, Lq, Lr, R, qk_scale, float(scale),
                HEAD_DIM=D, BLOCK_D=bd, BLOCK_R=max(16, triton.next_power_of_2(R)),
                IS_POOL=True, F32_DOT=ieee)


def segment_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     ref_k: Optional[torch.Tensor], ref_v: Optional[torch.Tensor],
                     ref_index: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                     scale: float):
    """Fused segment-attention backward.

    Returns ``(dq, dk, dv, dref_k, dref_v)`` in the inputs' dtype; ``dref_*`` are
    ``None`` when there is no pool (``ref_k`` None or ``P == 0``).  A pool entry
    that no target reads gets a zero gradient; an entry read ``n`` times by a
    target gets that target's contribution ``n`` times.  Deterministic: every
    output element is written by exactly one program, no atomics.
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # tl.dot needs both operands in one dtype; an upstream cast could hand us a
    # float32 gradient for a bf16 output.
    do = do.to(q.dtype).contiguous()
    out, lse = out.contiguous(), lse.contiguous()
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    table, R, P = _page_table(q, ref_k, ref_index)
    has_pool = ref_k is not None and P > 0
    if has_pool:
        ref_k, ref_v = ref_k.contiguous(), ref_v.contiguous()
    if R > 0:
        rk, rv, Lr = ref_k, ref_v, ref_k.shape[1]
    else:
        rk, rv, Lr = k, v, 0

    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dref_k = torch.empty_like(ref_k) if has_pool else None
    dref_v = torch.empty_like(ref_v) if has_pool else None
    if q.numel() == 0:
        # No queries: nothing depends on any key.
        for t in (dk, dv, dref_k, dref_v):
            if t is not None:
                t.zero_()
        return dq, dk, dv, dref_k, dref_v

    with _on_device(q):
        _launch_bwd(q, k, v, rk, rv, table, do, out, lse, dq, dk, dv, dref_k, dref_v,
                    R, Lr, has_pool, scale)
    return dq, dk, dv, dref_k, dref_v


__all__ = ["segment_attn_fwd", "segment_attn_bwd", "interpreted"]
