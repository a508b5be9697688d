"""Public segment_attention / merge_attention_states against a float64 reference.

Runs every backend that can run on this machine's device (torch always; triton
under TRITON_INTERPRET=1 on CPU, at the smallest sizes, since the interpreter is
slow; its fuller suite is tests/test_segment_attention_triton.py).
"""
import math

import pytest
import torch

import storyattn
from _reference import (assert_close_report, max_err, naive_same_dtype,
                        segment_attention_ref)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Rounding of one element of the dtype: what "as accurate as torch in this dtype" allows.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float64: 1e-10}


def _backends():
    names = storyattn.available_backends()
    return [n for n in names if n in ("torch", "triton")] if DEV == "cpu" else names


def _case(B, Lq, Lk, H, D, P, Lr, dtype, grad=False, device=DEV):
    mk = lambda *s: torch.randn(*s, dtype=dtype, device=device, requires_grad=grad)  # noqa: E731
    return mk(B, Lq, H, D), mk(B, Lk, H, D), mk(B, Lk, H, D), mk(P, Lr, H, D), mk(P, Lr, H, D)


def _check_forward(backend, q, k, v, rk, rv, idx, dtype):
    out, lse = storyattn.segment_attention(q, k, v, rk, rv, ref_index=idx, return_lse=True,
                                           backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    ref_o, ref_l = segment_attention_ref(q, k, v, rk, rv, idx)
    base = max_err(naive_same_dtype(q, k, v, rk, rv, idx), ref_o)
    err = max_err(out, ref_o)
    assert torch.isfinite(out).all()
    assert err <= 2 * base + ATOL[dtype], f"{backend}: err {err:.3g} vs torch {base:.3g}"
    assert_close_report(lse, ref_l, atol=1e-4 if dtype != torch.float64 else 1e-6,
                        rtol=1e-5, name="lse")
    return out


SHAPES = [
    # B, Lq, Lk, H, D, P, Lr
    (2, 16, 16, 2, 32, 1, 16),
    (3, 7, 5, 2, 40, 5, 6),
    (1, 1, 1, 1, 64, 1, 1),
    (2, 97, 33, 2, 72, 2, 17),
    (2, 9, 13, 3, 128, 0, 4),
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("indexed", [False, True])
def test_forward_fp32(backend, shape, indexed):
    B, Lq, Lk, H, D, P, Lr = shape
    if backend == "triton" and Lq * Lk * D > 200_000:
        pytest.skip("kept small under the Triton interpreter")
    q, k, v, rk, rv = _case(*shape, torch.float32)
    idx = None
    if indexed and P > 0:
        idx = torch.randint(-1, P, (B, max(1, P - 1)), device=DEV)
    _check_forward(backend, q, k, v, rk, rv, idx, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", _backends())
def test_forward_low_precision(backend, dtype):
    q, k, v, rk, rv = _case(2, 24, 20, 2, 64, 3, 12, dtype)
    idx = torch.tensor([[0, 2], [1, -1]], device=DEV)
    _check_forward(backend, q, k, v, rk, rv, None, dtype)
    _check_forward(backend, q, k, v, rk, rv, idx, dtype)


def test_long_sequence_torch():
    q, k, v, rk, rv = _case(2, 1025, 1025, 2, 64, 2, 257, torch.float32)
    idx = torch.tensor([[1, -1], [0, 1]], device=DEV)
    _check_forward("torch", q, k, v, rk, rv, idx, torch.float32)


def test_float64_is_exact_on_torch():
    q, k, v, rk, rv = _case(2, 11, 9, 2, 40, 3, 5, torch.float64)
    idx = torch.tensor([[2, 2, 0], [-1, 1, -1]], device=DEV)
    out, lse = storyattn.segment_attention(q, k, v, rk, rv, ref_index=idx, return_lse=True,
                                           backend="torch")
    ref_o, ref_l = segment_attention_ref(q, k, v, rk, rv, idx)
    assert max_err(out, ref_o) < 1e-12
    assert max_err(lse, ref_l) < 1e-5  # lse is returned in float32


def _grads_match(backend, idx, P, dtype=torch.float32, shape=(3, 13, 9, 2, 40), Lr=7):
    B, Lq, Lk, H, D = shape
    q, k, v, rk, rv = _case(B, Lq, Lk, H, D, P, Lr, dtype, grad=True)
    out = storyattn.segment_attention(q, k, v, rk, rv, ref_index=idx, backend=backend)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, rk, rv), g, allow_unused=True)
    # float64 autograd through the independent reference
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, rk, rv)]
    ref_o, _ = segment_attention_ref(*leaves, ref_index=idx)
    want = torch.autograd.grad(ref_o, leaves, g.double(), allow_unused=True)
    for name, a, b in zip(("dq", "dk", "dv", "dref_k", "dref_v"), got, want):
        if b is None:
            b = torch.zeros_like(leaves[0]) if a is None else torch.zeros_like(a, dtype=torch.float64)
        a = torch.zeros_like(b) if a is None else a
        assert_close_report(a, b, atol=2e-5 if dtype == torch.float32 else 1e-10, rtol=1e-4,
                            name=f"{backend} {name}")


