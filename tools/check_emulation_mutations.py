#!/usr/bin/env python
"""Does the host emulation of csrc/ catch real kernel bugs?  Mutation check.

Each mutation below plants one plausible bug in a copy of the checkout (a
wrong fragment layout, a missing barrier, a cp.async wait one group short, an
off-by-one...) and runs the emulated kernel tests of tests/test_cuda_ext.py
that should notice it.  A mutation the tests do not fail on is reported as
SURVIVED and the script exits 1.

    python tools/check_emulation_mutations.py            # all, ~3 min on 2 cores
    python tools/check_emulation_mutations.py -k sync    # names containing "sync"

Needs what the emulated tests need (a C++ compiler, ninja); no GPU.  The
working tree is copied (tracked and untracked-not-ignored files), so
uncommitted edits are checked too.  Object files are kept in one build folder
between mutations, so only the mutated file is recompiled.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEG = "csrc/segment_attn_fwd.cu"
MERGE = "csrc/merge_states.cu"
ROPE = "csrc/qk_norm_rope.cu"
FUSED = "test_fused_kernel_vs_float64 and emu and 2x97"
FUSED_ALL = "test_fused_kernel_vs_float64 and emu"

# name, file, old, new, pytest -k selection
MUTATIONS = [
    ("V loaded without .trans", SEG, "ldmatrix_x4_trans(vb,", "ldmatrix_x4(vb,", FUSED),
    ("K tile read before its cp.async lands", SEG,
     "cp_async_wait<1>();  // K(j) has landed", "cp_async_wait<2>();  // K(j) has landed", FUSED),
    ("V tile read before its cp.async lands", SEG,
     "cp_async_wait<1>();  // V(j) has landed", "cp_async_wait<2>();  // V(j) has landed", FUSED),
    ("no zero-fill past a segment's end", SEG,
     "cp_async16(dst + r * kLds + col, g, ok ? 16 : 0);",
     "cp_async16(dst + r * kLds + col, src + (n0 + r) * ld + col, 16);", FUSED_ALL),
    ("no key mask on a partial tile", SEG,
     "const bool partial = n0 + kBN > n;", "const bool partial = false;", FUSED_ALL),
    ("P fragment registers swapped", SEG,
     "pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);",
     "pa[1] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);", FUSED),
    ("Q fragment rows swapped", SEG,
     "qf[ks][1] = ok1 ? *reinterpret_cast<const uint32_t*>(qb + r1 * p.q_sl + c) : 0u;",
     "qf[ks][1] = ok0 ? *reinterpret_cast<const uint32_t*>(qb + r0 * p.q_sl + c) : 0u;", FUSED),
    ("K reloaded without a barrier after S", SEG,
     "__syncthreads();  // every warp is done reading K(j)", ";", "landing_early"),
    ("V reloaded without a barrier after PV", SEG,
     "__syncthreads();  // every warp is done reading V(j)", ";", "landing_early"),
    ("page table: -1 entries not skipped", SEG,
     "if (e < 0 || e >= p.P || p.Lr <= 0) continue;",
     "if (e >= p.P || p.Lr <= 0) continue;", FUSED_ALL),
    ("lse in log2 units", SEG, "(st.m[r] + __log2f(l)) * 0.6931471805599453f",
     "(st.m[r] + __log2f(l))", FUSED),
    ("merge ignores its mask", MERGE, "p.mask == nullptr ||", "true ||",
     "merge_states_vs_float64 and emu"),
    ("merge: in-place lse written before all threads read it", MERGE,
     "  __syncthreads();\n  if (!live) return;", "  if (!live) return;",
     "merge_states_vs_float64 and emu"),
    ("merge vectorised when D is not a multiple of the width", MERGE,
     "const bool vec_ok = p.D % V == 0 &&", "const bool vec_ok = ", "strided_out and emu"),
    ("merge vectorised on a misaligned address", MERGE,
     "const bool vec_ok = p.D % V == 0 && aligned(p.out_a, 16) && aligned(p.out_b, 16) &&",
     "const bool vec_ok = p.D % V == 0 &&", "strided_out and emu"),
    ("pool write off by one token", ROPE, "l >= p.img_start &&", "l > p.img_start &&",
     "pool_write and emu"),
    ("RoPE pair swapped", ROPE, "const float o1 = rot_hi(y0, y1, c.y, s.y);",
     "const float o1 = rot_hi(y1, y0, c.y, s.y);", "qk_norm_rope_vs and emu"),
    ("RMSNorm over half the row", ROPE,
     "__fdiv_rn(ss, static_cast<float>(p.D))", "__fdiv_rn(ss, static_cast<float>(npairs))",
     "qk_norm_rope_vs and emu"),
]


def copy_tree(dst: str) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for rel in files:
        if not rel or rel.startswith("benchmarks/results/"):
            continue
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dst, rel))


def run_one(tree: str, build: str, mut) -> tuple:
    name, rel, old, new, sel = mut
    path = os.path.join(tree, rel)
    with open(os.path.join(ROOT, rel)) as f:
        original = f.read()
    if original.count(old) != 1:
        return "STALE", f"pattern found {original.count(old)} times in {rel}: update the mutation"
    with open(path, "w") as f:
        f.write(original.replace(old, new))
    env = {**os.environ, "PYTHONPATH": tree, "STORYATTN_EMU_BUILD_DIR": build}
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "tests/test_cuda_ext.py", "-k", sel], cwd=tree, env=env,
                           capture_output=True, text=True, timeout=1800)
    finally:
        with open(path, "w") as f:
            f.write(original)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    crash = [ln for ln in lines if "runtime error" in ln or "Fatal Python error" in ln]
    if crash:  # e.g. a misaligned 16-byte access: UBSan reports it, then the load faults
        last = "crashed: " + crash[0].strip()[:120]
    else:
        last = lines[-1] if lines else ""
    summary = f"{last} ({time.time() - t0:.0f} s)"
    if r.returncode == 5:
        return "STALE", "the selection ran no test: " + summary
    return ("CAUGHT" if r.returncode != 0 else "SURVIVED"), summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-k", default="", help="only mutations whose name contains this")
    args = ap.parse_args()
    todo = [m for m in MUTATIONS if args.k.lower() in m[0].lower()]
    tmp = tempfile.mkdtemp(prefix="storyattn-mut-")
    tree, build = os.path.join(tmp, "tree"), os.path.join(tmp, "build")
    bad = 0
    try:
        copy_tree(tree)
        for mut in todo:
            verdict, detail = run_one(tree, build, mut)
            bad += verdict != "CAUGHT"
            print(f"{verdict:9s} {mut[0]:58s} {detail}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(todo) - bad}/{len(todo)} mutations caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
