"""Single-segment attention forward/backward that expose the log-sum-exp.

These are the building blocks of the split + merge path: attention of queries
over ONE contiguous key segment, returning ``(out, lse)``, and the matching
backward that takes an *externally supplied* ``(out, lse)``.  Feeding the merged
``out``/``lse`` of all segments into each segment's backward gives that
segment's exact share of the gradient, because a flash-style backward only uses
``rowsum(dO * O)`` and ``exp(s - lse)``.

Layout: ``[B, L, H, D]``; lse ``[B, H, Lq]`` in float32 (float64 for float64
inputs, so float64 references stay exact).
"""
from __future__ import annotations

import warnings

import torch

_aten = torch.ops.aten
_CHUNK_ELEMS = 1 << 26  # score elements materialised at once by the math path


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------- math path
def _math_fwd(q, k, v, scale):
    acc = lse_dtype(q.dtype)
    B, Lq, H, D = q.shape
    qh = q.transpose(1, 2).to(acc)        # [B, H, Lq, D]
    kh = k.transpose(1, 2).to(acc)
    vh = v.transpose(1, 2).to(acc)
    out = torch.empty(B, H, Lq, D, dtype=acc, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=acc, device=q.device)
    step = max(1, _CHUNK_ELEMS // max(1, B * H * k.shape[1]))
    for s0 in range(0, Lq, step):
        s = torch.matmul(qh[:, :, s0:s0 + step], kh.transpose(-1, -2)) * scale
        l = torch.logsumexp(s, dim=-1)
        lse[:, :, s0:s0 + step] = l
        out[:, :, s0:s0 + step] = torch.matmul(torch.exp(s - l.unsqueeze(-1)), vh)
    return out.transpose(1, 2).to(q.dtype), lse


def _math_bwd(do, q, k, v, out, lse, scale):
    acc = lse_dtype(q.dtype)
    B, Lq, H, D = q.shape
    qh, kh, vh = (t.transpose(1, 2).to(acc) for t in (q, k, v))
    doh, oh = do.transpose(1, 2).to(acc), out.transpose(1, 2).to(acc)
    delta = (doh * oh).sum(-1)                      # [B, H, Lq]
    dq = torch.empty_like(qh)
    dk = torch.zeros_like(kh)
    dv = torch.zeros_like(vh)
    step = max(1, _CHUNK_ELEMS // max(1, B * H * k.shape[1]))
    for s0 in range(0, Lq, step):
        sl = slice(s0, s0 + step)
        s = torch.matmul(qh[:, :, sl], kh.transpose(-1, -2)) * scale
        p = torch.exp(s - lse[:, :, sl].to(acc).unsqueeze(-1))
        dp = torch.matmul(doh[:, :, sl], vh.transpose(-1, -2))
        ds = p * (dp - delta[:, :, sl].unsqueeze(-1)) * scale
        dq[:, :, sl] = torch.matmul(ds, kh)
        dk += torch.matmul(ds.transpose(-1, -2), qh[:, :, sl])
        dv += torch.matmul(p.transpose(-1, -2), doh[:, :, sl])
    back = lambda t, like: t.transpose(1, 2).to(like.dtype)  # noqa: E731
    return back(dq, q), back(dk, k), back(dv, v)


# ------------------------------------------------------------------ CPU path
def _cpu_fwd(q, k, v, scale):
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2), lse.to(lse_dtype(q.dtype))


def _cpu_bwd(do, q, k, v, out, lse, scale):
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    # The CPU kernel wants lse in the dtype its own forward produced.
    lse_in = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()
    dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        t(do).contiguous(), t(q), t(k), t(v), t(out).contiguous(), lse_in, 0.0, False,
        scale=scale)
    return t(dq), t(dk), t(dv)


# ----------------------------------------------------------------- CUDA path
_warned = set()


def _warn_once(key, msg):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def vector_ready(t):
    """``t`` itself when fused CUDA kernels may read it with 16-byte vector loads (head dim
    contiguous, other strides multiples of 8 elements, 16-byte aligned data), else an
    aligned contiguous copy.  A view that starts mid-row (q sliced out of a fused qkv
    projection) is 2-byte aligned: torch's flash kernels, called directly below, do not
    check that and fault with "misaligned address" (seen on an H200); csrc's kernels need
    the same."""
    if t is None:
        return None
    if (t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:-1])
            and t.data_ptr() % 16 == 0):
        return t
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _cuda_flash_ok(q):
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0


def _cuda_fwd(q, k, v, scale):
    if _cuda_flash_ok(q):
        q, k, v = vector_ready(q), vector_ready(k), vector_ready(v)
        try:
            res = _aten._scaled_dot_product_flash_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, False,
                scale=scale)
            return res[0].transpose(1, 2), res[1].float()
        except RuntimeError as e:  # e.g. an architecture the flash kernels were not built for
            _warn_once("flash-fwd", f"torch flash attention unavailable ({e}); using math path")
    return _math_fwd(q, k, v, scale)


def _cuda_bwd(do, q, k, v, out, lse, scale):
    if _cuda_flash_ok(q):
        q, k, v = vector_ready(q), vector_ready(k), vector_ready(v)
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        B, Lq, H, _ = q.shape
        Lk = k.shape[1]
        try:
            zero = torch.zeros((), dtype=torch.int64, device=q.device)
            dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
                t(do).contiguous(), t(q), t(k), t(v), t(out).contiguous(),
                lse.float().contiguous(), torch.empty(0, device=q.device),
                torch.empty(0, device=q.device), Lq, Lk, 0.0, False, zero, zero, scale=scale)
            return t(dq), t(dk), t(dv)
        except RuntimeError as e:
            _warn_once("flash-bwd", f"torch flash attention backward unavailable ({e}); "
                                    "using math path")
    return _math_bwd(do, q, k, v, out, lse, scale)


def attn_fwd(q, k, v, scale):
    """Attention of q [B, Lq, H, D] over ONE segment k/v [B, Lk, H, D] -> (out, lse)."""
    if q.device.type == "cpu":
        return _cpu_fwd(q, k, v, scale)
    if q.device.type == "cuda":
        return _cuda_fwd(q, k, v, scale)
    return _math_fwd(q, k, v, scale)


def attn_bwd(do, q, k, v, out, lse, scale):
    """Gradients of one segment given the (possibly merged) out and lse."""
    if q.device.type == "cpu":
        return _cpu_bwd(do, q, k, v, out, lse, scale)
    if q.device.type == "cuda":
        return _cuda_bwd(do, q, k, v, out, lse, scale)
    return _math_bwd(do, q, k, v, out, lse, scale)
