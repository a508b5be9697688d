"""Regional references (storyattn.regions): the masks, the attention against a float64
reference built row by row from the definition, and the GSA modes with ``ref_regions``."""
from __future__ import annotations

import pytest
import torch

from storyattn import region_masks
from storyattn.regions import regional_segment_attention


def regional_ref(q, k, v, ref_k, ref_v, ref_index, regions, text_len):
    """float64, one row at a time: row l of target b attends to its own keys plus the pool
    entries of the slots it may read (text rows: every slot some image token reads)."""
    B, L, H, D = q.shape
    out = torch.zeros(B, L, H, D, dtype=torch.float64)
    for b in range(B):
        present = [r for r in range(ref_index.shape[1])
                   if ref_index[b, r] >= 0 and bool(regions[b, r].any())]
        for l in range(L):
            slots = present if l < text_len else [
                r for r in range(ref_index.shape[1])
                if ref_index[b, r] >= 0 and bool(regions[b, r, l - text_len])]
            K = torch.cat([k[b]] + [ref_k[int(ref_index[b, r])] for r in slots]).double()
            V = torch.cat([v[b]] + [ref_v[int(ref_index[b, r])] for r in slots]).double()
            s = torch.einsum("hd,khd->hk", q[b, l].double(), K) * D ** -0.5
            out[b, l] = torch.einsum("hk,khd->hd", torch.softmax(s, -1), V)
    return out


def test_region_masks_policy():
    # 2 x 4 tokens; target 0: A on the left half, B on the right half; target 1: A boxed in
    # the top-left token only, B without a box; target 2: a single box
    m = region_masks([[(0, 0, .5, 1), (.5, 0, 1, 1)],
                      [(0, 0, .25, .5), None],
                      [(.5, .5, 1, 1)]], (2, 4), num_slots=2)
    assert m.shape == (3, 2, 8) and m.dtype == torch.bool
    assert m[0, 0].tolist() == [1, 1, 0, 0, 1, 1, 0, 0]
    assert m[0, 1].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    # A: its token plus every token no box covers (all of them here); B: no box, every token
    assert m[1, 0].all() and m[1, 1].all()
    # one box covering the lower right: inside it only A, elsewhere (uncovered) A too;
    # the missing second slot has no box: read everywhere
    assert m[2, 0].all() and m[2, 1].all()
    # overlapping boxes: the overlap reads both
    o = region_masks([[(0, 0, .75, 1), (.25, 0, 1, 1)]], (1, 4))
    assert o[0, 0].tolist() == [1, 1, 1, 0] and o[0, 1].tolist() == [0, 1, 1, 1]


@pytest.mark.parametrize("bad", [(0.5, 0, 0.5, 1), (0, 0, 1.2, 1), (0, 0, 1)])
def test_region_masks_refuses_bad_boxes(bad):
    with pytest.raises(ValueError, match="region_masks"):
        region_masks([[bad]], (2, 2))


def _inputs(B=3, text=3, n=8, P=4, H=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, text + n, H, D, generator=g)
    k = torch.randn(B, text + n, H, D, generator=g)
    v = torch.randn(B, text + n, H, D, generator=g)
    rk = torch.randn(P, n, H, D, generator=g)
    rv = torch.randn(P, n, H, D, generator=g)
    return q, k, v, rk, rv


def test_regional_attention_matches_row_by_row_reference():
    q, k, v, rk, rv = _inputs()
    ref_index = torch.tensor([[0, 1, -1], [2, 2, 3], [1, 3, 0]])
    regions = region_masks([[(0, 0, .5, 1), (.5, 0, 1, 1)],
                            [(0, 0, .25, 1), None, (.25, 0, .75, 1)],
                            [None, None, None]], (2, 4), num_slots=3)
    # target 2: slot 1 absent (no token reads it: nor does its text), slot 2 on 3 tokens
    regions[2, 1] = False
    regions[2, 2] = False
    regions[2, 2, 5:] = True
    out = regional_segment_attention(q, k, v, rk, rv, ref_index, regions, text_len=3,
                                     backend="torch")
    want = regional_ref(q, k, v, rk, rv, ref_index, regions, 3)
    assert (out.double() - want).abs().max() < 1e-5
    # and it is not the plain op: the regions changed every regional target
    from storyattn import segment_attention
    plain = segment_attention(q, k, v, rk, rv, ref_index=ref_index, backend="torch")
    for b in range(3):
        assert (plain[b] - out[b]).abs().max() > 1e-3


