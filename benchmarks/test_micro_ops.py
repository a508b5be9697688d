"""Op-level micro-benchmarks under pytest-benchmark.

    pytest benchmarks/ --benchmark-only                       # every case here
    pytest benchmarks/ --benchmark-only --benchmark-json out.json

Not part of the test run (``pytest.ini`` collects ``tests/`` only).  Sizes are small
enough for a CPU; on a GPU they use the FLUX head shape (24 x 128) and more tokens.
Each case names its FLOPs (the one counter of ``_common.attn_flops``) in
``extra_info`` so throughput can be read off the JSON.  The table that compares
against every baseline at FLUX sizes is ``python benchmarks/bench_gsa.py``.
"""
from __future__ import annotations

import pytest
import torch

import _common as C

pytest.importorskip("pytest_benchmark")

import storyattn  # noqa: E402
from storyattn.rope import qk_norm_rope  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
# targets, own tokens (text + image), heads, head dim, pool entries, tokens per entry
SHAPE = (dict(B=2, L=1536, H=24, D=128, P=3, Lr=1024) if DEVICE == "cuda"
         else dict(B=2, L=192, H=4, D=64, P=3, Lr=128))
BACKENDS = [b for b in ("torch", "triton", "flash", "xformers", "cuda")
            if DEVICE == "cuda" or b == "torch"]


def _inputs(requires_grad=False):
    s = SHAPE
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        x = torch.randn(*shape, generator=g).to(device=DEVICE, dtype=DTYPE)
        return x.requires_grad_(requires_grad)

    return (t(s["B"], s["L"], s["H"], s["D"]), t(s["B"], s["L"], s["H"], s["D"]),
            t(s["B"], s["L"], s["H"], s["D"]), t(s["P"], s["Lr"], s["H"], s["D"]),
            t(s["P"], s["Lr"], s["H"], s["D"]))


def _run(benchmark, fn, flops):
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), flops=flops, **SHAPE)

    def call():
        out = fn()
        C.sync(DEVICE)
        return out

    return benchmark(call)


def _flops(backward=False, entries=None):
    s = SHAPE
    lkv = s["L"] + (s["P"] if entries is None else entries) * s["Lr"]
    return C.attn_flops(s["B"], s["L"], lkv, s["H"], s["D"], backward=backward)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_attention_all_refs(benchmark, backend):
    """Every target reads the whole pool (GSA replay with ref_index=None)."""
    if backend not in storyattn.available_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    q, k, v, rk, rv = _inputs()
    with torch.no_grad():
        out = _run(benchmark, lambda: storyattn.segment_attention(q, k, v, rk, rv,
                                                                  backend=backend), _flops())
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_attention_page_table(benchmark, backend):
    """Each target reads its own subset (with a -1 pad): the per-target path."""
    if backend not in storyattn.available_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    q, k, v, rk, rv = _inputs()
    idx = torch.tensor([[0, 2], [1, -1]], device=DEVICE)
    with torch.no_grad():
        out = _run(benchmark, lambda: storyattn.segment_attention(
            q, k, v, rk, rv, ref_index=idx, backend=backend), _flops(entries=1.5))
    assert out.shape == q.shape


def test_naive_concat_baseline(benchmark):
    """What the op replaces: per-target torch.cat of own + pool K/V, then SDPA."""
    q, k, v, rk, rv = _inputs()
    B, H, D = q.shape[0], q.shape[2], q.shape[3]

    def naive():
        fk = rk.reshape(1, -1, H, D).expand(B, -1, -1, -1)
        fv = rv.reshape(1, -1, H, D).expand(B, -1, -1, -1)
        kk, vv = torch.cat([k, fk], 1), torch.cat([v, fv], 1)
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2)).transpose(1, 2)

    with torch.no_grad():
        out = _run(benchmark, naive, _flops())
    ref = storyattn.segment_attention(q, k, v, rk, rv)
    assert (out.float() - ref.float()).abs().max() < (2e-2 if DTYPE == torch.bfloat16 else 1e-4)


def test_segment_attention_backward(benchmark):
    """Training step of the op: forward + backward into all five inputs."""
    backend = "triton" if DEVICE == "cuda" else "torch"
    q, k, v, rk, rv = _inputs(requires_grad=True)

    def step():
        for t in (q, k, v, rk, rv):
            t.grad = None
        storyattn.segment_attention(q, k, v, rk, rv, backend=backend).float().sum().backward()
        return rk.grad

    g = _run(benchmark, step, _flops() + _flops(backward=True))
    assert g is not None and torch.isfinite(g).all()


def test_merge_attention_states(benchmark):
    s = SHAPE
    g = torch.Generator().manual_seed(1)
    oa, ob = (torch.randn(s["B"], s["L"], s["H"], s["D"], generator=g).to(DEVICE, DTYPE)
              for _ in range(2))
    la, lb = (torch.randn(s["B"], s["H"], s["L"], generator=g).to(DEVICE) for _ in range(2))
    out, lse = _run(benchmark, lambda: storyattn.merge_attention_states(oa, la, ob, lb), 0)
    assert out.shape == oa.shape and lse.shape == la.shape


def test_qk_norm_rope(benchmark):
    """FLUX's q/k RMSNorm + RoPE (the default backend for the device)."""
    s = SHAPE
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(s["B"], s["L"], s["H"], s["D"], generator=g).to(DEVICE, DTYPE)
            for _ in range(2))
    norm_q = torch.nn.RMSNorm(s["D"], eps=1e-6).to(DEVICE, DTYPE)
    norm_k = torch.nn.RMSNorm(s["D"], eps=1e-6).to(DEVICE, DTYPE)
    ang = torch.randn(s["L"], s["D"] // 2, generator=g).repeat_interleave(2, -1).to(DEVICE)
    with torch.no_grad():
        qo, ko = _run(benchmark, lambda: qk_norm_rope(q, k, norm_q, norm_k,
                                                      (ang.cos(), ang.sin())), 0)
    assert qo.shape == q.shape and torch.isfinite(qo).all()
