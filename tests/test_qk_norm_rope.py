"""Fused q/k RMSNorm + RoPE (storyattn.rope, storyattn.kernels.qk_norm_rope).

Checked against diffusers' own FLUX path (FluxAttention's norm_q/norm_k, then
``apply_rotary_emb(..., sequence_dim=1)`` with ``FluxPosEmbed`` tables) and an
independent float64 reference written with complex multiplication.  The cache write, the
placement helpers and the registry / custom op are test_qk_norm_rope_cache.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxPosEmbed

from storyattn.rope import (qk_norm_rope, qk_norm_rope_into_cache, reference_key_rotary,
                            rotate_keys)

BACKENDS = ["torch", "triton"]
# "cuda" = csrc/qk_norm_rope.cu through storyattn._C; here on CPU tensors through the
# host emulation of tests/cuda_emu (fixture ``emu``), on a GPU machine the same.
# Only where the kernel's contract holds: both norms, a rotation, one eps.
FUSED = ["torch", "triton", "cuda"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEAD_DIMS = [32, 40, 64, 128]
EPS = 1e-6


# ----------------------------------------------------------------------------- helpers

def flux_axes(head_dim):
    """Three even axis widths summing to head_dim, shaped like FLUX's [16, 56, 56]."""
    if head_dim == 128:
        return [16, 56, 56]
    a0 = 2 * max(1, head_dim // 16)
    a1 = (head_dim - a0) // 4 * 2
    return [a0, a1, head_dim - a0 - a1]


def flux_ids(text_len, rows, cols, index=0):
    """FLUX position ids: text all zero, image (index, row, col)."""
    txt = torch.zeros(text_len, 3)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    img = torch.stack([torch.full_like(r, index), r, c], -1).reshape(-1, 3).float()
    return torch.cat([txt, img])


def make_norm(head_dim, dtype=torch.float32, kind="torch", seed=0):
    if kind == "torch":
        norm = torch.nn.RMSNorm(head_dim, eps=EPS)
    elif kind == "torch_noaffine":
        norm = torch.nn.RMSNorm(head_dim, eps=EPS, elementwise_affine=False)
    elif kind == "diffusers":
        norm = DiffusersRMSNorm(head_dim, eps=EPS)
    else:
        raise AssertionError(kind)
    if norm.weight is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(head_dim, generator=g) * 1.5 + 0.25)
    return norm.to(dtype)


def make_case(B=2, text_len=3, rows=2, cols=2, H=3, D=64, dtype=torch.float32,
              norm_dtype=None, kind="torch", device="cpu"):
    L = text_len + rows * cols
    q = (torch.randn(B, L, H, D) * 3 + 0.5).to(dtype).to(device)
    k = (torch.randn(B, L, H, D) * 2).to(dtype).to(device)
    norm_q = make_norm(D, norm_dtype or dtype, kind, seed=1).to(device)
    norm_k = make_norm(D, norm_dtype or dtype, kind, seed=2).to(device)
    pos = FluxPosEmbed(theta=10000, axes_dim=flux_axes(D))
    rot = pos(flux_ids(text_len, rows, cols).to(device))
    return q, k, norm_q, norm_k, rot, pos


def diffusers_path(q, k, norm_q, norm_k, rot):
    """Exactly the lines of FluxAttnProcessor (norm, then apply_rotary_emb)."""
    with torch.no_grad():
        q = norm_q(q) if norm_q is not None else q
        k = norm_k(k) if norm_k is not None else k
        return (apply_rotary_emb(q, rot, sequence_dim=1),
                apply_rotary_emb(k, rot, sequence_dim=1))


def ref64(x, weight, eps, rot):
    """float64 RMSNorm + RoPE, the rotation written as complex multiplication."""
    x = x.double()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.double()
    if rot is None:
        return y
    cos, sin = (t.double() for t in rot)
    z = torch.view_as_complex(y.unflatten(-1, (-1, 2)).contiguous())
    c = torch.complex(cos[:, 0::2], sin[:, 0::2])[None, :, None, :]
    return torch.view_as_real(z * c).flatten(-2)


