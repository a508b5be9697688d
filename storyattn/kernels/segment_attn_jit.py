"""The ``@triton.jit`` kernels of fused segment attention (forward, backward preprocess,
dq, dk/dv); the math, layouts and launchers are in :mod:`storyattn.kernels.segment_attn`.

A module of their own so the launch code stays readable: Triton reads a kernel's globals
when it compiles it, so nothing here may depend on host-side state, and scores stay in
base 2 inside (``exp2``), the lse in natural log outside.
"""
from __future__ import annotations

import triton
import triton.language as tl


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
