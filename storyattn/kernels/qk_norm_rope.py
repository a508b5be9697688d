"""Fused q/k RMSNorm + rotary embedding (FLUX attention), with an optional write of
the rotated keys and the values into a reference K/V pool.

Launch code only: this module imports torch and triton, never ``storyattn`` or
diffusers. The public entry points (module handling, backend choice, torch
fallback) live in ``storyattn.rope``.

Math, per token ``(b, l)`` and head ``h``, for ``x`` = one row ``q[b, l, h, :]`` or
``k[b, l, h, :]`` of head dim ``D`` (even):

    n      = x / sqrt(mean(x**2) + eps) * w          (fp32, RMSNorm)
    n      = round_to_io_dtype(n)                    (diffusers' norm output)
    y[2i]   = n[2i]   * cos[l, 2i]   - n[2i+1] * sin[l, 2i]      (fp32)
    y[2i+1] = n[2i+1] * cos[l, 2i+1] + n[2i]   * sin[l, 2i+1]
    out    = round_to_io_dtype(y)

which is ``torch.nn.RMSNorm`` followed by diffusers' ``apply_rotary_emb(...,
use_real=True, use_real_unbind_dim=-1, sequence_dim=1)``: adjacent pairs
``(x[2i], x[2i+1])`` are rotated, the norm is computed in fp32 and rounded to the
input dtype once, and the rotation is computed in fp32 from that rounded value.

Pool write (optional), for every row ``b`` with ``pool_index[b] >= 0`` and every
token ``l >= pool_start``:

    pool_k[pool_index[b], l - pool_start, h, :] = round(R_b(out_k[b, l, h, :]))
    pool_v[pool_index[b], l - pool_start, h, :] = v[b, l, h, :]

where ``R_b`` is an extra rotation by ``(pool_cos[b], pool_sin[b])`` (same pairing,
fp32, from the already rounded key) or the identity when no extra rotation is
given. This places a reference's keys at another rotary position without a
second pass over them.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _round_to_io(x, IO_DTYPE: tl.constexpr):
    """Round fp32 ``x`` to the nearest ``IO_DTYPE`` value (ties to even), kept in fp32.

    bf16 is rounded by hand: the CPU interpreter truncates fp32 -> bf16 casts
    while GPUs and torch round to nearest even, and the integer trick below gives
    torch's result on both. NaN passes through unchanged.
    """
    if IO_DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        lsb = (bits >> 16) & 1
        r = ((bits + 0x7FFF + lsb) & -65536).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, r)
    else:
        return x.to(IO_DTYPE).to(tl.float32)


@triton.jit
def _rms_norm_rows(x, w_ptr, offs_d, eps, D: tl.constexpr, HAS_W: tl.constexpr,
                   ROUND_BEFORE_W: tl.constexpr, IO_DTYPE: tl.constexpr):
    """RMSNorm of a [BLOCK_H, BLOCK_D] fp32 tile (padding columns are zero)."""
    var = tl.sum(x * x, axis=1) / D
    # IEEE sqrt and division: the approximate GPU versions drift by an ulp from
    # torch's fp32 rsqrt often enough to flip bf16 roundings.
    inv = tl.div_rn(tl.full(var.shape, 1.0, tl.float32), tl.sqrt_rn(var + eps))
    y = x * inv[:, None]
    if HAS_W:
        w = tl.load(w_ptr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
        if ROUND_BEFORE_W:
            # diffusers' own RMSNorm casts to the (half) weight dtype before the
            # multiply, so the product sees an already rounded value.
            y = _round_to_io(y, IO_DTYPE)
        y = y * w[None, :]
    # The norm's output is a tensor of the input dtype in diffusers; the rotation
    # then starts from that rounded value.
    return _round_to_io(y, IO_DTYPE)


@triton.jit
def _rotate_pairs(x, cos_e, cos_o, sin_e, sin_o, BLOCK_H: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Rotate adjacent pairs of a [BLOCK_H, BLOCK_D] fp32 tile.

    ``cos_e``/``sin_e`` hold the even columns of cos/sin, ``cos_o``/``sin_o`` the odd
    ones, each [1, BLOCK_D // 2]; even and odd columns keep their own factor so any
    (cos, sin), not only repeat-interleaved ones, gives diffusers' result.
    """
    xe, xo = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_D // 2, 2)))
    ye = xe * cos_e - xo * sin_e
    yo = xo * cos_o + xe * sin_o
    return tl.reshape(tl.join(ye, yo), (BLOCK_H, BLOCK_D))


