"""Merging two partial attention results over disjoint key sets (the split + merge path).

Unchecked and differentiable: the backends call it on their own partial results, and the
public :func:`storyattn.merge_attention_states` checks its arguments and then calls it.
"""
from __future__ import annotations

import torch


def _merge_weights(lse_a, lse_b):
    """Merged lse (accumulation precision) and the two weights ``[B, L, H, 1]``."""
    acc = torch.promote_types(torch.float32, lse_a.dtype)
    la, lb = lse_a.to(acc), lse_b.to(acc)
    lse = torch.logaddexp(la, lb)
    # Where both sides are -inf, logaddexp gives -inf and exp(-inf - -inf) would be
    # NaN: use a finite stand-in so the weights come out as 0.
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    wa = torch.exp(la - safe).transpose(1, 2).unsqueeze(-1)
    wb = torch.exp(lb - safe).transpose(1, 2).unsqueeze(-1)
    return lse, wa, wb


def merge_states(out_a, lse_a, out_b, lse_b):
    """Unchecked, differentiable merge used by the backends (contract of
    merge_attention_states).  lse stays in the accumulation precision (float64
    for float64 inputs) so merges chain without losing digits; the public API
    casts it."""
    lse, wa, wb = _merge_weights(lse_a, lse_b)
    out_acc = torch.promote_types(lse.dtype, out_a.dtype)
    out = wa * out_a.to(out_acc) + wb * out_b.to(out_acc)
    return out.to(out_a.dtype), lse


def merge_states_(out_a, lse_a, out_b, lse_b):
    """Memory-lean merge for fresh partial results: reuses ``out_a``/``out_b``'s
    storage when they are already in the accumulation dtype (they are consumed).
    Returns ``(out, lse)`` with ``out`` in the accumulation dtype."""
    lse, wa, wb = _merge_weights(lse_a, lse_b)
    out_acc = torch.promote_types(lse.dtype, out_a.dtype)
    oa = out_a.to(out_acc).mul_(wa)
    oa.add_(out_b.to(out_acc).mul_(wb))
    return oa, lse
