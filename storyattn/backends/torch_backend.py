"""``torch`` backend: split + merge over segments, pure torch, every device.

Forward: attention over the target's own keys, then over the reference pool,
merged through the log-sum-exp.  When every target reads the whole pool the
batch is folded into the query length (``q -> [1, B*Lq, H, D]``) and the pool
is viewed as one segment ``[1, P*Lr, H, D]``: one call, and the pool is never
copied per target.  With a ``ref_index`` page table the pool is visited entry by
entry; each entry is attended by exactly the targets that read it, and an entry
read ``m`` times by a target adds ``log m`` to that target's partial lse (the
keys appear ``m`` times in the concatenation).

Backward is exact and does not differentiate through the lse: each segment's
flash-style backward is run with the *merged* output and lse.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._merge import merge_states, merge_states_
from ._primitives import attn_bwd, attn_fwd, lse_dtype
from ._qk import apply_rotary
from .base import Backend, QKNormRopeBackend, QKNormRopeInputs, QKPool, SegmentInputs


def _fold(x):
    """[B, L, H, D] -> [1, B*L, H, D] (a view when x is contiguous)."""
    B, L, H, D = x.shape
    return x.reshape(1, B * L, H, D)


def _fold_lse(lse):
    """[B, H, L] -> [1, H, B*L]."""
    B, H, L = lse.shape
    return lse.permute(1, 0, 2).reshape(1, H, B * L)


def _unfold_lse(lse, B):
    _, H, BL = lse.shape
    return lse.reshape(H, B, BL // B).permute(1, 0, 2)


def _entry_readers(ref_index: torch.Tensor, P: int):
    """For each pool entry j read by someone: (j, target indices, multiplicities)."""
    B = ref_index.shape[0]
    valid = ref_index >= 0
    counts = torch.zeros(B, P + 1, dtype=torch.int64, device=ref_index.device)
    counts.scatter_add_(1, torch.where(valid, ref_index, P), valid.to(torch.int64))
    counts = counts[:, :P].cpu()  # small [B, P]: drives host-side looping
    out = []
    for j in range(P):
        col = counts[:, j]
        idx = torch.nonzero(col, as_tuple=False).flatten()
        if idx.numel():
            out.append((j, idx, col[idx]))
    return out


def pool_forward(q, ref_k, ref_v, ref_index, scale, fwd=attn_fwd):
    """Partial (out, lse) of every target over its pool entries; lse -inf where none.

    ``fwd(q, k, v, scale) -> (out, lse)`` is the single-segment attention to use
    (the flash/xformers adapters pass their own)."""
    B, Lq, H, D = q.shape
    P, Lr = ref_k.shape[:2]
    if ref_index is None:
        o, l = fwd(_fold(q), _fold(ref_k), _fold(ref_v), scale)
        return o.reshape(B, Lq, H, D), _unfold_lse(l, B)
    acc = lse_dtype(q.dtype)
    out = torch.zeros(B, Lq, H, D, dtype=acc, device=q.device)
    lse = torch.full((B, H, Lq), float("-inf"), dtype=acc, device=q.device)
    for j, idx, mult in _entry_readers(ref_index, P):
        idx_d = idx.to(q.device)
        n = idx.numel()
        o, l = fwd(_fold(q.index_select(0, idx_d)), ref_k[j:j + 1], ref_v[j:j + 1], scale)
        l = _unfold_lse(l, n).to(acc)
        if bool((mult > 1).any()):
            l = l + torch.log(mult.to(device=q.device, dtype=acc)).view(n, 1, 1)
        o = o.reshape(n, Lq, H, D)
        mo, ml = merge_states(out.index_select(0, idx_d), lse.index_select(0, idx_d), o, l)
        out.index_copy_(0, idx_d, mo)
        lse.index_copy_(0, idx_d, ml)
    return out, lse


def forward(inputs: SegmentInputs):
    q, k, v, scale = inputs.q, inputs.k, inputs.v, inputs.scale
    out, lse = attn_fwd(q, k, v, scale)
    if inputs.ref_k is not None:
        po, pl = pool_forward(q, inputs.ref_k, inputs.ref_v, inputs.ref_index, scale)
        out, lse = merge_states_(out, lse, po, pl)
    return out.to(q.dtype), lse.to(lse_dtype(q.dtype))


def backward(inputs: SegmentInputs, dout, out, lse):
    q, k, v, ref_k, ref_v = inputs.q, inputs.k, inputs.v, inputs.ref_k, inputs.ref_v
    ref_index, scale = inputs.ref_index, inputs.scale
    dout = dout.contiguous()
    dq, dk, dv = attn_bwd(dout, q, k, v, out, lse, scale)
    dref_k = dref_v = None
    if ref_k is None:
        return dq, dk, dv, dref_k, dref_v
    B, Lq, H, D = q.shape
    if ref_index is None:
        dqp, dkp, dvp = attn_bwd(_fold(dout), _fold(q), _fold(ref_k), _fold(ref_v),
                                 _fold(out), _fold_lse(lse), scale)
        return (dq + dqp.reshape(B, Lq, H, D), dk, dv,
                dkp.reshape(ref_k.shape), dvp.reshape(ref_v.shape))
    acc = lse_dtype(q.dtype)
    dq = dq.to(acc)
    dref_k = torch.zeros(ref_k.shape, dtype=acc, device=q.device)
    dref_v = torch.zeros(ref_v.shape, dtype=acc, device=q.device)
    for j, idx, mult in _entry_readers(ref_index, ref_k.shape[0]):
        idx_d = idx.to(q.device)
        n = idx.numel()
        do_sel = dout.index_select(0, idx_d)
        if bool((mult > 1).any()):
            # m copies of the same keys: every gradient term scales with m, and
            # scaling dO scales them all (delta = rowsum(dO * O) included).
            do_sel = do_sel * mult.to(device=q.device, dtype=do_sel.dtype).view(n, 1, 1, 1)
        dqj, dkj, dvj = attn_bwd(
            _fold(do_sel), _fold(q.index_select(0, idx_d)), ref_k[j:j + 1], ref_v[j:j + 1],
            _fold(out.index_select(0, idx_d)), _fold_lse(lse.index_select(0, idx_d)), scale)
        dq.index_add_(0, idx_d, dqj.reshape(n, Lq, H, D).to(acc))
        dref_k[j] += dkj[0].to(acc)
        dref_v[j] += dvj[0].to(acc)
    return dq.to(q.dtype), dk, dv, dref_k.to(ref_k.dtype), dref_v.to(ref_v.dtype)


def _check(inputs: SegmentInputs):
    return None


def qk_norm_rope(inputs: QKNormRopeInputs, pool: Optional[QKPool] = None):
    """diffusers' path: call the norm modules themselves (whatever they do, and any hooks or
    adapters on them, stays identical to the stock processor), then the same rotation
    formula; differentiable.  The pool write runs outside autograd (the pool holds
    constants)."""
    q, k = inputs.q, inputs.k
    if inputs.norm_q is not None:
        q = inputs.norm_q(q)
    if inputs.norm_k is not None:
        k = inputs.norm_k(k)
    if inputs.rotary is not None:
        cos, sin = inputs.rotary
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
    if pool is not None:
        _write_pool(k, pool)
    return q, k


def _write_pool(k_out: torch.Tensor, pool: QKPool) -> None:
    rows = pool.rows
    if rows is not None and not rows:
        return
    with torch.no_grad():
        keys, vals, entries = k_out.detach()[:, pool.start:], pool.v.detach()[:, pool.start:], \
            pool.index
        pcos, psin = pool.cos, pool.sin
        if rows is not None and len(rows) < k_out.shape[0]:
            sel = torch.tensor(rows, dtype=torch.int64, device=k_out.device)
            keys, vals, entries = keys[sel], vals[sel], entries[sel]
            if pcos is not None:
                pcos, psin = pcos[sel], psin[sel]
        if pcos is not None:  # one more rotation per row: the entry's own position
            keys = apply_rotary(keys, pcos[:, None, None, :], psin[:, None, None, :])
        pool.pool_k.index_copy_(0, entries, keys)
        pool.pool_v.index_copy_(0, entries, vals)


SEGMENT_ATTENTION = Backend(
    name="torch",
    forward=forward,
    backward=backward,
    availability=lambda: None,
    check=_check,
    priority={"cpu": 100, "cuda": 10},
)

QK_NORM_ROPE = QKNormRopeBackend(
    name="torch",
    availability=lambda: None,
    check=lambda inputs: None,
    priority={"cpu": 100, "cuda": 10},
    module_forward=qk_norm_rope,
)

BACKENDS = (SEGMENT_ATTENTION, QK_NORM_ROPE)