def ulp_close(actual, expected, ulps=1):
    """Element-wise |a - e| <= ulps * eps(dtype) * (|e| + max |e| over the head row).

    The second term is one ulp of the row's scale: an fp32 sum of squares added
    in another order can move the norm output by one ulp before the rotation,
    and a rotation that cancels two O(row scale) products carries that ulp into
    a result whose own ulp is much smaller.
    """
    eps = torch.finfo(expected.dtype).eps
    a, e = actual.double(), expected.double()
    scale = e.abs().amax(-1, keepdim=True) if e.dim() else e.abs()
    return (a - e).abs() <= ulps * eps * (e.abs() + scale)


def report(actual, expected, what=""):
    """Worst mismatch with its index, and NaN/inf counts, for assertion messages."""
    a, e = actual.double(), expected.double()
    diff = (a - e).abs().nan_to_num(float("inf"))
    i = int(diff.flatten().argmax())
    idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), diff.shape))
    return (f"{what}: max |diff| {diff.max().item():.3g} at {idx} "
            f"(actual {a[idx].item():.6g}, expected {e[idx].item():.6g}); "
            f"nan {int(a.isnan().sum())} inf {int(a.isinf().sum())}; "
            f"mismatches {int((a != e).sum())}/{a.numel()}")


def assert_matches_diffusers(out, want, ulps=None):
    """Half dtypes within 1 ulp (and nearly all bit-equal); fp32 within 4 ulps,
    since the fp32 norm itself (sum order, sqrt/rsqrt) may differ by a few."""
    if ulps is None:
        ulps = 4 if want.dtype == torch.float32 else 1
    assert out.dtype == want.dtype, (out.dtype, want.dtype)
    assert out.shape == want.shape
    ok = ulp_close(out, want, ulps)
    assert bool(ok.all()), report(out, want, "vs diffusers")
    if want.dtype != torch.float32 and want.numel():
        # Half dtypes: the kernel rounds exactly where diffusers rounds, so all but
        # the rare sum-order ties must be bit-identical.
        frac = (out != want).double().mean().item()
        assert frac <= 1e-3, f"{frac:.2%} of the elements differ: " + report(out, want, "")


def assert_vs_float64(out, want, exact, dtype):
    """STYLE.md: err(ours) <= 2 * err(diffusers, same dtype) + atol, both vs float64."""
    err = (out.double() - exact).abs().max().item()
    base = (want.double() - exact).abs().max().item()
    atol = 4 * torch.finfo(dtype).eps
    assert err <= 2 * base + atol, f"float64 error {err:.3g} vs diffusers' {base:.3g}"


