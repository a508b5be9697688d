"""The reference-pool write of qk_norm_rope (qk_norm_rope_into_cache), the placement helpers
(reference_key_rotary, rotate_keys), and qk_norm_rope behind the backend registry and its
custom ops (as segment_attention is).  Helpers are test_qk_norm_rope.py's.
"""
from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from storyattn import backends
from storyattn.backends.base import QK_NORM_ROPE
from storyattn.rope import (qk_norm_rope, qk_norm_rope_into_cache, reference_key_rotary,
                            rotate_keys)
from test_qk_norm_rope import (FUSED, _cuda_backend_on_the_emulation,  # noqa: F401
                               flux_ids, make_case, report, ulp_close)


# ----------------------------------------------------------------------------- cache write

@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("placed", [True, False], ids=["placed", "as_is"])
def test_cache_write(backend, dtype, placed):
    text_len, B, P = 3, 3, 5
    q, k, nq, nk, rot, pos = make_case(B=B, text_len=text_len, rows=2, cols=3, D=40, dtype=dtype)
    v = torch.randn_like(k)
    L, H, D = q.shape[1], q.shape[2], q.shape[3]
    pool_k = torch.full((P, L - text_len, H, D), float("nan"), dtype=dtype)
    pool_v = pool_k.clone()
    index = torch.tensor([3, -1, 0])
    # Entry e sits at index-axis position e + 1, whichever row writes it.
    cos_e, sin_e = reference_key_rotary(pos, P)
    pool_rotary = (cos_e[index.clamp(min=0)], sin_e[index.clamp(min=0)]) if placed else None

    with torch.no_grad():
        out_q, out_k = qk_norm_rope_into_cache(q, k, v, nq, nk, rot, pool_k, pool_v, index,
                                               pool_start=text_len, pool_rotary=pool_rotary,
                                               backend=backend)
        plain_q, plain_k = qk_norm_rope(q, k, nq, nk, rot, backend=backend)
    assert torch.equal(out_q, plain_q) and torch.equal(out_k, plain_k)

    for b, e in enumerate(index.tolist()):
        if e < 0:
            continue
        keys = out_k[b:b + 1, text_len:]
        if placed:
            keys = rotate_keys(keys, cos_e[e:e + 1], sin_e[e:e + 1])
        assert bool(ulp_close(pool_k[e:e + 1], keys).all()), report(pool_k[e:e + 1], keys,
                                                                      f"pool_k[{e}]")
        assert torch.equal(pool_v[e], v[b, text_len:])
    untouched = [e for e in range(P) if e not in index.tolist()]
    assert pool_k[untouched].isnan().all() and pool_v[untouched].isnan().all()


def test_cache_write_compiles_into_one_graph():
    """Under torch.compile(fullgraph=True) the index checks do no host reads: a list
    index (rows with -1 skipped) and a tensor index each give one graph that writes
    the pool exactly as eager does; a tensor index with -1 is refused on the device."""
    from torch._dynamo.testing import CompileCounter

    q, k, nq, nk, rot, pos = make_case(B=3, text_len=3, rows=2, cols=3, D=40)
    v = torch.randn_like(k)
    cos_e, sin_e = reference_key_rotary(pos, 3)

    def write(index, pool_k, pool_v):
        return qk_norm_rope_into_cache(q, k, v, nq, nk, rot, pool_k, pool_v, index,
                                       pool_start=3, pool_rotary=(cos_e, sin_e),
                                       backend="torch")

    counter = CompileCounter()
    compiled = torch.compile(write, backend=counter, fullgraph=True)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            for index in ([2, -1, 0], torch.tensor([2, 1, 0])):
                pools = [torch.full((4,) + tuple(q[:, 3:].shape[1:]), float("nan"))
                         for _ in range(4)]
                want = write(index, *pools[:2])
                got = compiled(index, *pools[2:])
                assert all(torch.equal(a, b) for a, b in zip(want, got))
                for w, g in ((pools[0], pools[2]), (pools[1], pools[3])):  # NaN = untouched
                    torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
                assert pools[2][[0, 2]].isfinite().all() and pools[2][3].isnan().all()
            assert counter.frame_count == 2
            with pytest.raises(RuntimeError, match="under torch.compile"):
                compiled(torch.tensor([2, -1, 0]), *pools[2:])
    finally:
        torch._dynamo.reset()


