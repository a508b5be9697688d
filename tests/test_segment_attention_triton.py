"""Fused Triton segment attention (``backend="triton"``): forward, lse and all
five gradients against a float64 reference built by literal concatenation.

On a machine without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set by
conftest.py before triton is imported), so the default cases are tiny; the
``slow`` case uses length 1025 and the ``gpu`` cases run FLUX-like bf16 shapes.

Tolerance (STYLE.md): ``err(triton) <= 2 * err(torch in the same dtype) + atol``,
both measured against the float64 reference on the same (rounded) inputs.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import storyattn  # noqa: E402
from storyattn import backends  # noqa: E402
from storyattn.backends import _custom_op as _op  # noqa: E402
from storyattn.backends import SegmentInputs  # noqa: E402
from storyattn.backends import triton_backend as tb  # noqa: E402
from storyattn.kernels import segment_attn as K  # noqa: E402

# the float64 reference and the same-dtype baseline every segment-attention test shares
from _reference import naive_same_dtype  # noqa: E402
from _reference import segment_attention_ref as ref_fp64  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

if DEV == "cpu" and not K.interpreted():
    pytest.skip("triton kernels were imported without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
# Absolute slack on top of 2x torch's own error, as a fraction of the reference's
# largest magnitude (about one ulp of the dtype at that magnitude): the kernels
# round P and dS to the input dtype before the tensor-core products, as
# FlashAttention does, while torch's CPU SDPA keeps them in fp32; in bf16 that
# alone can exceed 2x torch's (half-ulp) output error.
_ATOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_close_to_ref(name, ours, naive, ref, dtype):
    """``err(ours) <= 2 err(naive) + atol`` against ``ref``, with a report naming
    the worst element and any non-finite values."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == dtype, f"{name}: dtype {ours.dtype} != {dtype}"
    o = ours.double()
    bad = ~torch.isfinite(o)
    if bad.any():
        first = torch.nonzero(bad)[0].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} non-finite values, first at {first}")
    diff = (o - ref).abs()
    err = diff.max().item()
    err_naive = (naive.double() - ref).abs().max().item()
    atol = _ATOL[dtype] * max(ref.abs().max().item(), 1e-3)
    bound = 2 * err_naive + atol
    if err > bound:
        worst = list(torch.unravel_index(torch.argmax(diff), diff.shape))
        worst = tuple(int(i) for i in worst)
        raise AssertionError(
            f"{name}: max err {err:.3g} > 2*{err_naive:.3g} (torch {dtype}) + {atol:.3g}; "
            f"worst at {worst}: got {o[worst].item():.6g}, expected {ref[worst].item():.6g}")