@pytest.fixture(autouse=True)
def _cuda_backend_on_the_emulation(request):
    """backend="cuda" runs csrc/ through the host emulation (CPU tensors)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "cuda":
        request.getfixturevalue("emu")


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_matches_diffusers_and_float64(backend, dtype, D):
    q, k, nq, nk, rot, _ = make_case(D=D, dtype=dtype)
    want_q, want_k = diffusers_path(q, k, nq, nk, rot)
    with torch.no_grad():
        out_q, out_k = qk_norm_rope(q, k, nq, nk, rot, backend=backend)
    assert_matches_diffusers(out_q, want_q)
    assert_matches_diffusers(out_k, want_k)
    if backend == "torch":  # same ops in the same order: bit for bit
        assert torch.equal(out_q, want_q) and torch.equal(out_k, want_k)
    assert_vs_float64(out_q, want_q, ref64(q, nq.weight, EPS, rot), dtype)
    assert_vs_float64(out_k, want_k, ref64(k, nk.weight, EPS, rot), dtype)


@pytest.mark.parametrize("backend", FUSED)
def test_flux_attention_modules(backend):
    """The norms of a real FluxAttention (its eps and class), bf16 weights as in a bf16 model."""
    attn = FluxAttention(query_dim=96, heads=3, dim_head=32, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        attn.norm_q.weight.uniform_(0.5, 1.5)
        attn.norm_k.weight.uniform_(0.5, 1.5)
    q, k, _, _, rot, _ = make_case(D=32, dtype=torch.bfloat16)
    want = diffusers_path(q, k, attn.norm_q, attn.norm_k, rot)
    with torch.no_grad():
        out = qk_norm_rope(q, k, attn.norm_q, attn.norm_k, rot, backend=backend)
    for o, w in zip(out, want):
        assert_matches_diffusers(o, w)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind,dtype,norm_dtype", [
    ("torch", torch.bfloat16, torch.float32),   # fp32 weight, bf16 activations
    ("torch_noaffine", torch.float16, None),
    ("diffusers", torch.bfloat16, None),        # rounds before the weight multiply
    ("diffusers", torch.float16, None),
    ("diffusers", torch.float32, None),
], ids=lambda p: str(p).replace("torch.", ""))
def test_norm_variants(backend, kind, dtype, norm_dtype):
    q, k, nq, nk, rot, _ = make_case(D=40, dtype=dtype, norm_dtype=norm_dtype, kind=kind)
    want = diffusers_path(q, k, nq, nk, rot)
    with torch.no_grad():
        out = qk_norm_rope(q, k, nq, nk, rot, backend=backend)
    for o, w in zip(out, want):
        assert_matches_diffusers(o, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_or_rotation_skipped(backend):
    q, k, nq, nk, rot, _ = make_case(D=32, dtype=torch.bfloat16)
    with torch.no_grad():
        only_norm = qk_norm_rope(q, k, nq, nk, None, backend=backend)
        assert_matches_diffusers(only_norm[0], nq(q))
        assert_matches_diffusers(only_norm[1], nk(k))
        only_rope_q = qk_norm_rope(q, k, None, nk, rot, backend=backend)
    assert_matches_diffusers(only_rope_q[0], apply_rotary_emb(q, rot, sequence_dim=1))
    assert_matches_diffusers(only_rope_q[1], diffusers_path(q, k, nq, nk, rot)[1])


@pytest.mark.parametrize("backend", FUSED)
def test_strided_inputs(backend):
    """q/k as slices of a fused qkv projection (single-stream blocks): no copy needed."""
    B, L, H, D = 2, 7, 3, 64
    qkv = torch.randn(B, L, 3, H, D, dtype=torch.bfloat16)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    assert not q.is_contiguous()
    _, _, nq, nk, rot, _ = make_case(D=D, dtype=torch.bfloat16)
    want = diffusers_path(q, k, nq, nk, rot)
    with torch.no_grad():
        out = qk_norm_rope(q, k, nq, nk, rot, backend=backend)
    for o, w in zip(out, want):
        assert_matches_diffusers(o, w)


@pytest.mark.parametrize("backend", FUSED)
def test_double_stream_split(backend):
    """Text rows normed by norm_added_*, image rows by norm_*, one rotation over both."""
    T = 3
    q, k, nq, nk, rot, _ = make_case(text_len=T, D=64, dtype=torch.bfloat16)
    nq_txt, nk_txt = make_norm(64, torch.bfloat16, seed=5), make_norm(64, torch.bfloat16, seed=6)
    with torch.no_grad():  # the FluxAttnProcessor order: norm each stream, cat, rotate
        want_q = apply_rotary_emb(torch.cat([nq_txt(q[:, :T]), nq(q[:, T:])], 1), rot,
                                  sequence_dim=1)
        want_k = apply_rotary_emb(torch.cat([nk_txt(k[:, :T]), nk(k[:, T:])], 1), rot,
                                  sequence_dim=1)
        cos, sin = rot
        tq, tk = qk_norm_rope(q[:, :T], k[:, :T], nq_txt, nk_txt, (cos[:T], sin[:T]),
                              backend=backend)
        iq, ik = qk_norm_rope(q[:, T:], k[:, T:], nq, nk, (cos[T:], sin[T:]), backend=backend)
    assert_matches_diffusers(torch.cat([tq, iq], 1), want_q)
    assert_matches_diffusers(torch.cat([tk, ik], 1), want_k)


@pytest.mark.parametrize("backend", ["cuda"])
def test_cuda_backend_refuses_what_the_kernel_cannot_do(backend):
    q, k, nq, nk, rot, _ = make_case(D=32, dtype=torch.bfloat16)
    with torch.no_grad():
        with pytest.raises(ValueError, match="always normalises"):
            qk_norm_rope(q, k, None, nk, rot, backend="cuda")
        with pytest.raises(ValueError, match="always rotates"):
            qk_norm_rope(q, k, nq, nk, None, backend="cuda")
        nk_eps = make_norm(32, torch.bfloat16, seed=2)
        nk_eps.eps = 1e-5
        with pytest.raises(ValueError, match="different eps"):
            qk_norm_rope(q, k, nq, nk_eps, rot, backend="cuda")
        with pytest.raises(ValueError, match="cuda tensors|cpu tensors"):
            meta = [copy.deepcopy(n).to("meta") for n in (nq, nk)]  # Module.to is in place
            qk_norm_rope(q.to("meta"), k.to("meta"), *meta,
                         (rot[0].to("meta"), rot[1].to("meta")), backend="cuda")
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="forward only"):
        qk_norm_rope(q, k, nq, nk, rot, backend="cuda")


def test_cuda_backend_without_the_extension_says_why(monkeypatch):
    from storyattn.backends import _cuda_ext
    monkeypatch.setattr(_cuda_ext, "_load", lambda: (None, "the CUDA extension storyattn._C "
                                                      "does not import (ImportError: x)"))
    q, k, nq, nk, rot, _ = make_case(D=32)
    with torch.no_grad(), pytest.raises(ValueError, match="storyattn._C does not import"):
        qk_norm_rope(q, k, nq, nk, rot, backend="cuda")


def test_default_backend_on_cpu_is_the_exact_torch_path():
    q, k, nq, nk, rot, _ = make_case(D=32, dtype=torch.bfloat16)
    with torch.no_grad():
        out = qk_norm_rope(q, k, nq, nk, rot)
    want = diffusers_path(q, k, nq, nk, rot)
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    q, k, nq, nk, rot, _ = make_case(D=32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with torch.no_grad(), pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        qk_norm_rope(q, k, nq, nk, rot, backend="triton")


def test_nan_and_empty_pass_through():
    q, k, nq, nk, rot, _ = make_case(D=32, dtype=torch.bfloat16)
    q[0, 1, 2, 5] = float("nan")
    with torch.no_grad():
        out_q, out_k = qk_norm_rope(q, k, nq, nk, rot, backend="triton")
    want_q, want_k = diffusers_path(q, k, nq, nk, rot)
    assert torch.equal(out_q.isnan(), want_q.isnan())
    assert torch.equal(out_k, want_k) or bool(ulp_close(out_k, want_k).all())
    empty = torch.empty(0, 7, 3, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        eq, ek = qk_norm_rope(empty, empty, nq, nk, rot, backend="triton")
    assert eq.shape == empty.shape and ek.shape == empty.shape


# ----------------------------------------------------------------------------- gradients

def test_torch_backend_gradients_match_float64():
    q, k, nq, nk, rot, _ = make_case(D=40, dtype=torch.float32)
    q.requires_grad_(True)
    k.requires_grad_(True)
    out_q, out_k = qk_norm_rope(q, k, nq, nk, rot)   # backend=None, grad needed -> torch
    assert out_q.grad_fn is not None
    gq, gk = torch.randn_like(out_q), torch.randn_like(out_k)
    (out_q * gq).sum().add((out_k * gk).sum()).backward()

    q64 = q.detach().double().requires_grad_(True)
    k64 = k.detach().double().requires_grad_(True)
    wq64 = nq.weight.detach().double().requires_grad_(True)
    wk64 = nk.weight.detach().double().requires_grad_(True)
    loss = (ref64(q64, wq64, EPS, rot) * gq.double()).sum() \
        + (ref64(k64, wk64, EPS, rot) * gk.double()).sum()
    loss.backward()
    for got, exact, name in ((q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"),
                             (nq.weight.grad, wq64.grad, "dw_q"),
                             (nk.weight.grad, wk64.grad, "dw_k")):
        scale = exact.abs().max().item()
        err = (got.double() - exact).abs().max().item()
        assert err <= 1e-5 * max(scale, 1.0), f"{name}: error {err:.3g} (scale {scale:.3g})"


def test_triton_refuses_gradients():
    q, k, nq, nk, rot, _ = make_case(D=32)
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="forward only"):
        qk_norm_rope(q, k, nq, nk, rot, backend="triton")
    with torch.no_grad():  # the same call is fine for inference
        qk_norm_rope(q, k, nq, nk, rot, backend="triton")


# ----------------------------------------------------------------------------- bad input

def _bad_cases():
    q, k, nq, nk, rot, _ = make_case(D=32)
    v = torch.randn_like(k)
    B, L, H, D = q.shape
    pk = torch.zeros(4, L, H, D)
    pv = torch.zeros(4, L, H, D)
    cache = dict(v=v, pool_k=pk, pool_v=pv, pool_index=[0, 1])

    def call(q=q, k=k, nq=nq, nk=nk, rot=rot, backend="torch"):
        return lambda: qk_norm_rope(q, k, nq, nk, rot, backend=backend)

    def into(backend="torch", **over):
        a = dict(cache, **over)
        rest = {x: a.pop(x) for x in ("pool_start", "pool_rotary") if x in a}
        return lambda: qk_norm_rope_into_cache(q, k, a["v"], nq, nk, rot, a["pool_k"],
                                               a["pool_v"], a["pool_index"], backend=backend,
                                               **rest)

    odd = torch.randn(B, L, H, 31)
    return [
        ("q rank", call(q=q[0]), ValueError, r"q must be \[B, L, H, D\]"),
        ("k shape", call(k=k[:, :-1]), ValueError, "k must have the shape of q"),
        ("k dtype", call(k=k.double()), TypeError, "share a dtype"),
        ("int q", call(q=q.long(), k=k.long()), TypeError, "floating"),
        ("cos shape", call(rot=(rot[0][:-1], rot[1])), ValueError, "image_rotary_emb cos"),
        ("rot not a pair", call(rot=rot[0]), TypeError, "image_rotary_emb"),
        ("odd head dim", call(q=odd, k=odd, nq=None, nk=None,
                              rot=(torch.ones(L, 31), torch.zeros(L, 31))),
         ValueError, "even"),
        ("norm dim", call(nq=torch.nn.RMSNorm(16)), ValueError, "norm_q normalises"),
        ("norm type", call(nk=torch.ones(32)), TypeError, "norm_k"),
        ("backend name", call(backend="cudnn"), ValueError, "backend must be one of"),
        ("triton fp64", call(q=q.double(), k=k.double(), backend="triton"), ValueError,
         "float64"),
        ("triton head dim", call(q=torch.randn(1, 2, 1, 512), k=torch.randn(1, 2, 1, 512),
                                 nq=None, nk=None, rot=None, backend="triton"),
         ValueError, "head dim 512"),
        ("pool shape", into(pool_k=torch.zeros(4, L - 1, H, D)), ValueError, "pool_k must have"),
        ("pool dtype", into(pool_v=pv.bfloat16()), TypeError, "pool_v"),
        ("pool count", into(pool_v=torch.zeros(3, L, H, D)), ValueError, "entry counts"),
        ("index range", into(pool_index=[0, 4]), ValueError, r"\[-1, P = 4\)"),
        ("index dup", into(pool_index=[2, 2]), ValueError, "duplicate"),
        ("index shape", into(pool_index=[0]), ValueError, r"shape \(2,\)"),
        ("index float", into(pool_index=torch.zeros(2)), TypeError, "integer"),
        ("pool start", into(pool_start=L + 1), ValueError, "pool_start"),
        ("pool rotary", into(pool_rotary=(torch.ones(1, D), torch.zeros(1, D))), ValueError,
         r"\[B, D\]"),
        ("v shape", into(v=v[:, 1:]), ValueError, "v must be"),
        ("triton pool index", into(backend="triton", pool_index=[0, 7]), ValueError, "P = 4"),
        ("rotate_keys cos", lambda: rotate_keys(k, torch.ones(3, D), torch.zeros(3, D)),
         ValueError, "cos must have shape"),
        ("reference_key_rotary module", lambda: reference_key_rotary(torch.nn.Identity(), 2),
         TypeError, "axes_dim"),
        ("reference_key_rotary count",
         lambda: reference_key_rotary(FluxPosEmbed(10000, [4, 6, 6]), -1), ValueError,
         "num_entries"),
    ]


@pytest.mark.parametrize("fn,exc,match", [pytest.param(fn, exc, match, id=name)
                                          for name, fn, exc, match in _bad_cases()])
def test_bad_input(fn, exc, match):
    with torch.no_grad(), pytest.raises(exc, match=match):
        fn()


def test_launcher_checks():
    from storyattn.kernels.qk_norm_rope import qk_norm_rope_fwd

    x = torch.randn(1, 2, 1, 258)
    with pytest.raises(ValueError, match="at most 256"):
        qk_norm_rope_fwd(x, x, None, None, None, None)
    x = torch.randn(1, 2, 1, 8)
    with pytest.raises(ValueError, match="need pool_k"):
        qk_norm_rope_fwd(x, x, None, None, None, None, pool_index=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="unit stride"):
        qk_norm_rope_fwd(x, x, None, None, None, None, v=x, pool_index=torch.zeros(1).long(),
                         pool_k=torch.zeros(1, 2, 1, 16)[..., ::2],
                         pool_v=torch.zeros(1, 2, 1, 8))


# ----------------------------------------------------------------------------- larger / GPU

@pytest.mark.slow
@pytest.mark.parametrize("D", [72, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_larger_shapes(D, dtype):
    q, k, nq, nk, rot, _ = make_case(B=2, text_len=17, rows=8, cols=10, H=5, D=D, dtype=dtype)
    want = diffusers_path(q, k, nq, nk, rot)
    with torch.no_grad():
        out = qk_norm_rope(q, k, nq, nk, rot, backend="triton")
    for o, w in zip(out, want):
        assert_matches_diffusers(o, w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("fused", ["triton", "cuda"])
def test_gpu_flux_shapes(dtype, fused):
    """FLUX.1 layer at 512^2: 24 heads x 128, 512 text + 1024 image tokens, plus a pool write."""
    if fused == "cuda":
        from storyattn.backends import _cuda_ext
        if _cuda_ext.extension_error() is not None:
            pytest.skip("storyattn._C is not built here")
    q, k, nq, nk, rot, pos = make_case(B=2, text_len=512, rows=32, cols=32, H=24, D=128,
                                       dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    want = diffusers_path(q, k, nq, nk, rot)
    pool_k = torch.full((3, 1024, 24, 128), float("nan"), dtype=dtype, device="cuda")
    pool_v = pool_k.clone()
    cos_e, sin_e = reference_key_rotary(pos, 3, device="cuda")
    index = torch.tensor([2, 0], device="cuda")
    with torch.no_grad():
        out = qk_norm_rope(q, k, nq, nk, rot)  # backend=None on CUDA picks triton
        tri = qk_norm_rope(q, k, nq, nk, rot, backend=fused)
        qk_norm_rope_into_cache(q, k, v, nq, nk, rot, pool_k, pool_v, index, pool_start=512,
                                pool_rotary=(cos_e[index], sin_e[index]), backend=fused)
    for o, t, w in zip(out, tri, want):
        if fused == "triton":
            assert torch.equal(o, t)
        assert_matches_diffusers(t, w)
    for b, e in enumerate(index.tolist()):
        keys = rotate_keys(tri[1][b:b + 1, 512:], cos_e[e:e + 1], sin_e[e:e + 1])
        assert bool(ulp_close(pool_k[e:e + 1], keys).all())
        assert torch.equal(pool_v[e], v[b, 512:])
    assert pool_k[1].isnan().all()
