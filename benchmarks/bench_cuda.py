"""Benchmark of the precompiled CUDA kernels (storyattn._C, csrc/) on a GPU.

    python benchmarks/bench_cuda.py                   # FLUX shapes, K = 1, 2, 4 refs
    python benchmarks/bench_cuda.py --refs 2 --batch 4
    python benchmarks/bench_cuda.py --quick           # small shapes, a smoke run

Segment attention at FLUX.1 shapes (24 heads x 128, 512 text + 4096 image
tokens per target, K cached references of 4096 image tokens, bf16), same
inputs for every method in the same run:

* ``cuda``         -- storyattn backend "cuda" as dispatched (FA3 + CUDA merge
                      when flash_attn_3 imports on sm_90, else the fused kernel);
* ``cuda-kernel``  -- the fused csrc kernel alone (csrc/segment_attn_fwd.cu);
* ``cuda-fa3``     -- FA3 per segment + csrc merge, when FA3 imports;
* ``triton``       -- storyattn backend "triton";
* ``naive``        -- torch.cat of own + reference keys, then SDPA (the cat is
                      timed: it is what the naive path pays every call).

Also the two memory-bound kernels: the in-place merge (``merge_states_`` vs the
torch merge) and fused q/k RMSNorm + RoPE (CUDA vs Triton vs the torch chain),
in ms and GB/s.

Prints a table (ms, TFLOP/s, ratio to triton and to naive) and writes JSON +
Markdown under benchmarks/results/ (bench_cuda_gpu.*).  On a machine without a
CUDA GPU it says so and exits 0: no figures are made up.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import (RESULTS_DIR, attn_flops, environment, markdown_table,  # noqa: E402
                     text_table, time_fn, write_results)

import storyattn  # noqa: E402
from storyattn.backends import _cuda_ext  # noqa: E402
from storyattn.backends import SegmentInputs  # noqa: E402

HEADS, HEAD_DIM, TXT, IMG = 24, 128, 512, 4096


def _naive(q, k, v, rk, rv, scale):
    B = q.shape[0]
    P, Lr, H, D = rk.shape
    K = torch.cat([k, rk.reshape(1, P * Lr, H, D).expand(B, -1, -1, -1)], dim=1)
    V = torch.cat([v, rv.reshape(1, P * Lr, H, D).expand(B, -1, -1, -1)], dim=1)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2), scale=scale)
    return o.transpose(1, 2)


def _attention_methods(inputs: SegmentInputs) -> Dict[str, Optional[Callable[[], object]]]:
    """name -> zero-arg callable, or None (with the reason printed) when it cannot run."""
    q, k, v, rk, rv, scale = (inputs.q, inputs.k, inputs.v, inputs.ref_k, inputs.ref_v,
                              inputs.scale)
    methods: Dict[str, Optional[Callable[[], object]]] = {}
    avail = storyattn.available_backends()
    from storyattn.backends import cuda_backend, get
    if "cuda" in avail and get("cuda").check(inputs) is None:
        methods["cuda"] = lambda: storyattn.segment_attention(q, k, v, rk, rv, scale=scale,
                                                              backend="cuda")
        if inputs.head_dim in _cuda_ext.SEGMENT_ATTN_HEAD_DIMS:
            methods["cuda-kernel"] = lambda: cuda_backend.forward_kernel(inputs)
        if cuda_backend.fa3_error() is None and torch.cuda.get_device_capability()[0] == 9:
            methods["cuda-fa3"] = lambda: cuda_backend.forward_fa3(inputs)
    else:
        why = get("cuda").availability() or get("cuda").check(inputs)
        print(f"  (cuda backend skipped: {why})")
    if "triton" in avail:
        methods["triton"] = lambda: storyattn.segment_attention(q, k, v, rk, rv, scale=scale,
                                                                backend="triton")
    else:
        print(f"  (triton backend skipped: {get('triton').availability()})")
    methods["naive"] = lambda: _naive(q, k, v, rk, rv, scale)
    return methods


def bench_attention(batches: List[int], refs: List[int], txt: int, img: int) -> List[Dict]:
    rows = []
    dt = torch.bfloat16
    for B in batches:
        for K in refs:
            Lq = txt + img
            mk = lambda *s: torch.randn(*s, device="cuda", dtype=dt)  # noqa: E731
            q, k, v = mk(B, Lq, HEADS, HEAD_DIM), mk(B, Lq, HEADS, HEAD_DIM), mk(B, Lq, HEADS, HEAD_DIM)
            rk, rv = mk(K, img, HEADS, HEAD_DIM), mk(K, img, HEADS, HEAD_DIM)
            inputs = SegmentInputs(q, k, v, rk, rv, None, 1.0 / math.sqrt(HEAD_DIM))
            flops = attn_flops(B, Lq, Lq + K * img, HEADS, HEAD_DIM)
            print(f"B={B} K={K}: Lq={Lq}, keys per target={Lq + K * img}")
            times = {}
            for name, fn in _attention_methods(inputs).items():
                try:
                    times[name] = time_fn(fn, "cuda")
                except Exception as e:  # report and keep measuring the others
                    print(f"  {name}: failed ({type(e).__name__}: {e})")
            for name, ms in times.items():
                rows.append({
                    "op": "segment_attention", "method": name, "B": B, "refs": K, "Lq": Lq,
                    "Lkv": Lq + K * img, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "bf16",
                    "ms": ms, "tflops": flops / ms / 1e9,
                    "vs_triton": (times["triton"] / ms) if "triton" in times else None,
                    "vs_naive": times["naive"] / ms if "naive" in times else None,
                    "command": f"python benchmarks/bench_cuda.py --batch {B} --refs {K}"
                               f" --txt {txt} --img {img}",
                })
            del q, k, v, rk, rv, inputs
            torch.cuda.empty_cache()
    return rows


def bench_memory_bound(txt: int, img: int) -> List[Dict]:
    rows = []
    dt = torch.bfloat16
    L = txt + img
    shape = (1, L, HEADS, HEAD_DIM)
    esz = torch.finfo(dt).bits // 8
    if _cuda_ext.extension_error() is not None:
        print(f"  (memory-bound kernels skipped: {_cuda_ext.extension_error()})")
        return rows

    # merge: reads out_a, out_b, 2 lse; writes out_a, lse_a
    oa, ob = torch.randn(shape, device="cuda", dtype=dt), torch.randn(shape, device="cuda", dtype=dt)
    la, lb = torch.randn(1, HEADS, L, device="cuda"), torch.randn(1, HEADS, L, device="cuda")
    nbytes = 3 * oa.numel() * esz + 4 * la.numel() * 4
    from storyattn.api import merge_states as torch_merge
    for name, fn in (("cuda merge_states_", lambda: _cuda_ext.merge_states_(oa, la, ob, lb)),
                     ("torch merge", lambda: torch_merge(oa, la, ob, lb))):
        ms = time_fn(fn, "cuda")
        rows.append({"op": "merge_states", "method": name, "L": L, "heads": HEADS,
                     "head_dim": HEAD_DIM, "dtype": "bf16", "ms": ms,
                     "GB/s": nbytes / ms / 1e6})

    # q/k norm + rope: reads q, k; writes q, k
    q, k = torch.randn(shape, device="cuda", dtype=dt), torch.randn(shape, device="cuda", dtype=dt)
    norm_q = torch.nn.RMSNorm(HEAD_DIM, eps=1e-6, device="cuda", dtype=dt)
    norm_k = torch.nn.RMSNorm(HEAD_DIM, eps=1e-6, device="cuda", dtype=dt)
    ang = torch.outer(torch.arange(L, device="cuda", dtype=torch.float32),
                      torch.rand(HEAD_DIM // 2, device="cuda")).repeat_interleave(2, -1)
    cos, sin = ang.cos(), ang.sin()
    nbytes = 4 * q.numel() * esz
    from storyattn import rope
    cands = [("cuda qk_norm_rope", lambda: _cuda_ext.qk_norm_rope_cuda(
                 q, k, norm_q.weight, norm_k.weight, cos, sin, 1e-6)),
             ("torch chain", lambda: rope.qk_norm_rope(q, k, norm_q, norm_k, (cos, sin),
                                                       backend="torch"))]
    if "triton" in storyattn.available_backends():
        cands.append(("triton qk_norm_rope", lambda: rope.qk_norm_rope(
            q, k, norm_q, norm_k, (cos, sin), backend="triton")))
    with torch.no_grad():
        for name, fn in cands:
            try:
                ms = time_fn(fn, "cuda")
            except Exception as e:
                print(f"  {name}: failed ({type(e).__name__}: {e})")
                continue
            rows.append({"op": "qk_norm_rope", "method": name, "L": L, "heads": HEADS,
                         "head_dim": HEAD_DIM, "dtype": "bf16", "ms": ms,
                         "GB/s": nbytes / ms / 1e6})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--refs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--txt", type=int, default=TXT)
    ap.add_argument("--img", type=int, default=IMG)
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: needs a CUDA GPU (none found here); nothing measured. "
              "Run it on an sm_80/sm_90 machine after building storyattn._C.")
        return 0
    if args.quick:
        args.txt, args.img, args.refs = 64, 256, [1, 2]

    with torch.no_grad():
        rows = bench_attention(args.batch, args.refs, args.txt, args.img)
    rows += bench_memory_bound(args.txt, args.img)

    env = environment("cuda")
    env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    env["storyattn_C"] = _cuda_ext.extension_error() is None
    from storyattn.backends import cuda_backend
    env["flash_attn_3"] = cuda_backend.fa3_error() is None

    att = [r for r in rows if r["op"] == "segment_attention"]
    fmt = lambda x, n=2: "-" if x is None else f"{x:.{n}f}"  # noqa: E731
    head = ["B", "refs", "method", "ms", "TFLOP/s", "x triton", "x naive"]
    table = [[r["B"], r["refs"], r["method"], fmt(r["ms"], 3), fmt(r["tflops"], 1),
              fmt(r["vs_triton"]), fmt(r["vs_naive"])] for r in att]
    mem = [r for r in rows if r["op"] != "segment_attention"]
    head2 = ["op", "method", "L", "ms", "GB/s"]
    table2 = [[r["op"], r["method"], r["L"], fmt(r["ms"], 4), fmt(r["GB/s"], 0)] for r in mem]
    print(text_table(head, table))
    print()
    print(text_table(head2, table2))
    md = markdown_table(head, table) + "\n\n" + markdown_table(head2, table2)
    notes = ("x triton / x naive: speed-up of the row's method over the triton backend / the "
             "naive torch.cat + SDPA on the same inputs (> 1 = faster). FLOPs = 4*B*Lq*Lkv*H*D.")
    name = "bench_cuda_quick" if args.quick else "bench_cuda"
    for p in write_results(name, env, rows, md, notes, out_dir=args.out_dir):
        print("wrote", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