@triton.jit
def _load_pairs(ptr, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load one [D] fp32 row and split it into even/odd columns, each [1, BLOCK_D//2]."""
    row = tl.load(ptr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    e, o = tl.split(tl.reshape(row, (BLOCK_D // 2, 2)))
    return e[None, :], o[None, :]


@triton.jit
def _qk_norm_rope_fwd_kernel(
    Q, K, V, QO, KO, WQ, WK, COS, SIN,
    POOL_K, POOL_V, POOL_IDX, PCOS, PSIN,
    L, H, pool_start,
    s_qb, s_ql, s_qh,
    s_kb, s_kl, s_kh,
    s_vb, s_vl, s_vh,
    s_ob, s_ol, s_oh,
    s_cl, s_sl,
    s_pkp, s_pkl, s_pkh,
    s_pvp, s_pvl, s_pvh,
    s_pcb, s_psb,
    eps_q, eps_k,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    NORM_Q: tl.constexpr, NORM_K: tl.constexpr,
    HAS_WQ: tl.constexpr, HAS_WK: tl.constexpr,
    ROUND_Q: tl.constexpr, ROUND_K: tl.constexpr,
    HAS_ROPE: tl.constexpr, WRITE_POOL: tl.constexpr, HAS_V: tl.constexpr,
    HAS_POOL_ROT: tl.constexpr,
):
    """q/k RMSNorm + RoPE for BLOCK_H heads of one token, q and k in one program.

    Layout: q, k, v are [B, L, H, D] with unit stride on D (any other strides);
    q_out, k_out share the strides ``s_o*``; cos, sin are [L, D]; the weights are
    [D]; pool_k, pool_v are [P, L - pool_start, H, D]; pool_idx is int64 [B];
    pool cos/sin are [B, D]. Grid: (B * L, cdiv(H, BLOCK_H)). Math: module
    docstring.
    """
    pid_t = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    b = pid_t // L
    l = pid_t % L

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < H)[:, None] & (offs_d < D)[None, :]
    io_dtype = QO.dtype.element_ty

    if HAS_ROPE:
        cos_e, cos_o = _load_pairs(COS + l * s_cl, offs_d, D, BLOCK_D)
        sin_e, sin_o = _load_pairs(SIN + l * s_sl, offs_d, D, BLOCK_D)

    # q
    q_ptrs = Q + b * s_qb + l * s_ql + offs_h[:, None] * s_qh + offs_d[None, :]
    x = tl.load(q_ptrs, mask=mask, other=0.0).to(tl.float32)
    if NORM_Q:
        y = _rms_norm_rows(x, WQ, offs_d, eps_q, D, HAS_WQ, ROUND_Q, io_dtype)
    else:
        y = x
    if HAS_ROPE:
        y = _rotate_pairs(y, cos_e, cos_o, sin_e, sin_o, BLOCK_H, BLOCK_D)
    o_off = b * s_ob + l * s_ol + offs_h[:, None] * s_oh + offs_d[None, :]
    tl.store(QO + o_off, _round_to_io(y, io_dtype).to(io_dtype), mask=mask)

    # k
    k_ptrs = K + b * s_kb + l * s_kl + offs_h[:, None] * s_kh + offs_d[None, :]
    x = tl.load(k_ptrs, mask=mask, other=0.0).to(tl.float32)
    if NORM_K:
        y = _rms_norm_rows(x, WK, offs_d, eps_k, D, HAS_WK, ROUND_K, io_dtype)
    else:
        y = x
    if HAS_ROPE:
        y = _rotate_pairs(y, cos_e, cos_o, sin_e, sin_o, BLOCK_H, BLOCK_D)
    y = _round_to_io(y, io_dtype)
    tl.store(KO + o_off, y.to(io_dtype), mask=mask)

    if WRITE_POOL:
        entry = tl.load(POOL_IDX + b)
        if (entry >= 0) & (l >= pool_start):
            lp = l - pool_start
            yk = y
            if HAS_POOL_ROT:
                # Rotate the key exactly as stored in k_out (already rounded), so
                # the pool equals rotate_keys(k_out) rather than a fused angle.
                pc_e, pc_o = _load_pairs(PCOS + b * s_pcb, offs_d, D, BLOCK_D)
                ps_e, ps_o = _load_pairs(PSIN + b * s_psb, offs_d, D, BLOCK_D)
                yk = _round_to_io(_rotate_pairs(y, pc_e, pc_o, ps_e, ps_o,
                                                BLOCK_H, BLOCK_D), io_dtype)
            pk_ptrs = (POOL_K + entry * s_pkp + lp * s_pkl
                       + offs_h[:, None] * s_pkh + offs_d[None, :])
            tl.store(pk_ptrs, yk.to(io_dtype), mask=mask)
            if HAS_V:
                v_ptrs = V + b * s_vb + l * s_vl + offs_h[:, None] * s_vh + offs_d[None, :]
                vv = tl.load(v_ptrs, mask=mask, other=0.0)
                pv_ptrs = (POOL_V + entry * s_pvp + lp * s_pvl
                           + offs_h[:, None] * s_pvh + offs_d[None, :])
                tl.store(pv_ptrs, vv, mask=mask)


def _pair(value, name):
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be one value or a pair (for q, for k); got {value!r}")
        return value[0], value[1]
    return value, value


def _block_sizes(num_heads: int, head_dim: int) -> Tuple[int, int]:
    block_d = max(2, triton.next_power_of_2(head_dim))
    # Keep a tile near 4K fp32 values (about 32 registers per thread at 4 warps)
    # and prefer a head block that divides H, so no program runs half empty
    # (FLUX has 24 heads: 8 per program rather than 16 + 8 padded).
    cap = max(1, 4096 // block_d)
    block_h = 1
    while block_h * 2 <= min(cap, num_heads) and num_heads % (block_h * 2) == 0:
        block_h *= 2
    if block_h == 1 and num_heads > 1:
        block_h = min(cap, triton.next_power_of_2(num_heads))
    return block_h, block_d


def _check_row_tensor(t, name, shape, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")


def qk_norm_rope_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    weight_q: Optional[torch.Tensor],
    weight_k: Optional[torch.Tensor],
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    eps: Union[float, Tuple[float, float]] = 1e-6,
    *,
    round_before_weight: Union[bool, Tuple[bool, bool]] = False,
    normalize: Union[bool, Tuple[bool, bool]] = True,
    v: Optional[torch.Tensor] = None,
    pool_k: Optional[torch.Tensor] = None,
    pool_v: Optional[torch.Tensor] = None,
    pool_index: Optional[torch.Tensor] = None,
    pool_start: int = 0,
    pool_cos: Optional[torch.Tensor] = None,
    pool_sin: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused q/k RMSNorm + RoPE kernel; returns new ``(q_out, k_out)``.

    Args:
        q, k: ``[B, L, H, D]``, fp32/fp16/bf16, same shape, dtype and device; unit
            stride on D (other strides are free, e.g. slices of a fused qkv).
        weight_q, weight_k: ``[D]`` RMSNorm weights (any float dtype, used in fp32)
            or ``None`` for a norm without weight.
        cos, sin: ``[L, D]`` rotation factors (diffusers' ``image_rotary_emb``), or
            both ``None`` to skip the rotation.
        eps: RMSNorm epsilon, one float or a pair ``(eps_q, eps_k)``.
        round_before_weight: round the normalised value to the io dtype before the
            weight multiply (diffusers' own ``RMSNorm`` with a half weight) instead
            of after it (``torch.nn.RMSNorm``); one bool or a pair.
        normalize: ``False`` skips the RMSNorm (weight and eps then unused) of q,
            k, or both when given a pair; the rotation still runs.
        v: ``[B, L, H, D]`` values copied to ``pool_v`` (same dtype as k).
        pool_k, pool_v: ``[P, L - pool_start, H, D]`` preallocated pools (dtype of k,
            unit stride on D), written in place. ``pool_v`` iff ``v``.
        pool_index: int ``[B]``: pool entry for each row, ``-1`` = do not write.
            Entries must be distinct.
        pool_start: first token of each row that goes to the pool (e.g. the text
            length, to keep only image tokens).
        pool_cos, pool_sin: ``[B, D]`` extra rotation of row b's pooled keys, or
            ``None`` to pool them as returned.

    The whole pool write happens in the same pass that produces ``k_out``.
    """
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise TypeError("q and k must be tensors")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, L, H, D], got shape {tuple(q.shape)}")
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q dtype {q.dtype} not supported by the triton kernel "
                        f"(use one of {SUPPORTED_DTYPES})")
    if k.dtype != q.dtype:
        raise TypeError(f"k dtype {k.dtype} differs from q dtype {q.dtype}")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}")
    B, L, H, D = q.shape
    if D % 2 != 0 or D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D = {D} must be even and at most {MAX_HEAD_DIM}")
    device = q.device
    eps_q, eps_k = (float(e) for e in _pair(eps, "eps"))
    round_q, round_k = (bool(r) for r in _pair(round_before_weight, "round_before_weight"))
    norm_q, norm_k = (bool(n) for n in _pair(normalize, "normalize"))

    for w, name in ((weight_q, "weight_q"), (weight_k, "weight_k")):
        if w is not None:
            _check_row_tensor(w, name, (D,), device)
    weight_q = weight_q.contiguous() if weight_q is not None else None
    weight_k = weight_k.contiguous() if weight_k is not None else None

    has_rope = cos is not None or sin is not None
    if has_rope:
        if cos is None or sin is None:
            raise ValueError("cos and sin must be given together")
        _check_row_tensor(cos, "cos", (L, D), device)
        _check_row_tensor(sin, "sin", (L, D), device)
        cos = cos.to(torch.float32).contiguous()
        sin = sin.to(torch.float32).contiguous()

    # The kernel addresses D with unit stride; copying here is cheaper than a
    # strided gather in every program.
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    q_out = torch.empty((B, L, H, D), device=device, dtype=q.dtype)
    k_out = torch.empty((B, L, H, D), device=device, dtype=q.dtype)

    write_pool = pool_k is not None
    has_v = v is not None
    has_pool_rot = False
    if write_pool:
        if not isinstance(pool_k, torch.Tensor) or pool_k.dim() != 4:
            raise ValueError("pool_k must be a [P, Lr, H, D] tensor, got "
                             f"{getattr(pool_k, 'shape', type(pool_k).__name__)}")
        if not 0 <= int(pool_start) <= L:
            raise ValueError(f"pool_start = {pool_start} must lie in [0, L = {L}]")
        pool_start = int(pool_start)
        P = pool_k.shape[0]
        want = (P, L - pool_start, H, D)
        if tuple(pool_k.shape) != want:
            raise ValueError(f"pool_k must have shape [P, L - pool_start, H, D] = {want}, "
                             f"got {tuple(pool_k.shape)}")
        if pool_k.dtype != k.dtype or pool_k.device != device:
            raise TypeError(f"pool_k ({pool_k.dtype}, {pool_k.device}) must match k "
                            f"({k.dtype}, {device})")
        if pool_k.stride(-1) != 1:
            raise ValueError("pool_k must have unit stride on its last dim (it is written in place)")
        if has_v != (pool_v is not None):
            raise ValueError("v and pool_v must be given together")
        if has_v:
            if tuple(v.shape) != (B, L, H, D):
                raise ValueError(f"v must have shape {(B, L, H, D)}, got {tuple(v.shape)}")
            if v.dtype != k.dtype or v.device != device:
                raise TypeError(f"v ({v.dtype}, {v.device}) must match k ({k.dtype}, {device})")
            if tuple(pool_v.shape) != want:
                raise ValueError(f"pool_v must have shape {want}, got {tuple(pool_v.shape)}")
            if pool_v.dtype != k.dtype or pool_v.device != device:
                raise TypeError(f"pool_v ({pool_v.dtype}, {pool_v.device}) must match k "
                                f"({k.dtype}, {device})")
            if pool_v.stride(-1) != 1:
                raise ValueError("pool_v must have unit stride on its last dim")
            v = v if v.stride(-1) == 1 else v.contiguous()
        if not isinstance(pool_index, torch.Tensor):
            raise TypeError("pool_index must be an int tensor [B] when pool_k is given")
        if tuple(pool_index.shape) != (B,) or pool_index.is_floating_point():
            raise ValueError(f"pool_index must be an int tensor of shape ({B},), got "
                             f"{pool_index.dtype} {tuple(pool_index.shape)}")
        idx_host = pool_index.detach().to("cpu", torch.int64)
        if B and (int(idx_host.min()) < -1 or int(idx_host.max()) >= P):
            raise ValueError(f"pool_index values must lie in [-1, P = {P}), got {idx_host.tolist()}")
        used = idx_host[idx_host >= 0]
        if used.numel() != used.unique().numel():
            raise ValueError(f"pool_index has duplicate entries: {idx_host.tolist()}")
        pool_index = pool_index.to(device=device, dtype=torch.int64).contiguous()
        if (pool_cos is None) != (pool_sin is None):
            raise ValueError("pool_cos and pool_sin must be given together")
        has_pool_rot = pool_cos is not None
        if has_pool_rot:
            _check_row_tensor(pool_cos, "pool_cos", (B, D), device)
            _check_row_tensor(pool_sin, "pool_sin", (B, D), device)
            pool_cos = pool_cos.to(torch.float32).contiguous()
            pool_sin = pool_sin.to(torch.float32).contiguous()
    elif any(t is not None for t in (v, pool_v, pool_index, pool_cos, pool_sin)):
        raise ValueError("v, pool_v, pool_index, pool_cos and pool_sin need pool_k")

    if q.numel() == 0:
        return q_out, k_out

    # Unused pointer arguments still need a tensor; strides of a dummy are never read.
    dummy = q_out
    v_arg = v if has_v else dummy
    pk = pool_k if write_pool else dummy
    pv = pool_v if has_v else dummy
    pidx = pool_index if write_pool else dummy
    pcos = pool_cos if has_pool_rot else dummy
    psin = pool_sin if has_pool_rot else dummy
    c = cos if has_rope else dummy
    s = sin if has_rope else dummy

    block_h, block_d = _block_sizes(H, D)
    grid = (B * L, triton.cdiv(H, block_h))
    _qk_norm_rope_fwd_kernel[grid](
        q, k, v_arg, q_out, k_out,
        weight_q if weight_q is not None else dummy,
        weight_k if weight_k is not None else dummy,
        c, s, pk, pv, pidx, pcos, psin,
        L, H, pool_start if write_pool else 0,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v_arg.stride(0), v_arg.stride(1), v_arg.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        c.stride(0), s.stride(0),
        pk.stride(0), pk.stride(1), pk.stride(2),
        pv.stride(0), pv.stride(1), pv.stride(2),
        pcos.stride(0), psin.stride(0),
        eps_q, eps_k,
        D=D, BLOCK_D=block_d, BLOCK_H=block_h,
        NORM_Q=norm_q, NORM_K=norm_k,
        HAS_WQ=norm_q and weight_q is not None, HAS_WK=norm_k and weight_k is not None,
        ROUND_Q=round_q, ROUND_K=round_k,
        HAS_ROPE=has_rope, WRITE_POOL=write_pool, HAS_V=has_v,
        HAS_POOL_ROT=has_pool_rot,
        num_warps=4 if block_h * block_d >= 1024 else 2,
    )
    return q_out, k_out
