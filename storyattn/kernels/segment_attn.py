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
import triton.language as tl

# log2(e), for the host side.  The kernels write log2(e) and ln(2) as literals:
# a @triton.jit function may only read module globals that are tl.constexpr.
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #
@triton.jit
def _mma(a, b, F32_DOT: tl.constexpr):
    """``a @ b`` accumulated in fp32.

    ``F32_DOT`` multiplies in full fp32 precision.  It is set for fp32 inputs,
    where Triton would otherwise use TF32 on tensor cores (~1e-3 relative error,
    far worse than torch in fp32), and for every dtype under the CPU
    interpreter, whose bf16 ``tl.dot`` returns garbage in Triton 3.x.  Upcasting
    16-bit operands is exact, so it gives what a tensor core computes (exact
    products, fp32 accumulation)."""
    if F32_DOT:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _fwd_segment(acc, m_i, l_i, q, k_base, v_base, stride_kn, n_keys, qk_scale,
                 offs_n, offs_d, d_mask,
                 BLOCK_N: tl.constexpr, F32_DOT: tl.constexpr):
    """Online-softmax update of one query block with the ``n_keys`` keys at
    ``k_base``/``v_base`` (token stride ``stride_kn``, head dim contiguous).

    ``m_i`` is the running row max in base-2 units, ``l_i`` the running sum of
    ``exp2(s - m_i)`` and ``acc`` the unnormalised fp32 output.  Every processed
    block holds at least one valid key, so ``m_i`` becomes finite on the first
    block even though it starts at -inf."""
    for start in range(0, n_keys, BLOCK_N):
        cols = start + offs_n
        col_mask = cols < n_keys
        kv_off = cols[:, None] * stride_kn + offs_d[None, :]
        kv_mask = col_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv_off, mask=kv_mask, other=0.0)
        s = _mma(q, tl.trans(k), F32_DOT) * qk_scale
        s = tl.where(col_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, F32_DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _segment_attn_fwd_kernel(
    Q, K, V, RK, RV, IDX, OUT, LSE,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_rp, stride_rn, stride_rh,
    H, LQ, LK, LR, R, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, F32_DOT: tl.constexpr,
):
    """Forward of segment attention for one (query block, target b, head h).

    Grid: ``(cdiv(Lq, BLOCK_M), B * H)``.  One online-softmax pass runs first
    over the ``LK`` own keys of target ``b`` and then, slot by slot, over the
    ``LR`` keys of each pool entry ``j = IDX[b, r]`` (``j < 0``: skipped).  The
    accumulator, max and sum stay in fp32 registers for the whole pass, so no
    partial output is ever rounded to the input dtype and no merge pass is
    needed.  Writes ``OUT[b, m, h, :]`` (input dtype) and ``LSE[b, h, m]``
    (float32, natural log; -inf for a row with no keys at all).
    ``OUT`` shares ``Q``'s strides, ``V`` shares ``K``'s, ``RV`` shares ``RK``'s.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < LQ

    q_off = tl.cast(b, tl.int64) * stride_qb + h * stride_qh
    q_ptrs = Q + q_off + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    kv_off = tl.cast(b, tl.int64) * stride_kb + h * stride_kh
    acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, K + kv_off, V + kv_off, stride_kn, LK,
                                 qk_scale, offs_n, offs_d, d_mask, BLOCK_N, F32_DOT)
    for r in range(0, R):
        j = tl.load(IDX + b * R + r)
        n_keys = tl.where(j >= 0, LR, 0)
        # j = -1 gives an out-of-range base, but n_keys = 0 so nothing is loaded.
        r_off = tl.cast(j, tl.int64) * stride_rp + h * stride_rh
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, RK + r_off, RV + r_off, stride_rn,
                                     n_keys, qk_scale, offs_n, offs_d, d_mask, BLOCK_N, F32_DOT)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    o_ptrs = OUT + q_off + offs_m[:, None] * stride_qm + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + tl.cast(pid_bh, tl.int64) * LQ + offs_m, lse, mask=m_mask)


@triton.jit
def _segment_attn_bwd_preprocess_kernel(
    OUT, DO, DELTA,
    stride_qb, stride_qm, stride_qh,
    H, LQ,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``DELTA[b, h, m] = sum_d DO[b, m, h, d] * OUT[b, m, h, d]`` in fp32.

    Grid: ``(cdiv(Lq, BLOCK_M), B * H)``.  ``delta_i = sum_j P_ij dP_ij`` is the
    softmax-backward correction ``dS = P * (dP - delta)``; computing it from
    ``OUT`` avoids a second pass over the keys."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < LQ)[:, None] & (offs_d < HEAD_DIM)[None, :]
    off = (tl.cast(b, tl.int64) * stride_qb + h * stride_qh
           + offs_m[:, None] * stride_qm + offs_d[None, :])
    o = tl.load(OUT + off, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + tl.cast(pid_bh, tl.int64) * LQ + offs_m, tl.sum(o * do, 1), mask=offs_m < LQ)


@triton.jit
def _bwd_dq_segment(dq, q, do, lse2, delta, m_mask, k_base, v_base, stride_kn, n_keys,
                    qk_scale, offs_n, offs_d, d_mask,
                    BLOCK_N: tl.constexpr, F32_DOT: tl.constexpr):
    """Adds ``dS @ K`` of one key segment to the fp32 ``dq`` of a query block,
    recomputing ``P = exp2(s - lse2)`` from the saved (base-2) lse."""
    for start in range(0, n_keys, BLOCK_N):
        cols = start + offs_n
        col_mask = cols < n_keys
        kv_off = cols[:, None] * stride_kn + offs_d[None, :]
        kv_mask = col_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv_off, mask=kv_mask, other=0.0)
        s = _mma(q, tl.trans(k), F32_DOT) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(m_mask[:, None] & col_mask[None, :], p, 0.0)
        dp = _mma(do, tl.trans(v), F32_DOT)
        ds = p * (dp - delta[:, None])
        dq += _mma(ds.to(k.dtype), k, F32_DOT)
    return dq


@triton.jit
def _segment_attn_bwd_dq_kernel(
    Q, K, V, RK, RV, IDX, DO, LSE, DELTA, DQ,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_rp, stride_rn, stride_rh,
    H, LQ, LK, LR, R, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, F32_DOT: tl.constexpr,
):
    """``dQ`` of segment attention for one (query block, target b, head h).

    Grid: ``(cdiv(Lq, BLOCK_M), B * H)``.  Walks the same keys as the forward
    (own keys, then the pool entries of row ``b`` of ``IDX``) and accumulates
    ``dQ = scale * sum_keys P * (dO V^T - delta) K`` in fp32 (FlashAttention-2
    style: a query-major pass so ``dQ`` needs no atomics).  ``DO``/``DQ`` share
    ``Q``'s strides; ``LSE``/``DELTA`` are ``[B, H, Lq]`` fp32.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < LQ

    q_off = tl.cast(b, tl.int64) * stride_qb + h * stride_qh
    blk = q_off + offs_m[:, None] * stride_qm + offs_d[None, :]
    blk_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + blk, mask=blk_mask, other=0.0)
    do = tl.load(DO + blk, mask=blk_mask, other=0.0)
    row = tl.cast(pid_bh, tl.int64) * LQ + offs_m
    lse2 = tl.load(LSE + row, mask=m_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=m_mask, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_off = tl.cast(b, tl.int64) * stride_kb + h * stride_kh
    dq = _bwd_dq_segment(dq, q, do, lse2, delta, m_mask, K + kv_off, V + kv_off, stride_kn, LK,
                         qk_scale, offs_n, offs_d, d_mask, BLOCK_N, F32_DOT)
    for r in range(0, R):
        j = tl.load(IDX + b * R + r)
        n_keys = tl.where(j >= 0, LR, 0)
        r_off = tl.cast(j, tl.int64) * stride_rp + h * stride_rh
        dq = _bwd_dq_segment(dq, q, do, lse2, delta, m_mask, RK + r_off, RV + r_off, stride_rn,
                             n_keys, qk_scale, offs_n, offs_d, d_mask, BLOCK_N, F32_DOT)
    tl.store(DQ + blk, (dq * sm_scale).to(DQ.dtype.element_ty), mask=blk_mask)


@triton.jit
def _bwd_kv_reader(dk, dv, k, v, n_mask, q_base, do_base, lse_base, delta_base, stride_qm,
                   n_q, weight, qk_scale, offs_m, offs_d, d_mask,
                   BLOCK_M: tl.constexpr, F32_DOT: tl.constexpr):
    """Adds the contribution of one reader (the ``n_q`` queries of one target and
    head) to the fp32 ``dk``/``dv`` of a key block, in transposed form::

        P^T  = exp2(K q^T * qk_scale - lse2)     [BLOCK_N, BLOCK_M]
        dV  += w * P^T dO
        dK  += w * (P^T * (V dO^T - delta)) q     (times scale by the caller)

    ``weight`` is how many times the reader's page-table row names the entry:
    each copy of a key sees the same probabilities, so the copies' gradients
    are equal and summing them is a multiplication."""
    for start in range(0, n_q, BLOCK_M):
        rows = start + offs_m
        r_mask = rows < n_q
        blk = rows[:, None] * stride_qm + offs_d[None, :]
        blk_mask = r_mask[:, None] & d_mask[None, :]
        q = tl.load(q_base + blk, mask=blk_mask, other=0.0)
        do = tl.load(do_base + blk, mask=blk_mask, other=0.0)
        lse2 = tl.load(lse_base + rows, mask=r_mask, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=r_mask, other=0.0)
        s_t = _mma(k, tl.trans(q), F32_DOT) * qk_scale
        p_t = tl.exp2(s_t - lse2[None, :])
        p_t = tl.where(n_mask[:, None] & r_mask[None, :], p_t, 0.0) * weight
        dv += _mma(p_t.to(do.dtype), do, F32_DOT)
        dp_t = _mma(v, tl.trans(do), F32_DOT)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _mma(ds_t.to(q.dtype), q, F32_DOT)
    return dk, dv


@triton.jit
def _segment_attn_bwd_dkdv_kernel(
    Q, DO, LSE, DELTA, KS, VS, IDX, DK, DV,
    stride_qb, stride_qm, stride_qh,
    stride_sb, stride_sn, stride_sh,
    H, B, LQ, LKV, R, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, IS_POOL: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    """``dK``, ``dV`` of one key segment, key-major (one program owns one key
    block, so no atomics and the result is deterministic).

    Grid: ``(cdiv(LKV, BLOCK_N), S * H)`` where segment ``s`` is

    * ``IS_POOL = False``: the own keys ``KS[s] = k[s]`` of target ``s``
      (``S = B``); its only reader is target ``s``, once.
    * ``IS_POOL = True``: pool entry ``KS[s] = ref_k[s]`` (``S = P``); the kernel
      scans every target's page-table row (``IDX[b, :R]``, padded to
      ``BLOCK_R``) and adds each target that names ``s``, weighted by how many
      times it names it.  The sum over readers stays in fp32 registers.

    ``KS``/``VS``/``DK``/``DV`` are ``[S, LKV, H, D]`` with strides ``stride_s*``;
    ``Q``/``DO`` are ``[B, LQ, H, D]``; ``LSE``/``DELTA`` ``[B, H, LQ]`` fp32.
    """
    pid_n = tl.program_id(0)
    pid_sh = tl.program_id(1)
    s = pid_sh // H
    h = pid_sh % H

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    n_mask = offs_n < LKV

    kv_blk = (tl.cast(s, tl.int64) * stride_sb + h * stride_sh
              + offs_n[:, None] * stride_sn + offs_d[None, :])
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(KS + kv_blk, mask=kv_mask, other=0.0)
    v = tl.load(VS + kv_blk, mask=kv_mask, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if IS_POOL:
        offs_r = tl.arange(0, BLOCK_R)
        for b in range(0, B):
            slots = tl.load(IDX + b * R + offs_r, mask=offs_r < R, other=-1)
            weight = tl.sum(tl.where(slots == s, 1.0, 0.0), 0)
            n_q = tl.where(weight > 0.0, LQ, 0)
            q_off = tl.cast(b, tl.int64) * stride_qb + h * stride_qh
            row_off = tl.cast(b * H + h, tl.int64) * LQ
            dk, dv = _bwd_kv_reader(dk, dv, k, v, n_mask, Q + q_off, DO + q_off, LSE + row_off,
                                    DELTA + row_off, stride_qm, n_q, weight, qk_scale, offs_m,
                                    offs_d, d_mask, BLOCK_M, F32_DOT)
    else:
        q_off = tl.cast(s, tl.int64) * stride_qb + h * stride_qh
        row_off = tl.cast(pid_sh, tl.int64) * LQ
        dk, dv = _bwd_kv_reader(dk, dv, k, v, n_mask, Q + q_off, DO + q_off, LSE + row_off,
                                DELTA + row_off, stride_qm, LQ, 1.0, qk_scale, offs_m,
                                offs_d, d_mask, BLOCK_M, F32_DOT)
    tl.store(DK + kv_blk, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_blk, dv.to(DV.dtype.element_ty), mask=kv_mask)


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
