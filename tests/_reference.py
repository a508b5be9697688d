"""Independent float64 references and comparison helpers for the tests.

Written from the definition (literal concatenation + softmax), sharing no code
with the library.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_attention_ref(q, k, v, ref_k=None, ref_v=None, ref_index=None, scale=None):
    """float64 out [B, Lq, H, D] and lse [B, H, Lq] by building each target's key set."""
    B, Lq, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    outs, lses = [], []
    for b in range(B):
        ks, vs = [k[b]], [v[b]]
        if ref_k is not None and ref_k.shape[0] > 0:
            ids = range(ref_k.shape[0]) if ref_index is None else [
                int(j) for j in ref_index[b].tolist() if j >= 0]
            for j in ids:
                ks.append(ref_k[j])
                vs.append(ref_v[j])
        K = torch.cat(ks).double()
        V = torch.cat(vs).double()
        s = torch.einsum("qhd,khd->hqk", q[b].double(), K) * scale
        lses.append(torch.logsumexp(s, -1))
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), V))
    return torch.stack(outs), torch.stack(lses)


def naive_same_dtype(q, k, v, ref_k=None, ref_v=None, ref_index=None, scale=None):
    """What a user would write in the same dtype: per-target concat + SDPA."""
    B = q.shape[0]
    outs = []
    for b in range(B):
        ks, vs = [k[b]], [v[b]]
        if ref_k is not None and ref_k.shape[0] > 0:
            ids = range(ref_k.shape[0]) if ref_index is None else [
                int(j) for j in ref_index[b].tolist() if j >= 0]
            ks += [ref_k[j] for j in ids]
            vs += [ref_v[j] for j in ids]
        K, V = torch.cat(ks), torch.cat(vs)
        o = F.scaled_dot_product_attention(q[b:b + 1].transpose(1, 2), K[None].transpose(1, 2),
                                           V[None].transpose(1, 2), scale=scale)
        outs.append(o.transpose(1, 2)[0])
    return torch.stack(outs)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_close_report(actual, expected, atol, rtol=0.0, name="tensor"):
    """allclose with a report naming the worst index and any NaN/inf."""
    a, e = actual.double(), expected.double()
    bad_nan = ~torch.isfinite(a) & torch.isfinite(e)
    if bad_nan.any():
        idx = torch.nonzero(bad_nan)[0].tolist()
        raise AssertionError(f"{name}: {int(bad_nan.sum())} non-finite values, first at {idx}")
    diff = (a - e).abs()
    tol = atol + rtol * e.abs()
    if (diff > tol).any():
        flat = int(torch.argmax(diff - tol))
        idx = list(torch.unravel_index(torch.tensor(flat), diff.shape))
        idx = [int(i) for i in idx]
        raise AssertionError(
            f"{name}: {int((diff > tol).sum())}/{diff.numel()} elements out of tolerance "
            f"(atol={atol:g}, rtol={rtol:g}); worst at {idx}: got {a[tuple(idx)].item():.6g}, "
            f"expected {e[tuple(idx)].item():.6g}, max abs err {diff.max().item():.3g}")
