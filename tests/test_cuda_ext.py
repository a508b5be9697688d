"""The optional CUDA extension ``storyattn._C`` (csrc/) and the ``cuda`` backend.

CPU (run everywhere):
  * the CUDA sources compile with the machine's nvcc (tools/check_cuda_compile.sh,
    skipped with a message where there is no nvcc);
  * without the extension the ``cuda`` backend reports itself unavailable with
    the real import error and the build hint, and is not listed;
  * the FA3 split + masked-merge orchestration of the backend, with FA3
    replaced by a float64 stand-in.

Kernel tests run on two targets (fixture ``kern``):
  * ``emu`` -- everywhere: the real csrc/*.cu kernels and csrc/bindings.cpp
    built against the host emulation of tests/cuda_emu (CPU tensors; every CUDA
    thread an OS thread, mma.sync / ldmatrix / cp.async emulated from the PTX
    ISA's fragment layouts and completion rules, misaligned accesses caught by
    UBSan);
  * ``gpu`` (``@pytest.mark.gpu``; skipped when ``storyattn._C`` is not built):
    the same tests on the device.
Both compare against float64 references written here and against what the
same dtype achieves in torch.  Inputs are views into NaN-padded buffers, so a
read past a segment's end or of an unreferenced pool entry shows up as NaN.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import types

import pytest
import torch

import storyattn
from storyattn.backends import _cuda_ext
from storyattn.backends import SegmentInputs

# the float64 reference, the same-dtype baseline and the error every kernel test shares
from _reference import max_err, naive_same_dtype, segment_attention_ref  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HINT = "pip install -e . --no-build-isolation"


def _ext_built() -> bool:
    return _cuda_ext.extension_error() is None


needs_ext = pytest.mark.skipif(not _ext_built(), reason="storyattn._C is not built here "
                               "(needs a CUDA toolchain and a CUDA build of torch)")


# ----------------------------------------------------------------------------
# float64 reference of the merge, written from its definition (segment attention's
# is tests/_reference.py)
# ----------------------------------------------------------------------------
def ref_merge(oa, la, ob, lb, mask=None):
    """float64 merge; mask [B] or [B, L] selects rows that take segment b."""
    la, lb = la.double(), lb.double()
    if mask is not None:
        m = mask.bool()
        m = m[:, None, None] if m.dim() == 1 else m[:, None, :]
        lb = torch.where(m, lb, torch.full_like(lb, -math.inf))
    lse = torch.logaddexp(la, lb)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    wa = torch.exp(la - safe).transpose(1, 2)[..., None]
    wb = torch.exp(lb - safe).transpose(1, 2)[..., None]
    # a zero weight never reads its side (it may hold garbage)
    ta = torch.where(wa > 0, wa * torch.nan_to_num(oa.double()), torch.zeros((), dtype=torch.double))
    tb = torch.where(wb > 0, wb * torch.nan_to_num(ob.double()), torch.zeros((), dtype=torch.double))
    return ta + tb, lse


def report(actual, expected, atol, name):
    a, e = actual.double(), expected.double()
    nonfinite = ~torch.isfinite(a) & torch.isfinite(e)
    assert not nonfinite.any(), (f"{name}: {int(nonfinite.sum())} non-finite values, first at "
                                 f"{torch.nonzero(nonfinite)[0].tolist()}")
    both_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    diff = torch.where(both_inf, torch.zeros_like(a), (a - e).abs())
    if (diff > atol).any():
        flat = int(torch.argmax(diff))
        idx = [int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)]
        raise AssertionError(f"{name}: {int((diff > atol).sum())}/{diff.numel()} elements off "
                             f"by more than {atol:g}; worst at {idx}: got {a[tuple(idx)].item():.6g}"
                             f", expected {e[tuple(idx)].item():.6g}")


# ----------------------------------------------------------------------------
# CPU: build check, availability, registry
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_cuda_sources_compile():
    """Every csrc/*.cu compiles for sm_90 and the glue against torch's headers
    (the script prints 'skipped' and exits 0 where nvcc is absent).  About 30 s
    on an idle 2-core machine, over a minute when it is shared, hence ``slow``;
    CI runs tools/check_cuda_compile.sh directly as well."""
    script = os.path.join(ROOT, "tools", "check_cuda_compile.sh")
    r = subprocess.run(["bash", script], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHON": sys.executable})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "skipped: no nvcc" in out or "all CUDA sources compile" in out, out


@pytest.mark.skipif(_ext_built(), reason="storyattn._C is built here")
def test_cuda_backend_unavailable_without_extension():
    from storyattn import backends
    why = backends.get("cuda").availability()
    assert why is not None
    assert "storyattn._C" in why and HINT in why and "STORYATTN_FORCE_CUDA_BUILD=1" in why
    assert "ImportError" in why  # the real import error is kept


@pytest.mark.skipif(_ext_built() and torch.cuda.is_available(),
                    reason="the extension and a GPU are present")
def test_cuda_not_listed_and_explicit_request_explains():
    assert "cuda" not in storyattn.available_backends()
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises(RuntimeError, match="cuda"):
        storyattn.segment_attention(q, q, q, backend="cuda")


@pytest.mark.skipif(_ext_built(), reason="storyattn._C is built here")
def test_wrappers_raise_with_build_hint():
    t = torch.zeros(1, 1, 1, 2)
    lse = torch.zeros(1, 1, 1)
    for call in (lambda: _cuda_ext.merge_states_(t, lse, t, lse),
                 lambda: _cuda_ext.qk_norm_rope_cuda(t, t, None, None, t[0, :, 0], t[0, :, 0]),
                 lambda: _cuda_ext.segment_attn_fwd_cuda(t, t, t)):
        with pytest.raises(RuntimeError, match="STORYATTN_FORCE_CUDA_BUILD=1"):
            call()


def test_import_does_not_load_extension():
    code = ("import sys, storyattn; storyattn.available_backends(); "
            "print('storyattn._C' in sys.modules and sys.modules['storyattn._C'] is not None)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    if not _ext_built():
        assert r.stdout.strip() == "False"


def _fake_inputs(**kw):
    base = dict(device=torch.device("cuda"), needs_grad=False, dtype=torch.bfloat16, head_dim=128)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_check_refuses_grad_and_cpu():
    from storyattn.backends import cuda_backend
    why = cuda_backend._check(_fake_inputs(needs_grad=True))
    assert why is not None and "inference-only" in why
    why = cuda_backend._check(_fake_inputs(device=torch.device("cpu")))
    assert why is not None and "CUDA tensors" in why


# ----------------------------------------------------------------------------
# CPU: FA3 path orchestration with float64 stand-ins (FA3 and the merge)
# ----------------------------------------------------------------------------
def _torch_merge_(oa, la, ob, lb, mask=None):
    o, l = ref_merge(oa, la, ob, lb, mask)
    oa.copy_(o.to(oa.dtype))
    la.copy_(l.float())
    return oa, la


def _fake_fa3(q, k, v, softmax_scale=None, causal=False, return_attn_probs=False):
    assert not causal and return_attn_probs
    o, l = segment_attention_ref(q, k, v, scale=softmax_scale)
    return o.to(q.dtype), l.float()


@pytest.mark.parametrize("indexed", [False, True])
def test_fa3_split_merge_orchestration(monkeypatch, indexed):
    from storyattn.backends import cuda_backend
    monkeypatch.setattr(cuda_backend, "_fa3", lambda: (_fake_fa3, None))
    monkeypatch.setattr(_cuda_ext, "merge_states_", _torch_merge_)
    B, Lq, Lk, H, D, P, Lr = 3, 5, 4, 2, 16, 4, 3
    g = torch.Generator().manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v, rk, rv = mk(B, Lq, H, D), mk(B, Lk, H, D), mk(B, Lk, H, D), mk(P, Lr, H, D), mk(P, Lr, H, D)
    idx = torch.tensor([[2, -1, 2], [0, 1, 3], [-1, -1, -1]]) if indexed else None
    inputs = SegmentInputs(q, k, v, rk, rv, idx, 0.3)
    out, lse = cuda_backend.forward_fa3(inputs)
    ro, rl = segment_attention_ref(q, k, v, rk, rv, idx, scale=0.3)
    # the stand-in returns a float32 lse like FA3 does: merges are good to ~1e-7 relative
    report(out, ro, 1e-5, "out")
    report(lse, rl, 1e-5, "lse")


# ----------------------------------------------------------------------------
# Kernel targets: the host emulation everywhere, the device where built
# ----------------------------------------------------------------------------
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-5}


@pytest.fixture(params=["emu", pytest.param("gpu", marks=pytest.mark.gpu)])
def kern(request):
    """The kernels on the host emulation (fixture ``emu``, conftest.py) or the device."""
    if request.param == "gpu":
        if not _ext_built():
            pytest.skip("storyattn._C is not built here (needs a CUDA toolchain and a CUDA "
                        "build of torch)")
        return types.SimpleNamespace(name="gpu", device="cuda", emulated=False)
    return request.getfixturevalue("emu")


def _poison_allocator(kern, nbytes=1 << 26):
    """Fill a freed block with NaN so a kernel output that reuses it and misses an
    element shows NaN instead of a lucky zero (the device's caching allocator)."""
    if kern.emulated:
        return
    torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))
    torch.cuda.synchronize()


def _padded(shape, dtype, device, pad_tokens=0, pad_batch=0):
    """Random data in ``shape`` viewed out of a NaN-filled buffer with extra
    trailing tokens (axis 1) and batch rows / pool entries (axis 0)."""
    full = torch.full((shape[0] + pad_batch, shape[1] + pad_tokens, *shape[2:]), float("nan"),
                      dtype=dtype, device=device)
    view = full[: shape[0], : shape[1]]
    view.copy_(torch.randn(*shape, dtype=dtype, device=device))
    return view


# B, Lq, Lk, H, D, P, Lr: single row; partial q and key tiles; exact tiles; several
# entries at D = 128; long segments.  The last one is too slow for the emulation.
SEG_SHAPES = [
    (1, 1, 1, 1, 64, 0, 1),
    (2, 97, 33, 3, 64, 2, 17),
    (2, 64, 64, 2, 128, 1, 64),
    (3, 70, 70, 2, 128, 5, 40),
    (1, 65, 200, 1, 64, 2, 130),
    (1, 1025, 513, 2, 128, 2, 1030),
]
EMU_MAX_KEYS_X_QUERIES = 200_000


def _seg_case(shape, dtype, indexed, device):
    B, Lq, Lk, H, D, P, Lr = shape
    q = _padded((B, Lq, H, D), dtype, device, pad_tokens=3)
    k = _padded((B, Lk, H, D), dtype, device, pad_tokens=8)
    v = _padded((B, Lk, H, D), dtype, device, pad_tokens=8)
    # one more NaN pool entry after the last, and NaN tokens after each entry's Lr
    rk = _padded((P, Lr, H, D), dtype, device, pad_tokens=8, pad_batch=1) if P else None
    rv = _padded((P, Lr, H, D), dtype, device, pad_tokens=8, pad_batch=1) if P else None
    idx = None
    if indexed and P:
        # duplicates, -1 and a target with no entries at all
        idx = torch.randint(-1, P, (B, P + 1), device=device)
        idx[0, :2] = P - 1
        if B > 1:
            idx[-1] = -1
        if P > 2:
            rk[1].fill_(float("nan"))  # an entry no target names is never read
            rv[1].fill_(float("nan"))
            idx[idx == 1] = 0
    return q, k, v, rk, rv, idx


def _emu_too_big(kern, shape):
    B, Lq, Lk, H, D, P, Lr = shape
    if kern.emulated and B * H * Lq * (Lk + P * Lr) > EMU_MAX_KEYS_X_QUERIES:
        pytest.skip("too large for the host emulation (runs on the gpu target)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SEG_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("indexed", [False, True])
def test_fused_kernel_vs_float64(kern, dtype, shape, indexed):
    _emu_too_big(kern, shape)
    q, k, v, rk, rv, idx = _seg_case(shape, dtype, indexed, kern.device)
    scale = 1.0 / math.sqrt(q.shape[-1])
    _poison_allocator(kern)
    out, lse = _cuda_ext.segment_attn_fwd_cuda(q, k, v, rk, rv, idx, scale)
    ro, rl = segment_attention_ref(q, k, v, rk, rv, idx, scale)
    base = max_err(naive_same_dtype(q, k, v, rk, rv, idx, scale), ro)
    err = max_err(out, ro)
    assert out.shape == q.shape and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert err <= 2 * base + ATOL[dtype], f"err {err:.3g} vs torch same-dtype {base:.3g}"
    report(lse, rl, 2e-3, "lse")


@pytest.mark.parametrize("shape", [SEG_SHAPES[1], SEG_SHAPES[3]],
                         ids=lambda s: "x".join(map(str, s)))
def test_fused_kernel_cp_async_landing_early(emu, monkeypatch, shape):
    """The other end of cp.async's landing window: copies land when issued, so a
    tile reload that is not fenced off from the warps still reading the old tile
    corrupts their scores (the default run lands them as late as possible)."""
    monkeypatch.setenv("STORYATTN_EMU_CP_ASYNC", "early")
    q, k, v, rk, rv, idx = _seg_case(shape, torch.bfloat16, True, emu.device)
    out, lse = _cuda_ext.segment_attn_fwd_cuda(q, k, v, rk, rv, idx)
    ro, rl = segment_attention_ref(q, k, v, rk, rv, idx)
    base = max_err(naive_same_dtype(q, k, v, rk, rv, idx, 1.0 / math.sqrt(q.shape[-1])), ro)
    assert max_err(out, ro) <= 2 * base + ATOL[torch.bfloat16]
    report(lse, rl, 2e-3, "lse")


def test_fused_kernel_row_without_keys(kern):
    """No own keys and no entries for one target: out = 0, lse = -inf, no NaN."""
    dt = torch.bfloat16
    q = torch.randn(2, 5, 1, 64, dtype=dt, device=kern.device)
    k = torch.randn(2, 0, 1, 64, dtype=dt, device=kern.device)
    rk = torch.randn(2, 9, 1, 64, dtype=dt, device=kern.device)
    idx = torch.tensor([[1, -1], [-1, -1]], device=kern.device)
    out, lse = _cuda_ext.segment_attn_fwd_cuda(q, k, k, rk, rk, idx)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    ro, rl = segment_attention_ref(q[:1], k[:1], k[:1], rk, rk, idx[:1])
    assert max_err(out[:1], ro) <= 2 * ATOL[dt]
    report(lse[:1], rl, 2e-3, "lse")


@pytest.mark.parametrize("shape", SEG_SHAPES[1:4], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("indexed", [False, True])
def test_cuda_backend_kernel_path_vs_torch_backend(kern, shape, indexed):
    """The backend's kernel path, fed views the kernel cannot take as they are
    (misaligned base, odd strides): ``_kernel_ready`` copies them."""
    from storyattn.backends import cuda_backend
    q, k, v, rk, rv, idx = _seg_case(shape, torch.bfloat16, indexed, kern.device)
    B, Lq, H, D = q.shape
    # q as a slice of a fused qkv row that starts one element in: 2-byte aligned only
    qkv = torch.randn(B, Lq, H, 3 * D + 1, dtype=q.dtype, device=kern.device)
    qkv[..., 1:D + 1] = q
    q_view = qkv[..., 1:D + 1]
    inputs = SegmentInputs(q_view, k, v, rk, rv, idx, 1.0 / math.sqrt(D))
    o1, l1 = cuda_backend.forward_kernel(inputs)
    o2, l2 = storyattn.segment_attention(q_view, k, v, rk, rv, ref_index=idx, return_lse=True,
                                         backend="torch")
    ro, _ = segment_attention_ref(q, k, v, rk, rv, idx)
    # both are bf16 results of the same math: each within 2x torch's own error
    assert max_err(o1, ro) <= 2 * max_err(o2, ro) + ATOL[torch.bfloat16]
    report(l1, l2, 2e-3, "lse vs torch backend")
    if not kern.emulated:
        o3, l3 = storyattn.segment_attention(q_view, k, v, rk, rv, ref_index=idx,
                                             return_lse=True, backend="cuda")
        assert max_err(o3, ro) <= 2 * max_err(o2, ro) + ATOL[torch.bfloat16]


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("indexed", [False, True])
def test_fa3_path_vs_float64(indexed):
    from storyattn.backends import cuda_backend
    if cuda_backend.fa3_error() is not None:
        pytest.skip(cuda_backend.fa3_error())
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("FA3 needs sm_90")
    q, k, v, rk, rv, idx = _seg_case((2, 97, 33, 3, 128, 3, 50), torch.bfloat16, indexed, "cuda")
    inputs = SegmentInputs(q, k, v, rk, rv, idx, 1.0 / math.sqrt(128))
    out, lse = cuda_backend.forward_fa3(inputs)
    ro, rl = segment_attention_ref(q, k, v, rk, rv, idx)
    base = max_err(naive_same_dtype(q, k, v, rk, rv, idx, inputs.scale), ro)
    # partial outputs are rounded to bf16 before the merge: allow that rounding once more
    assert max_err(out, ro) <= 3 * base + 2 * ATOL[torch.bfloat16]
    report(lse, rl, 2e-3, "lse")


@pytest.mark.parametrize("indexed", [False, True])
def test_fa3_orchestration_with_merge_kernel(kern, monkeypatch, indexed):
    """forward_fa3 with a float64 FA3 stand-in (bf16 out, fp32 lse, as FA3 returns)
    and the real merge kernel, including its device-side mask for -1 entries."""
    from storyattn.backends import cuda_backend

    def fa3(q, k, v, softmax_scale=None, causal=False, return_attn_probs=False):
        o, l = segment_attention_ref(q, k, v, scale=softmax_scale)
        return o.to(q.dtype), l.float()

    monkeypatch.setattr(cuda_backend, "_fa3", lambda: (fa3, None))
    shape = (3, 21, 13, 2, 64, 4, 11)
    q, k, v, rk, rv, idx = _seg_case(shape, torch.bfloat16, indexed, kern.device)
    inputs = SegmentInputs(q, k, v, rk, rv, idx, 0.125)
    out, lse = cuda_backend.forward_fa3(inputs)
    ro, rl = segment_attention_ref(q, k, v, rk, rv, idx, scale=0.125)
    base = max_err(naive_same_dtype(q, k, v, rk, rv, idx, 0.125), ro)
    assert torch.isfinite(out).all()
    assert max_err(out, ro) <= 3 * base + 2 * ATOL[torch.bfloat16]
    report(lse, rl, 1e-5, "lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [72, 128])
@pytest.mark.parametrize("mask_kind", [None, "batch", "row"])
def test_merge_states_vs_float64(kern, dtype, D, mask_kind):
    dev = kern.device
    B, L, H = 3, 37, 4
    oa = torch.randn(B, L, H, D, device=dev, dtype=dtype)
    ob = torch.randn(B, L, H, D, device=dev, dtype=dtype)
    la = torch.randn(B, H, L, device=dev) * 3
    # lse_b as a strided (permuted) view, the way a folded pool call returns it
    lb = (torch.randn(H, B, L, device=dev) * 3).permute(1, 0, 2)
    la[0, :, :5] = -math.inf      # a side with no keys ...
    lb[0, :, :3] = -math.inf      # ... and rows with none on either side
    ob[0, :3] = float("nan")      # never read: zero weight
    mask = None
    if mask_kind == "batch":
        mask = torch.tensor([True, False, True], device=dev)
        ob[1] = float("nan")      # masked out entirely: must not leak
    elif mask_kind == "row":
        mask = torch.rand(B, L, device=dev) > 0.5
    ro, rl = ref_merge(oa, la, ob, lb, mask)
    _cuda_ext.merge_states_(oa, la, ob, lb, mask)
    assert torch.isfinite(oa).all()
    assert (oa[0, :3] == 0).all() and torch.isneginf(la[0, :, :3]).all()
    report(oa, ro, ATOL[dtype], "out")
    report(la, rl, 1e-5, "lse")


@pytest.mark.parametrize("layout", ["offset", "narrow"])
def test_merge_states_strided_out(kern, layout):
    """out_a / out_b as views of wider rows.  offset: one element in (strides
    fit 8-wide vectors, the address does not): the scalar path.  narrow: the first 36
    of 40 bf16 columns -- strides fit 8-wide vectors but D does not: still the
    scalar path.  Answers as for contiguous tensors, and the columns outside the
    view are never written."""
    dev = kern.device
    B, L, H = 2, 9, 3
    if layout == "offset":
        D, dt = 40, torch.bfloat16
        big_a = torch.randn(B, L, H, 48, device=dev, dtype=dt)
        big_b = torch.randn(B, L, H, 48, device=dev, dtype=dt)
        oa, ob = big_a[..., 1:D + 1], big_b[..., :D]
        outside = torch.cat([big_a[..., :1], big_a[..., D + 1:]], -1)
    else:
        D, dt = 36, torch.bfloat16
        big_a = torch.randn(B, L, H, 40, device=dev, dtype=dt)
        big_b = torch.randn(B, L, H, 40, device=dev, dtype=dt)
        oa, ob = big_a[..., :D], big_b[..., :D]
        outside = big_a[..., D:]
    la, lb = torch.randn(B, H, L, device=dev), torch.randn(B, H, L, device=dev)
    ro, rl = ref_merge(oa.clone(), la.clone(), ob, lb)
    untouched = outside.clone()
    _cuda_ext.merge_states_(oa, la, ob, lb)
    report(oa, ro, ATOL[dt], "out")
    report(la, rl, 1e-5, "lse")
    if layout == "offset":
        outside = torch.cat([big_a[..., :1], big_a[..., D + 1:]], -1)
    assert torch.equal(outside, untouched)


@pytest.mark.gpu
@needs_ext
def test_merge_states_cuda_graph_mask():
    """One captured merge, steered by rewriting the mask between replays."""
    B, L, H, D = 2, 16, 2, 64
    oa0 = torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16)
    la0 = torch.randn(B, H, L, device="cuda")
    ob = torch.randn_like(oa0)
    lb = torch.randn_like(la0)
    oa, la = oa0.clone(), la0.clone()
    mask = torch.zeros(B, dtype=torch.bool, device="cuda")
    _cuda_ext.merge_states_(oa, la, ob, lb, mask)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _cuda_ext.merge_states_(oa, la, ob, lb, mask)
    for m in ([False, False], [True, False], [True, True]):
        oa.copy_(oa0)
        la.copy_(la0)
        mask.copy_(torch.tensor(m))
        graph.replay()
        ro, rl = ref_merge(oa0, la0, ob, lb, torch.tensor(m, device="cuda"))
        report(oa, ro, ATOL[torch.bfloat16], f"out mask={m}")
        report(la, rl, 1e-5, f"lse mask={m}")


def _qk_ref(x, weight, cos, sin, eps, round_before_w=False):
    """diffusers' chain in torch: fp32 norm, rounded to x's dtype, fp32 rotation."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        if round_before_w:
            y = y.to(x.dtype).float()
        y = y * weight.float()
    y = y.to(x.dtype).float()
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    rot = torch.stack([-y[..., 1::2], y[..., 0::2]], dim=-1).flatten(-2)
    return (y * c + rot * s).to(x.dtype)


def _rope_tables(L, D, device, theta=10000.0, offset=0.0):
    pos = torch.arange(L, dtype=torch.float64) + offset
    freqs = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.outer(pos, freqs).repeat_interleave(2, dim=-1)
    return ang.cos().float().to(device), ang.sin().float().to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [40, 64, 128, 256])
@pytest.mark.parametrize("inplace", [False, True])
def test_qk_norm_rope_vs_torch_chain(kern, dtype, D, inplace):
    dev = kern.device
    B, L, H = 2, 33, 3
    q = torch.randn(B, L, H, D, device=dev, dtype=dtype) * 3
    k = torch.randn(B, L, H, D, device=dev, dtype=dtype)
    wq = torch.rand(D, device=dev, dtype=dtype) + 0.5
    wk = torch.rand(D, device=dev, dtype=torch.float32) + 0.5
    cos, sin = _rope_tables(L, D, dev)
    rq, rk = _qk_ref(q, wq, cos, sin, 1e-6), _qk_ref(k, wk, cos, sin, 1e-6)
    qo, ko = _cuda_ext.qk_norm_rope_cuda(q.clone() if inplace else q, k.clone() if inplace else k,
                                         wq, wk, cos, sin, 1e-6, inplace=inplace)
    # equal up to the order of the fp32 sum of squares: one unit in the last place
    ulp = {torch.float32: 1e-5, torch.float16: 2 ** -9, torch.bfloat16: 2 ** -6}[dtype]
    report(qo, rq, ulp * 8, "q")
    report(ko, rk, ulp * 4, "k")
    if dtype != torch.float32:
        # a 16-bit rounding flips only where the fp32 sums differ right at a tie
        assert (qo != rq).float().mean() < 0.01 and (ko != rk).float().mean() < 0.01


def test_qk_norm_rope_round_before_weight_and_strided(kern):
    """diffusers' RMSNorm with a half weight (round, then multiply), no k, and q
    as a head-sliced view of a fused projection (strided rows)."""
    dev, dt = kern.device, torch.float16
    B, L, H, D = 2, 7, 2, 64
    fused = torch.randn(B, L, H, 3 * D, device=dev, dtype=dt)
    q = fused[..., D:2 * D]
    w = torch.rand(D, device=dev, dtype=dt) + 0.5
    cos, sin = _rope_tables(L, D, dev)
    want = _qk_ref(q, w, cos, sin, 1e-6, round_before_w=True)
    others = fused[..., :D].clone(), fused[..., 2 * D:].clone()
    qo, ko = _cuda_ext.qk_norm_rope_cuda(q, None, w, None, cos, sin, 1e-6, inplace=True,
                                         q_round_before_weight=True)
    assert ko is None and qo.data_ptr() == q.data_ptr()
    report(qo, want, 2 ** -9 * 8, "q")
    assert torch.equal(fused[..., :D], others[0]) and torch.equal(fused[..., 2 * D:], others[1])


@pytest.mark.parametrize("extra", [False, True])
def test_qk_norm_rope_pool_write(kern, extra):
    dev = kern.device
    B, Ltxt, Limg, H, D, P = 3, 5, 12, 2, 64, 4
    L = Ltxt + Limg
    dt = torch.bfloat16
    q = torch.randn(B, L, H, D, device=dev, dtype=dt)
    k = torch.randn(B, L, H, D, device=dev, dtype=dt)
    v = torch.randn(B, L, H, D, device=dev, dtype=dt)
    w = torch.rand(D, device=dev, dtype=dt) + 0.5
    cos, sin = _rope_tables(L, D, dev)
    pool_k = torch.full((P, Limg, H, D), float("nan"), device=dev, dtype=dt)
    pool_v = torch.full_like(pool_k, float("nan"))
    ids = torch.tensor([2, -1, 0], device=dev)
    ec = es = None
    if extra:
        c1, s1 = _rope_tables(B, D, dev, offset=1.0)  # row b placed at index position b + 1
        ec, es = c1, s1
    qo, ko = _cuda_ext.qk_norm_rope_cuda(q, k, w, w, cos, sin, 1e-6, v=v, pool_k=pool_k,
                                         pool_v=pool_v, entry_ids=ids, img_start=Ltxt,
                                         extra_cos=ec, extra_sin=es)
    report(ko, _qk_ref(k, w, cos, sin, 1e-6), 2 ** -6 * 4, "k")
    for b, e in ((0, 2), (2, 0)):
        want_k = ko[b, Ltxt:]
        if extra:
            y = want_k.float()
            rot = torch.stack([-y[..., 1::2], y[..., 0::2]], dim=-1).flatten(-2)
            want_k = (y * ec[b] + rot * es[b]).to(dt)
        report(pool_k[e], want_k, 2 ** -6 * 4, f"pool_k[{e}]")
        assert torch.equal(pool_v[e], v[b, Ltxt:])
    # entries nobody wrote stay untouched
    assert torch.isnan(pool_k[1]).all() and torch.isnan(pool_k[3]).all()
    assert torch.isnan(pool_v[1]).all()


def test_bad_inputs_raise_clear_errors(kern):
    dev = kern.device
    q = torch.randn(1, 8, 2, 64, device=dev, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128"):
        _cuda_ext.segment_attn_fwd_cuda(q[..., :32].contiguous(), q[..., :32].contiguous(),
                                        q[..., :32].contiguous())
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        _cuda_ext.segment_attn_fwd_cuda(q.float(), q.float(), q.float())
    other = q.to("meta") if kern.emulated else q.cpu()
    with pytest.raises(RuntimeError, match="CPU tensor" if kern.emulated else "CUDA tensor"):
        _cuda_ext.segment_attn_fwd_cuda(q, other, q)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        buf = torch.randn(1 * 8 * 2 * 64 + 1, device=dev, dtype=torch.bfloat16)
        _cuda_ext.segment_attn_fwd_cuda(q, buf[1:].view(1, 8, 2, 64), q)
    with pytest.raises(RuntimeError, match="ref_index was given but there is no reference pool"):
        _cuda_ext.segment_attn_fwd_cuda(q, q, q, ref_index=torch.zeros(1, 1, dtype=torch.long,
                                                                       device=dev))
    lse = torch.zeros(1, 2, 8, device=dev)
    with pytest.raises(RuntimeError, match="lse_b must be"):
        _cuda_ext.merge_states_(q.clone(), lse, q, lse[:, :1])
    with pytest.raises(RuntimeError, match="mask must be"):
        _cuda_ext.merge_states_(q.clone(), lse, q, lse, torch.ones(3, 3, dtype=torch.bool,
                                                                   device=dev))
    cos = torch.zeros(8, 64, device=dev)
    with pytest.raises(RuntimeError, match="cos must be"):
        _cuda_ext.qk_norm_rope_cuda(q, q, None, None, cos[:4], cos[:4])
    with pytest.raises(RuntimeError, match="a pool write needs"):
        _cuda_ext.qk_norm_rope_cuda(q, q, None, None, cos, cos, pool_k=q)