def make_inputs(B, Lq, Lk, H, D, P, Lr, dtype, device=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(B, Lq, H, D), rnd(B, Lk, H, D), rnd(B, Lk, H, D)
    if P is None:
        return q, k, v, None, None
    return q, k, v, rnd(P, Lr, H, D), rnd(P, Lr, H, D)


def run_case(B, Lq, Lk, H, D, P, Lr, dtype, ref_index=None, grads=True, device=DEV, seed=0):
    """Forward + lse + five gradients of the triton backend vs the references."""
    q, k, v, rk, rv = make_inputs(B, Lq, Lk, H, D, P, Lr, dtype, device, seed)
    if ref_index is not None:
        ref_index = torch.as_tensor(ref_index, dtype=torch.int64, device=device)
    scale = D ** -0.5
    leaves = [t for t in (q, k, v, rk, rv) if t is not None]

    # fp64 reference on the same rounded inputs.
    l64 = [t.detach().double().requires_grad_(grads) for t in leaves]
    q64, k64, v64 = l64[:3]
    rk64, rv64 = (l64[3], l64[4]) if rk is not None else (None, None)
    out64, lse64 = ref_fp64(q64, k64, v64, rk64, rv64, ref_index, scale)

    # torch in the same dtype.
    ln = [t.detach().clone().requires_grad_(grads) for t in leaves]
    qn, kn, vn = ln[:3]
    rkn, rvn = (ln[3], ln[4]) if rk is not None else (None, None)
    outn = naive_same_dtype(qn, kn, vn, rkn, rvn, ref_index, scale)

    # ours, through the public op's custom-op autograd around the triton kernels.
    lt = [t.detach().clone().requires_grad_(grads) for t in leaves]
    qt, kt, vt = lt[:3]
    rkt, rvt = (lt[3], lt[4]) if rk is not None else (None, None)
    inputs = SegmentInputs(qt, kt, vt, rkt, rvt, ref_index, scale)
    assert tb._check(inputs) is None
    out, lse = _op.run(backends.get("triton"), inputs)

    assert lse.dtype == torch.float32 and lse.shape == (B, H, Lq)
    assert_close_to_ref("out", out, outn, out64.detach(), dtype)
    lse_err = (lse.double() - lse64.detach()).abs().max().item()
    assert torch.isfinite(lse).all(), "lse has non-finite values"
    assert lse_err <= 1e-4 * max(1.0, lse64.abs().max().item()), f"lse err {lse_err:.3g}"
    if not grads:
        return
    do64 = torch.randn(out64.shape, generator=torch.Generator().manual_seed(seed + 1),
                       dtype=torch.float64).to(device)
    do = do64.to(dtype)
    g64 = torch.autograd.grad(out64, l64, do.double())
    gn = torch.autograd.grad(outn, ln, do)
    gt = torch.autograd.grad(out, lt, do)
    for name, a, n, r in zip(["dq", "dk", "dv", "dref_k", "dref_v"], gt, gn, g64):
        assert_close_to_ref(name, a, n, r, dtype)


_ALL = [torch.float32, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------- #
# Forward + backward over odd shapes
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", _ALL, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", [
    # B, Lq, Lk, H, D, P, Lr, ref_index
    dict(B=2, Lq=16, Lk=16, H=2, D=32, P=None, Lr=0, idx=None),            # no pool
    dict(B=2, Lq=97, Lk=33, H=2, D=40, P=1, Lr=17, idx=None),              # Lq != Lk, P = 1
    dict(B=3, Lq=1, Lk=97, H=1, D=64, P=5, Lr=8,                           # R < P, dup, -1, all -1
         idx=[[4, -1, 4], [-1, -1, -1], [0, 2, 1]]),
    dict(B=2, Lq=20, Lk=1, H=2, D=72, P=5, Lr=17, idx=None),               # one own key
], ids=["P0-d32", "P1-d40-Lq97", "P5-d64-dup-neg", "P5-d72-Lk1"])
def test_forward_backward(case, dtype):
    run_case(case["B"], case["Lq"], case["Lk"], case["H"], case["D"], case["P"], case["Lr"],
             dtype, ref_index=case["idx"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_head_dim_128(dtype):
    run_case(2, 17, 21, 1, 128, 3, 16, dtype, ref_index=[[2, 0], [1, -1]])


def test_head_dim_256_and_tiny_head_dim():
    run_case(1, 9, 18, 1, 256, 2, 5, torch.float16, ref_index=[[1, 1]])
    # Head dims below the 16-wide dot minimum are padded and masked too.
    run_case(2, 7, 5, 2, 8, 2, 3, torch.float32)


def test_forward_only_no_grad_path():
    """Without grad the backend calls the launcher directly (no autograd graph)."""
    run_case(2, 33, 10, 2, 32, 3, 9, torch.bfloat16, ref_index=[[0, 1, 2], [2, -1, 2]],
             grads=False)


def test_all_rows_empty_equals_own_keys_only():
    """A page table of only -1 entries means attention over the own keys alone,
    and the pool gets an exactly-zero gradient."""
    q, k, v, rk, rv = make_inputs(2, 9, 13, 2, 32, 3, 7, torch.float32)
    idx = torch.full((2, 4), -1, dtype=torch.int64, device=DEV)
    out, lse = K.segment_attn_fwd(q, k, v, rk, rv, idx, 0.3)
    out0, lse0 = K.segment_attn_fwd(q, k, v, None, None, None, 0.3)
    torch.testing.assert_close(out, out0, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse0, rtol=0, atol=0)
    do = torch.randn_like(out)
    g = K.segment_attn_bwd(do, q, k, v, rk, rv, idx, out, lse, 0.3)
    g0 = K.segment_attn_bwd(do, q, k, v, None, None, None, out0, lse0, 0.3)
    for a, b in zip(g[:3], g0[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert g0[3] is None and g0[4] is None
    assert torch.count_nonzero(g[3]) == 0 and torch.count_nonzero(g[4]) == 0


def test_duplicate_entry_equals_two_copies_in_pool():
    """Reading entry j twice is the same as reading two identical entries; the
    gradient of j is the sum of the two copies' gradients; unread entries get 0."""
    q, k, v, rk, rv = make_inputs(2, 11, 6, 2, 32, 3, 5, torch.float32)
    scale = 32 ** -0.5
    idx = torch.tensor([[1, 1], [1, -1]], device=DEV)
    pool2_k = torch.stack([rk[1], rk[1]])
    pool2_v = torch.stack([rv[1], rv[1]])
    idx2 = torch.tensor([[0, 1], [0, -1]], device=DEV)
    out, lse = K.segment_attn_fwd(q, k, v, rk, rv, idx, scale)
    out2, lse2 = K.segment_attn_fwd(q, k, v, pool2_k, pool2_v, idx2, scale)
    torch.testing.assert_close(out, out2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, lse2, rtol=1e-6, atol=1e-6)
    do = torch.randn_like(out)
    g = K.segment_attn_bwd(do, q, k, v, rk, rv, idx, out, lse, scale)
    g2 = K.segment_attn_bwd(do, q, k, v, pool2_k, pool2_v, idx2, out2, lse2, scale)
    torch.testing.assert_close(g[3][1], g2[3][0] + g2[3][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[4][1], g2[4][0] + g2[4][1], rtol=1e-5, atol=1e-6)
    for j in (0, 2):
        assert torch.count_nonzero(g[3][j]) == 0 and torch.count_nonzero(g[4][j]) == 0


def test_lse_is_natural_log():
    """lse = log(sum exp(scale * q.k)) in base e (not base 2 as used inside)."""
    q, k, v, rk, rv = make_inputs(1, 5, 7, 1, 16, 2, 3, torch.float32)
    scale = 0.7
    _, lse = K.segment_attn_fwd(q, k, v, rk, rv, None, scale)
    keys = torch.cat([k[0], rk[0], rk[1]]).double()
    s = torch.einsum("mhd,nhd->hmn", q[0].double(), keys) * scale
    expected = s.exp().sum(-1).log()
    torch.testing.assert_close(lse[0].double(), expected, rtol=1e-6, atol=1e-6)


class _PoisonTorch:
    """Stands in for ``torch`` inside the kernel module: every buffer the
    launchers allocate with empty/empty_like starts as NaN, so an element the
    kernels fail to write shows up as NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    @staticmethod
    def empty_like(*args, **kwargs):
        t = torch.empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_poisoned_buffers_fully_written(monkeypatch, dtype):
    monkeypatch.setattr(K, "torch", _PoisonTorch())
    run_case(3, 19, 18, 2, 40, 4, 17, dtype, ref_index=[[3, -1], [-1, -1], [0, 3]])


def test_backward_is_deterministic():
    q, k, v, rk, rv = make_inputs(3, 21, 9, 2, 32, 2, 18, torch.float32)
    idx = torch.tensor([[0, 1], [1, 1], [1, 0]], device=DEV, dtype=torch.int32)  # int32 is fine too
    out, lse = K.segment_attn_fwd(q, k, v, rk, rv, idx, 0.2)
    do = torch.randn_like(out)
    a = K.segment_attn_bwd(do, q, k, v, rk, rv, idx, out, lse, 0.2)
    b = K.segment_attn_bwd(do, q, k, v, rk, rv, idx, out, lse, 0.2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_non_contiguous_inputs_and_empty_pool_tensor():
    """Strided views are accepted (the launcher makes them contiguous); an empty
    pool tensor (P = 0) behaves like no pool (it gets no gradient)."""
    base = torch.randn(2, 2, 12, 32, device=DEV)          # [B, H, L, D] -> view [B, L, H, D]
    q = base.transpose(1, 2).requires_grad_()
    k = torch.randn(2, 6, 2, 32, device=DEV, requires_grad=True)
    v = torch.randn(2, 6, 2, 32, device=DEV, requires_grad=True)
    rk = torch.zeros(0, 4, 2, 32, device=DEV, requires_grad=True)
    rv = torch.zeros(0, 4, 2, 32, device=DEV, requires_grad=True)
    out, lse = storyattn.segment_attention(q, k, v, rk, rv, scale=0.25, return_lse=True,
                                           backend="triton")
    out64, lse64 = ref_fp64(q.detach(), k.detach(), v.detach(), None, None, None, 0.25)
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert rk.grad is None or rk.grad.numel() == 0
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_lse_not_differentiable():
    q, k, v, rk, rv = make_inputs(1, 4, 4, 1, 16, 1, 4, torch.float32)
    q.requires_grad_()
    out, lse = _op.run(backends.get("triton"), SegmentInputs(q, k, v, rk, rv, None, 0.25))
    assert out.requires_grad and not lse.requires_grad


def test_launch_retries_smaller_config_when_shared_memory_runs_out():
    """GPUs with ~100 KB of shared memory reject the Hopper-sized blocks: the
    launcher drops to one stage, then halves the blocks, and re-raises at 16."""
    from triton.runtime.errors import OutOfResources

    class FakeKernel:
        def __init__(self, fail_while):
            self.fail_while, self.calls = fail_while, []

        def __getitem__(self, grid):
            def run(*args, **kw):
                self.calls.append((grid, kw["BLOCK_M"], kw["BLOCK_N"], kw["num_stages"]))
                if self.fail_while(kw):
                    raise OutOfResources(300_000, 101_376, "shared memory")
            return run

    fk = FakeKernel(lambda kw: kw["BLOCK_M"] > 32)
    cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    K._launch(fk, "fwd", lambda c: (1000 // c["BLOCK_M"],), cfg, 1, 2, X=3)
    assert fk.calls == [((7,), 128, 64, 3), ((7,), 128, 64, 1), ((15,), 64, 32, 1),
                        ((31,), 32, 16, 1)]
    with pytest.raises(OutOfResources):
        K._launch(FakeKernel(lambda kw: True), "fwd", lambda c: (1,), cfg, 1)


def test_autotune_wrappers_build():
    """STORYATTN_TRITON_AUTOTUNE=1 (CUDA) wraps each kernel in triton.autotune;
    the wrappers must name real kernel arguments in their keys (checked when
    they are built; running them needs a GPU)."""
    for kernel, kind in [(K._segment_attn_fwd_kernel, "fwd"), (K._segment_attn_bwd_dq_kernel, "dq"),
                         (K._segment_attn_bwd_dkdv_kernel, "dkdv")]:
        tuned = K._autotuned(kernel, kind)
        assert len(tuned.configs) >= 4 and all("BLOCK_M" in c.kwargs for c in tuned.configs)


# --------------------------------------------------------------------------- #
# Backend registration and checks
# --------------------------------------------------------------------------- #
def test_registered_and_checks(monkeypatch):
    from storyattn import backends

    be = backends.get("triton")
    assert be.availability() is None
    assert be.priority == {"cuda": 50, "cpu": 1}
    q, k, v, rk, rv = make_inputs(1, 4, 4, 1, 16, 1, 4, torch.float32)
    assert be.check(SegmentInputs(q, k, v, rk, rv, None, 0.25)) is None

    big = torch.zeros(1, 2, 1, 320, device=DEV)
    assert "head_dim 320 > 256" in be.check(SegmentInputs(big, big, big, None, None, None, 1.0))
    d64 = q.double()
    assert "float64" in be.check(SegmentInputs(d64, d64, d64, None, None, None, 1.0))

    cpu = torch.zeros(1, 2, 1, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = be.check(SegmentInputs(cpu, cpu, cpu, None, None, None, 1.0))
    assert why is not None and "TRITON_INTERPRET=1" in why and "cpu" in why


def test_public_op_uses_triton_backend():
    storyattn = pytest.importorskip("storyattn")
    q, k, v, rk, rv = make_inputs(2, 9, 7, 2, 32, 3, 5, torch.float32)
    idx = torch.tensor([[2, -1], [0, 0]], device=DEV)
    out, lse = storyattn.segment_attention(q, k, v, rk, rv, ref_index=idx, return_lse=True,
                                           backend="triton")
    out64, lse64 = ref_fp64(q, k, v, rk, rv, idx, 32 ** -0.5)
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# Larger cases
# --------------------------------------------------------------------------- #
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_length_1025(dtype):
    run_case(2, 1025, 1025, 1, 64, 2, 1025, dtype, ref_index=[[1, -1], [0, 1]])


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 72, 128, 256])
def test_gpu_bf16_flux_like(D):
    """bf16 on CUDA: text+image own tokens, shared image-token references."""
    run_case(2, 1536, 1536, 4, D, 3, 1024, torch.bfloat16, ref_index=[[0, 2, -1], [1, 1, 2]],
             device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _ALL, ids=["fp32", "fp16", "bf16"])
def test_gpu_all_targets_read_pool(dtype):
    run_case(4, 1025, 513, 3, 128, 2, 1000, dtype, device="cuda")