def test_cache_write_keeps_autograd_out_of_the_pool():
    q, k, nq, nk, rot, _ = make_case(B=1, D=32)
    k.requires_grad_(True)
    v = torch.randn_like(k)
    pool_k = torch.zeros(2, q.shape[1], 3, 32)
    pool_v = torch.zeros_like(pool_k)
    _, out_k = qk_norm_rope_into_cache(q, k, v, nq, nk, rot, pool_k, pool_v, [1])
    assert out_k.requires_grad and not pool_k.requires_grad
    assert torch.equal(pool_k[1], out_k.detach()[0])


# ----------------------------------------------------------------------------- placement

def test_extra_rotation_equals_offset_position_ids():
    """rotate_keys(RoPE at ids (0, r, c), angle of (i+1, 0, 0)) == RoPE at ids (i+1, r, c)."""
    rows, cols, H, D, n = 3, 4, 2, 128, 4
    pos = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])
    k = torch.randn(n, rows * cols, H, D)
    own = pos(flux_ids(0, rows, cols))
    rotated = apply_rotary_emb(k, own, sequence_dim=1)
    cos_e, sin_e = reference_key_rotary(pos, n)
    placed = rotate_keys(rotated, cos_e, sin_e)
    for i in range(n):
        moved = pos(flux_ids(0, rows, cols, index=i + 1))
        want = apply_rotary_emb(k[i:i + 1], moved, sequence_dim=1)
        assert torch.allclose(placed[i:i + 1], want, atol=2e-5, rtol=1e-5), \
            report(placed[i:i + 1], want, f"entry {i}")


def test_reference_key_rotary_layout():
    pos = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])
    cos, sin = reference_key_rotary(pos, 4)
    assert cos.shape == sin.shape == (4, 128) and cos.dtype == torch.float32
    # Only the index axis (first 16 columns) turns; rows/cols stay at angle 0.
    assert torch.equal(cos[:, 16:], torch.ones(4, 112)) and torch.equal(sin[:, 16:],
                                                                        torch.zeros(4, 112))
    assert not torch.allclose(cos[:, :16], torch.ones(4, 16))
    # The model's own table at ids (i + 1, 0, 0), and stable under cache extension.
    ids = torch.zeros(4, 3)
    ids[:, 0] = torch.arange(1, 5)
    want_cos, want_sin = pos(ids)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    later_cos, later_sin = reference_key_rotary(pos, 2, first_entry=2)
    assert torch.equal(later_cos, cos[2:]) and torch.equal(later_sin, sin[2:])
    assert reference_key_rotary(pos, 0)[0].shape == (0, 128)


def test_rotate_keys_one_angle_for_all_rows():
    k = torch.randn(3, 5, 2, 16, dtype=torch.bfloat16)
    cos, sin = reference_key_rotary(FluxPosEmbed(10000, [4, 6, 6]), 1)
    one = rotate_keys(k, cos[0], sin[0])
    per_row = rotate_keys(k, cos.expand(3, -1), sin.expand(3, -1))
    assert one.dtype == torch.bfloat16 and torch.equal(one, per_row)


# ----------------------------------------------------------------------------- registry
def test_one_registry_for_both_ops():
    names = {b.name for b in backends.all_backends(QK_NORM_ROPE)}
    assert names == {"torch", "triton", "cuda"}
    assert backends.get("triton", QK_NORM_ROPE).kernel is not None      # a fused kernel
    assert backends.get("torch", QK_NORM_ROPE).module_forward is not None  # calls the norms
    q, k, nq, nk, rot, _ = make_case(D=32)
    with pytest.raises(ValueError, match="unknown qk_norm_rope backend 'cudnn'"):
        qk_norm_rope(q, k, nq, nk, rot, backend="cudnn")


def test_fused_kernel_is_one_custom_op_under_compile():
    """The triton kernel (here under the interpreter) runs inside the custom op: a
    fullgraph compile is one graph with no break into the launcher, and equals eager."""
    from torch._dynamo.testing import CompileCounter

    q, k, nq, nk, rot, _ = make_case(D=32, dtype=torch.bfloat16)

    def f(q, k):
        return qk_norm_rope(q, k, nq, nk, rot, backend="triton")

    counter = CompileCounter()
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            want = f(q, k)
            got = torch.compile(f, backend=counter, fullgraph=True)(q, k)
        assert counter.frame_count == 1
        assert all(torch.equal(a, b) for a, b in zip(want, got))
    finally:
        torch._dynamo.reset()
    w = nq.weight.detach()
    torch.library.opcheck(torch.ops.storyattn.qk_norm_rope_fused.default,
                          (q, k, w, w, rot[0], rot[1], 1e-6, 1e-6, False, False, True, True,
                           "triton"), test_utils=("test_schema", "test_faketensor"))