@pytest.mark.parametrize("backend", _backends())
def test_backward_all_pool(backend):
    _grads_match(backend, None, P=3)


@pytest.mark.parametrize("backend", _backends())
def test_backward_page_table_duplicates_and_empty_rows(backend):
    # target 0 reads entry 2 twice, target 1 nothing, target 2 entries 3 and 0;
    # entry 1 is read by no one: its gradient must be exactly zero.
    idx = torch.tensor([[2, 2, -1], [-1, -1, -1], [3, 0, -1]], device=DEV)
    _grads_match(backend, idx, P=4)


def test_backward_float64_torch():
    idx = torch.tensor([[0, 1], [1, 1], [-1, 0]], device=DEV)
    _grads_match("torch", idx, P=2, dtype=torch.float64)


def test_unread_entry_gets_zero_grad():
    q, k, v, rk, rv = _case(2, 5, 4, 1, 32, 3, 4, torch.float32, grad=True)
    idx = torch.tensor([[0, 2], [2, -1]], device=DEV)
    out = storyattn.segment_attention(q, k, v, rk, rv, ref_index=idx, backend="torch")
    out.sum().backward()
    assert torch.all(rk.grad[1] == 0) and torch.all(rv.grad[1] == 0)
    assert rk.grad[0].abs().sum() > 0 and rk.grad[2].abs().sum() > 0


def test_no_pool_equals_sdpa_and_empty_pool_equivalent():
    q, k, v, rk, rv = _case(2, 10, 12, 2, 32, 0, 4, torch.float32)
    a = storyattn.segment_attention(q, k, v)
    b = storyattn.segment_attention(q, k, v, rk, rv)  # P = 0
    sd = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert max_err(a, sd) < 1e-5 and torch.equal(a, b)


def test_all_minus_one_equals_own_keys_only():
    q, k, v, rk, rv = _case(2, 10, 12, 2, 32, 3, 4, torch.float32)
    idx = torch.full((2, 2), -1, device=DEV)
    a = storyattn.segment_attention(q, k, v, rk, rv, ref_index=idx)
    b = storyattn.segment_attention(q, k, v)
    assert max_err(a, b) < 1e-6


def test_scale_argument():
    q, k, v, rk, rv = _case(2, 6, 5, 2, 32, 2, 3, torch.float32)
    out = storyattn.segment_attention(q, k, v, rk, rv, scale=0.3)
    ref_o, _ = segment_attention_ref(q, k, v, rk, rv, scale=0.3)
    assert max_err(out, ref_o) < 1e-5


def test_lse_is_natural_log():
    q = torch.zeros(1, 1, 1, 32)
    k = torch.zeros(1, 3, 1, 32)
    rk = torch.zeros(2, 5, 1, 32)
    _, lse = storyattn.segment_attention(q, k, k, rk, rk, return_lse=True)
    # 3 + 2*5 equal scores of 0: lse = ln(13)
    assert abs(lse.item() - math.log(13)) < 1e-6


def test_pool_not_copied_per_target_memory_flat():
    """Folding B targets against one pool: the result for B targets equals B
    separate single-target calls (the shared-pool path is taken for all)."""
    q, k, v, rk, rv = _case(6, 8, 8, 2, 32, 2, 16, torch.float32)
    batched = storyattn.segment_attention(q, k, v, rk, rv)
    single = torch.cat([storyattn.segment_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], rk, rv)
                        for i in range(6)])
    assert max_err(batched, single) < 1e-6


# ----------------------------------------------------------------- merge
def test_merge_matches_union():
    q, k, v, rk, rv = _case(2, 9, 7, 2, 32, 1, 5, torch.float32)
    oa, la = storyattn.segment_attention(q, k, v, return_lse=True)
    ob, lb = storyattn.segment_attention(q, rk.expand(2, -1, -1, -1), rv.expand(2, -1, -1, -1),
                                         return_lse=True)
    out, lse = storyattn.merge_attention_states(oa, la, ob, lb)
    ref_o, ref_l = segment_attention_ref(q, k, v, rk, rv)
    assert max_err(out, ref_o) < 1e-5 and max_err(lse, ref_l) < 1e-5
    assert lse.dtype == torch.float32