def test_regional_attention_full_masks_is_the_op_bitwise():
    from storyattn import segment_attention

    q, k, v, rk, rv = _inputs(seed=1)
    ref_index = torch.tensor([[0, 1], [3, -1], [2, 0]])
    full = torch.ones(3, 2, 8, dtype=torch.bool)
    out = regional_segment_attention(q, k, v, rk, rv, ref_index, full, 3, backend="torch")
    assert torch.equal(out, segment_attention(q, k, v, rk, rv, ref_index=ref_index,
                                              backend="torch"))


def test_regional_attention_gradients_match_reference():
    q, k, v, rk, rv = _inputs(B=2, seed=2)
    ref_index = torch.tensor([[0, 1], [2, 3]])
    regions = region_masks([[(0, 0, .5, 1), (.5, 0, 1, 1)], [(0, 0, 1, .5), None]], (2, 4))
    ts = [t.double().requires_grad_() for t in (q, k, v, rk, rv)]
    out = regional_segment_attention(*ts, ref_index, regions, 3, backend="torch")
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = torch.autograd.grad((out * w).sum(), ts)
    ts2 = [t.detach().clone().requires_grad_() for t in ts]
    want = torch.autograd.grad((regional_ref(*ts2, ref_index, regions, 3) * w).sum(), ts2)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-8


# ------------------------------------------------------------------ the GSA modes
pytest.importorskip("diffusers")

from storyattn import GroupSharedAttention  # noqa: E402

from test_gsa_processor import (flux_inputs, record_refs, rel_err, rows, tiny_flux,  # noqa: E402
                                zero_ref_timesteps)


def test_replay_and_in_batch_with_regions_agree_and_differ_from_plain():
    """Two references, target boxes left / right: replay with regions == in-batch with the
    same regions; both differ from reading without them; full masks == no regions."""
    m = tiny_flux()
    gsa = GroupSharedAttention(m)
    x = zero_ref_timesteps(flux_inputs(3, seed=3), [1, 2])      # rows: target, ref A, ref B
    regions = region_masks([[(0, 0, .5, 1), (.5, 0, 1, 1)]], (4, 4))
    with torch.no_grad():
        with gsa.in_batch(3, 1, ref_regions=regions):
            ib = m(**x).sample[:1]
        with gsa.in_batch(3, 1):
            plain = m(**x).sample[:1]
        cache = record_refs(gsa, m, x, [1, 2])
        idx = torch.tensor([[0, 1]])
        with gsa.replay(cache, ref_index=idx, ref_regions=regions):
            rp = m(**rows(x, [0])).sample
        with gsa.replay(cache, ref_index=idx, ref_regions=torch.ones(1, 2, 16, dtype=torch.bool)):
            full = m(**rows(x, [0])).sample
        with gsa.replay(cache, ref_index=idx):
            rp_plain = m(**rows(x, [0])).sample
    assert rel_err(rp, ib) <= 1e-5
    assert rel_err(rp_plain, plain) <= 1e-5
    assert rel_err(rp, rp_plain) > 1e-3
    assert torch.equal(full, rp_plain)


def test_ref_regions_bad_arguments():
    m = tiny_flux()
    gsa = GroupSharedAttention(m)
    x = zero_ref_timesteps(flux_inputs(2, seed=4), [1])
    cache = record_refs(gsa, m, x, [1])
    with pytest.raises(ValueError, match="needs a ref_index"):
        gsa.replay(cache, ref_regions=torch.ones(1, 1, 16, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor"):
        gsa.replay(cache, ref_index=torch.tensor([[0]]), ref_regions=torch.ones(1, 1, 16))
    with pytest.raises(ValueError, match="slots per target"):
        gsa.replay(cache, ref_index=torch.tensor([[0]]),
                   ref_regions=torch.ones(1, 2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="image tokens"):
        with torch.no_grad(), gsa.replay(cache, ref_index=torch.tensor([[0]]),
                                         ref_regions=torch.ones(1, 1, 9, dtype=torch.bool)):
            m(**rows(x, [0]))