def test_merge_neg_inf_rows_no_nan():
    o = torch.randn(1, 4, 2, 8)
    l = torch.randn(1, 2, 4)
    ninf = torch.full_like(l, float("-inf"))
    out, lse = storyattn.merge_attention_states(o, ninf, o * 2, ninf)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    out, lse = storyattn.merge_attention_states(o, l, o * 2, ninf)
    assert torch.allclose(out, o) and torch.allclose(lse, l)


def test_merge_is_differentiable():
    oa, ob = torch.randn(1, 3, 1, 4, requires_grad=True), torch.randn(1, 3, 1, 4)
    la, lb = torch.randn(1, 1, 3, requires_grad=True), torch.randn(1, 1, 3)
    out, lse = storyattn.merge_attention_states(oa, la, ob, lb)
    (out.sum() + lse.sum()).backward()
    assert oa.grad is not None and torch.isfinite(la.grad).all()


def test_merge_bad_shapes():
    o = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="lse_a"):
        storyattn.merge_attention_states(o, torch.randn(1, 4, 2), o, torch.randn(1, 2, 4))


# ------------------------------------------------------------- bad input
def _good():
    q = torch.randn(2, 5, 2, 32)
    return q, torch.randn(2, 6, 2, 32), torch.randn(2, 6, 2, 32), torch.randn(3, 4, 2, 32), \
        torch.randn(3, 4, 2, 32)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: a.update(q=a["q"][0]), ValueError, "q must have 4 dims"),
    (lambda a: a.update(k=torch.randn(3, 6, 2, 32), v=torch.randn(3, 6, 2, 32)), ValueError, "B=2"),
    (lambda a: a.update(v=torch.randn(2, 7, 2, 32)), ValueError, "k and v must have the same shape"),
    (lambda a: a.update(k=torch.randn(2, 6, 3, 32), v=torch.randn(2, 6, 3, 32)), ValueError, "H=2"),
    (lambda a: a.update(ref_k=torch.randn(3, 4, 2, 16), ref_v=torch.randn(3, 4, 2, 16)), ValueError, "D=32"),
    (lambda a: a.update(ref_v=torch.randn(3, 5, 2, 32)), ValueError, "ref_k and ref_v must have the same shape"),
    (lambda a: a.update(ref_v=None), ValueError, "given together"),
    (lambda a: a.update(k=a["k"].double(), v=a["v"].double()), TypeError, "dtype"),
    (lambda a: a.update(ref_k=a["ref_k"].half(), ref_v=a["ref_v"].half()), TypeError, "ref_k dtype"),
    (lambda a: a.update(q=a["q"].long()), TypeError, "floating"),
    (lambda a: a.update(ref_index=torch.tensor([[0, 3], [1, 1]])), ValueError, r"\[-1, P=3\)"),
    (lambda a: a.update(ref_index=torch.tensor([[0, -2], [1, 1]])), ValueError, r"\[-1, P=3\)"),
    (lambda a: a.update(ref_index=torch.tensor([0, 1])), ValueError, r"ref_index must be \[B=2, R\]"),
    (lambda a: a.update(ref_index=torch.tensor([[0.0], [1.0]])), TypeError, "integer"),
    (lambda a: a.update(ref_index=[[0], [1]]), TypeError, "integer torch.Tensor"),
    (lambda a: a.update(ref_k=None, ref_v=None, ref_index=torch.tensor([[0], [1]])), ValueError, "no reference pool"),
    (lambda a: a.update(k=torch.randn(2, 0, 2, 32), v=torch.randn(2, 0, 2, 32)), ValueError, "at least one token"),
    (lambda a: a.update(scale=-1.0), ValueError, "scale"),
    (lambda a: a.update(q=torch.randn(2, 5, 2, 32, device="meta")), ValueError, "device"),
])
def test_bad_input(mutate, exc, match):
    q, k, v, rk, rv = _good()
    args = dict(q=q, k=k, v=v, ref_k=rk, ref_v=rv, ref_index=None, scale=None)
    mutate(args)
    with pytest.raises(exc, match=match):
        storyattn.segment_attention(args["q"], args["k"], args["v"], args["ref_k"], args["ref_v"],
                                    ref_index=args["ref_index"], scale=args["scale"])


def test_unknown_and_unavailable_backend_messages():
    q, k, v, rk, rv = _good()
    with pytest.raises(ValueError, match="unknown segment-attention backend 'nope'"):
        storyattn.segment_attention(q, k, v, backend="nope")
    for name in ("flash", "xformers", "cuda"):
        if name in storyattn.available_backends():
            continue
        with pytest.raises(RuntimeError, match=f"backend '{name}' cannot run"):
            storyattn.segment_attention(q, k, v, backend=name)


def test_available_backends_lists_torch():
    assert "torch" in storyattn.available_backends()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "flash", "xformers", "cuda"])
def test_gpu_backends_bf16_flux_shape(backend):
    if backend not in storyattn.available_backends():
        pytest.skip(f"{backend} not available")
    q, k, v, rk, rv = _case(2, 1536, 1536, 4, 128, 3, 1024, torch.bfloat16, device="cuda")
    idx = torch.tensor([[0, 2], [1, -1]], device="cuda")
    with torch.no_grad():
        _check_forward(backend, q, k, v, rk, rv, None, torch.bfloat16)
        _check_forward(backend, q, k, v, rk, rv, idx, torch.bfloat16)


@pytest.mark.parametrize("backend", _backends())
def test_torch_compile_fullgraph_matches_eager(backend):
    """The op is one custom op with a fake impl: it traces with no graph break,
    forward and backward, with and without a page table."""
    q, k, v, rk, rv = _case(2, 8, 6, 2, 32, 3, 5, torch.float32, grad=True)
    idx = torch.tensor([[0, 2], [1, -1]], device=DEV)

    def f(q, k, v, rk, rv, idx):
        return storyattn.segment_attention(q, k, v, rk, rv, ref_index=idx, backend=backend)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for ix in (None, idx):
        e = f(q, k, v, rk, rv, ix)
        c = cf(q, k, v, rk, rv, ix)
        assert max_err(e, c) < 1e-6
        g = torch.randn_like(e)
        ge = torch.autograd.grad(e, (q, k, v, rk, rv), g)
        gc = torch.autograd.grad(c, (q, k, v, rk, rv), g)
        for a, b in zip(ge, gc):
            assert max_err(a, b) < 1e-6


def test_opcheck_custom_op():
    """torch.library.opcheck: fake impl, autograd registration and schema agree."""
    from storyattn.backends._custom_op import segment_attn_fwd
    q, k, v, rk, rv = _case(2, 5, 4, 1, 32, 2, 3, torch.float32, grad=True)
    torch.library.opcheck(segment_attn_fwd, (q, k, v, rk, rv, None, 0.2, "torch"))
    torch.library.opcheck(segment_attn_fwd, (q, k, v, rk, rv, torch.tensor([[1], [-1]]), 0.2, "torch"))


def test_head_dim_too_large_for_triton_is_value_error():
    if "triton" not in storyattn.available_backends():
        pytest.skip("triton not available")
    q = torch.randn(1, 4, 1, 320)
    with pytest.raises(ValueError, match="head_dim 320"):
        storyattn.segment_attention(q, q, q, backend="triton")


def test_inference_only_backend_refuses_grad_with_reason():
    from storyattn.backends import SegmentInputs
    from storyattn.backends._adapter import common_check
    q = torch.randn(1, 4, 1, 64, requires_grad=True)
    i = SegmentInputs(q, q, q, None, None, None, 0.1)
    assert "CUDA" in common_check(i, "flash-attn", 256)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_backward(backend, dtype):
    """All five gradients on CUDA (torch: aten flash/efficient backward with the
    merged lse; triton: fused kernels) against float64 autograd."""
    if backend not in storyattn.available_backends():
        pytest.skip(f"{backend} not available")
    B, Lq, Lk, H, D, P, Lr = 3, 200, 150, 4, 64, 3, 96
    q, k, v, rk, rv = _case(B, Lq, Lk, H, D, P, Lr, dtype, grad=True, device="cuda")
    idx = torch.tensor([[0, 2, 2], [-1, -1, -1], [1, 0, -1]], device="cuda")
    for ix in (None, idx):
        out = storyattn.segment_attention(q, k, v, rk, rv, ref_index=ix, backend=backend)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v, rk, rv), g)
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v, rk, rv)]
        ref_o, _ = segment_attention_ref(*leaves, ref_index=ix)
        want = torch.autograd.grad(ref_o, leaves, g.double())
        tol = 2e-4 if dtype == torch.float32 else 3e-2
        for name, a, b in zip(("dq", "dk", "dv", "dref_k", "dref_v"), got, want):
            scale = b.abs().max().item() + 1e-6
            assert_close_report(a / scale, b / scale, atol=tol, name=f"{backend} {name}")
