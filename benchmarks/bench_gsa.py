"""Op-level benchmark of segment attention at FLUX shapes.

B targets each attend to their own text+image tokens plus the image tokens of
K clean references shared by all of them (Group-Shared Attention replay).
Every baseline that runs here is timed on the same inputs in the same run:

  naive          per-target torch.cat of own + reference K/V, then SDPA
  flux2-kv       diffusers' FLUX.2 reference-KV path (_flux2_kv_causal_attention:
                 cached reference K/V concatenated into every call)
  flex           FlexAttention (compiled) over the packed sequence with a block mask
  sdpa-precat    SDPA on the already-concatenated problem (no cat cost; the
                 throughput yardstick for the fused kernel, GPU only)
  flash-cat / xformers-cat   the same concatenated problem through those libraries
  storyattn-*    storyattn.segment_attention with each available backend

Usage:
  python benchmarks/bench_gsa.py            # FLUX sizes on GPU; --quick sizes on CPU
  python benchmarks/bench_gsa.py --quick    # small CPU-friendly sizes (24 x 128 heads kept)
Writes benchmarks/results/bench_gsa_{cpu,gpu}.{json,md,png}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import storyattn  # noqa: E402

H, D = 24, 128


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2)).transpose(1, 2)


def make_methods(device: str, dtype: torch.dtype, txt: int, with_flex: bool
                 ) -> Dict[str, Callable]:
    """name -> builder(q, k, v, pk, pv) returning a zero-argument callable, or a str reason."""
    m: Dict[str, Callable] = {}

    def naive(q, k, v, pk, pv):
        B = q.shape[0]
        flat_k = pk.reshape(1, -1, H, D).expand(B, -1, -1, -1)
        flat_v = pv.reshape(1, -1, H, D).expand(B, -1, -1, -1)
        return lambda: _sdpa(q, torch.cat([k, flat_k], 1), torch.cat([v, flat_v], 1))
    m["naive"] = naive

    try:
        from diffusers.models.transformers.transformer_flux2 import (
            Flux2KVLayerCache, _flux2_kv_causal_attention)

        def flux2(q, k, v, pk, pv):
            B = q.shape[0]
            cache = Flux2KVLayerCache()
            # The FLUX.2 cache holds the reference K/V with a batch dimension.
            cache.store(pk.reshape(1, -1, H, D).expand(B, -1, -1, -1),
                        pv.reshape(1, -1, H, D).expand(B, -1, -1, -1))
            return lambda: _flux2_kv_causal_attention(q, k, v, txt, 0, kv_cache=cache)
        m["flux2-kv"] = flux2
    except ImportError as e:
        m["flux2-kv"] = f"diffusers has no FLUX.2 KV path ({e})"

    if with_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            # (an alias: a plain `import torch._dynamo` would make `torch` local to this
            # function and break the other builders' closures under --no-flex)
            import torch._dynamo as dynamo
            # One compiled graph per benchmark shape; the default limit (8) would
            # silently drop later shapes to the slow eager path.
            for knob in ("cache_size_limit", "recompile_limit"):
                if hasattr(dynamo.config, knob):
                    setattr(dynamo.config, knob, 256)
            flex_c = torch.compile(flex_attention, dynamic=False)

            def flex(q, k, v, pk, pv):
                B, Lq = q.shape[:2]
                Lk = k.shape[1]
                own = B * Lk

                def mask_mod(b, h, qi, ki):
                    return (ki >= own) | (ki // Lk == qi // Lq)
                KV = own + pk.shape[0] * pk.shape[1]
                bm = create_block_mask(mask_mod, None, None, B * Lq, KV, device=device)
                qp = q.reshape(1, B * Lq, H, D).transpose(1, 2)
                kp = torch.cat([k.reshape(-1, H, D), pk.reshape(-1, H, D)])[None].transpose(1, 2)
                vp = torch.cat([v.reshape(-1, H, D), pv.reshape(-1, H, D)])[None].transpose(1, 2)
                return lambda: flex_c(qp, kp, vp, block_mask=bm).transpose(1, 2).reshape(
                    B, Lq, H, D)
            m["flex"] = flex
        except Exception as e:
            m["flex"] = f"FlexAttention unavailable ({type(e).__name__}: {e})"
    else:
        m["flex"] = "skipped (--no-flex)"

    if device == "cuda":
        def precat(q, k, v, pk, pv):
            B = q.shape[0]
            K = torch.cat([k, pk.reshape(1, -1, H, D).expand(B, -1, -1, -1)], 1)
            V = torch.cat([v, pv.reshape(1, -1, H, D).expand(B, -1, -1, -1)], 1)
            return lambda: _sdpa(q, K, V)
        m["sdpa-precat"] = precat
        try:
            from flash_attn import flash_attn_func

            def flash_cat(q, k, v, pk, pv):
                B = q.shape[0]
                fk = pk.reshape(1, -1, H, D).expand(B, -1, -1, -1)
                fv = pv.reshape(1, -1, H, D).expand(B, -1, -1, -1)
                return lambda: flash_attn_func(q, torch.cat([k, fk], 1), torch.cat([v, fv], 1))
            m["flash-cat"] = flash_cat
        except Exception as e:
            m["flash-cat"] = f"flash-attn not installed ({type(e).__name__})"
        try:
            from xformers.ops import memory_efficient_attention

            def xf_cat(q, k, v, pk, pv):
                B = q.shape[0]
                fk = pk.reshape(1, -1, H, D).expand(B, -1, -1, -1)
                fv = pv.reshape(1, -1, H, D).expand(B, -1, -1, -1)
                return lambda: memory_efficient_attention(q, torch.cat([k, fk], 1),
                                                          torch.cat([v, fv], 1))
            m["xformers-cat"] = xf_cat
        except Exception as e:
            m["xformers-cat"] = f"xformers not installed ({type(e).__name__})"

    avail = storyattn.available_backends()
    for be in ("torch", "triton", "flash", "xformers", "cuda"):
        if be not in avail:
            m[f"storyattn-{be}"] = f"backend {be} not available here"
            continue
        if device == "cpu" and be == "triton":
            m[f"storyattn-{be}"] = "Triton on CPU runs only in the interpreter (not a speed path)"
            continue

        def ours(q, k, v, pk, pv, _be=be):
            return lambda: storyattn.segment_attention(q, k, v, pk, pv, backend=_be)
        m[f"storyattn-{be}"] = ours
    return m


def run(args) -> None:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    quick = args.quick or args.smoke or (device == "cpu" and not args.full)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:   # one small case per method: checks the harness, measures nothing
        txt, imgs, Ks, Bs = 16, [32], [2], [1, 2]
    elif quick:
        txt, imgs, Ks, Bs = 64, [128, 256], [1, 2, 4], [1, 4, 16]
    else:
        txt, imgs, Ks, Bs = 512, [1024, 4096], [1, 2, 4], [1, 4, 16]
    if device == "cpu" and not args.quick and not args.full:
        print("No GPU: running the --quick sizes (heads 24 x 128 kept, text 64, image 128/256 "
              "tokens). Pass --full for FLUX token counts (very slow on CPU).")
    methods = make_methods(device, dtype, txt, not args.no_flex)
    skipped = {n: b for n, b in methods.items() if isinstance(b, str)}
    rows: List[Dict] = []
    torch.manual_seed(0)
    configs = [(img, K, B) for img in imgs for K in Ks for B in Bs]
    t0 = time.perf_counter()
    for c, (img, K, B) in enumerate(configs):
        # progress and ETA (from the configurations done so far; later ones are larger,
        # so the estimate is a lower bound until the last image size starts)
        el = time.perf_counter() - t0
        eta = f", ETA {el / c * (len(configs) - c):.0f} s" if c else ""
        print(f"[{c + 1}/{len(configs)}] img={img} K={K} B={B} ({el:.0f} s elapsed{eta})",
              flush=True)
        Lq = txt + img
        q = torch.randn(B, Lq, H, D, device=device, dtype=dtype)
        k = torch.randn(B, Lq, H, D, device=device, dtype=dtype)
        v = torch.randn(B, Lq, H, D, device=device, dtype=dtype)
        pk = torch.randn(K, img, H, D, device=device, dtype=dtype)
        pv = torch.randn(K, img, H, D, device=device, dtype=dtype)
        Lkv = Lq + K * img
        flops = C.attn_flops(B, Lq, Lkv, H, D)
        ref = None
        fns, errs = {}, {}
        with torch.no_grad():
            for name, build in methods.items():
                if isinstance(build, str):
                    continue
                fn = build(q, k, v, pk, pv)
                try:
                    out = fn()
                except Exception as e:  # record, never hide, a baseline failure
                    skipped[name] = f"failed: {type(e).__name__}: {str(e)[:120]}"
                    continue
                if ref is None:
                    ref = out.float()
                errs[name] = (out.float() - ref).abs().max().item()
                del out
                fns[name] = fn
            # Round-robin repeats: machine drift hits every method alike.
            times = C.time_round_robin(fns, device, reps=args.reps)
            mems = {name: C.peak_extra_bytes(fn, device) for name, fn in fns.items()}
        base_ms = times.get("naive")
        for name in fns:
            ms, mem, err = times[name], mems[name], errs[name]
            rows.append(dict(method=name, txt=txt, img=img, K=K, B=B, Lq=Lq, Lkv=Lkv,
                             H=H, D=D, dtype=str(dtype).replace("torch.", ""),
                             ms=ms, tflops=flops / ms / 1e9,
                             speedup_vs_naive=(base_ms / ms) if base_ms else None,
                             peak_extra_mb=mem / 2**20, max_abs_diff_vs_naive=err))
            print(f"img={img:5d} K={K} B={B:2d} {name:18s} {ms:9.3f} ms "
                  f"{flops / ms / 1e9:8.2f} TFLOP/s  "
                  f"x{(base_ms / ms) if base_ms else float('nan'):.2f} vs naive  "
                  f"peak+{mem / 2**20:8.1f} MiB  maxdiff {err:.2e}", flush=True)
        del q, k, v, pk, pv
        if device == "cuda":
            torch.cuda.empty_cache()
        # rewrite the results after every configuration: an interrupted run keeps them
        report(rows, skipped, device, quick, args, done=(c + 1, len(configs)))
    report(rows, skipped, device, quick, args)


def report(rows, skipped, device, quick, args, done=None):
    """Print and write the results; ``done=(i, n)``: a partial write after configuration i
    of n (files only, marked partial, no plot)."""
    env = C.environment(device)
    headers = ["img", "K", "B", "method", "ms", "TFLOP/s", "x naive", "peak+ MiB"]
    table = [[r["img"], r["K"], r["B"], r["method"], f"{r['ms']:.3f}", f"{r['tflops']:.2f}",
              f"{r['speedup_vs_naive']:.2f}" if r["speedup_vs_naive"] else "-",
              f"{r['peak_extra_mb']:.1f}"] for r in rows]
    if done is None:
        print()
        print(C.text_table(headers, table))
    notes = []
    if done is not None:
        notes.append(f"- PARTIAL: {done[0]} of {done[1]} configurations measured so far")
    for n, why in skipped.items():
        notes.append(f"- {n}: not run ({why})")
    # Targets from the issue, evaluated on this run's own rows.
    by = {}
    for r in rows:
        by.setdefault((r["img"], r["K"], r["B"]), {})[r["method"]] = r
    if "storyattn-torch" in {r["method"] for r in rows}:
        wins = [c for c, d in by.items() if "storyattn-torch" in d
                and d["storyattn-torch"]["ms"] <= d["naive"]["ms"]]
        notes.append(f"- storyattn-torch at least as fast as naive in {len(wins)}/{len(by)} cases "
                     f"(worst ratio {min(d['naive']['ms'] / d['storyattn-torch']['ms'] for d in by.values()):.2f}x)")
        # Memory growth with B: extra peak per additional target, for the largest K.
        for img in sorted({c[0] for c in by}):
            Kmax = max(c[1] for c in by if c[0] == img)
            Bs = sorted(c[2] for c in by if c[0] == img and c[1] == Kmax)
            if len(Bs) < 2 or any(m not in by[(img, Kmax, b)] for b in (Bs[0], Bs[-1])
                                  for m in ("naive", "storyattn-torch")):
                continue   # a partial run: no growth figure yet
            lo, hi = by[(img, Kmax, Bs[0])], by[(img, Kmax, Bs[-1])]
            for meth in ("naive", "storyattn-torch"):
                growth = (hi[meth]["peak_extra_mb"] - lo[meth]["peak_extra_mb"]) / (Bs[-1] - Bs[0])
                pool_mb = Kmax * img * H * D * 2 * (2 if device == "cuda" else 4) / 2**20
                notes.append(f"- img={img} K={Kmax}: {meth} peak extra memory grows "
                             f"{growth:.1f} MiB per added target (the shared pool K/V is "
                             f"{pool_mb:.1f} MiB; one target's own q/k/v/out is "
                             f"{4 * (64 + img if quick else 512 + img) * H * D * (2 if device == 'cuda' else 4) / 2**20:.1f} MiB)")
    if "storyattn-triton" in {r["method"] for r in rows} and "sdpa-precat" in {r["method"] for r in rows}:
        fr = [d["storyattn-triton"]["tflops"] / max(d[m]["tflops"] for m in d
              if m in ("sdpa-precat", "flash-cat", "xformers-cat")) for d in by.values()]
        notes.append(f"- triton forward TFLOP/s / best SDPA-class on the concatenated problem: "
                     f"min {min(fr):.2f}, median {sorted(fr)[len(fr) // 2]:.2f}")
    cmd = "python benchmarks/bench_gsa.py" + (" --smoke" if args.smoke else " --quick" if quick else "") + (" --no-flex" if args.no_flex else "")
    notes.append(f"- reproduce: `{cmd}`")
    notes_s = "\n".join(notes)
    if done is None:
        print("\n" + notes_s)

    def plot(path):
        import matplotlib.pyplot as plt
        meths = sorted({r["method"] for r in rows})
        cases = sorted(by)
        fig, ax = plt.subplots(figsize=(max(8, len(cases) * 0.6), 4.5))
        w = 0.8 / len(meths)
        for i, mth in enumerate(meths):
            ys = [by[c][mth]["speedup_vs_naive"] if mth in by[c] else 0 for c in cases]
            ax.bar([j + i * w for j in range(len(cases))], ys, w, label=mth)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 for j in range(len(cases))])
        ax.set_xticklabels([f"i{c[0]}\nK{c[1]} B{c[2]}" for c in cases], fontsize=7)
        ax.set_ylabel("speed-up vs naive cat+SDPA")
        ax.set_title(f"segment attention, {H}x{D} heads, {env.get('gpu') or 'CPU'}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    md = C.markdown_table(headers, table)
    paths = C.write_results("bench_gsa", env, rows, md, notes_s,
                            plot if done is None else None, out_dir=args.out_dir)
    if done is None:
        print("wrote " + ", ".join(paths))


def main(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (default on CPU)")
    p.add_argument("--full", action="store_true", help="FLUX token counts even on CPU")
    p.add_argument("--smoke", action="store_true",
                   help="two toy cases (tools/gpu_session.sh --dry-run): harness check only")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    p.add_argument("--no-flex", action="store_true",
                   help="skip FlexAttention (it compiles once per shape: ~20 s each on CPU)")
    p.add_argument("--reps", type=int, default=9, help="timed repeats per method (CPU)")
    p.add_argument("--out-dir", default=C.RESULTS_DIR,
                   help="where the JSON/MD/PNG results go (rewritten after every configuration)")
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        run(args)
    except KeyboardInterrupt:
        print(f"interrupted after {time.time() - t0:.0f} s; the configurations measured so far "
              f"are in {args.out_dir}/bench_gsa_*.json/.md", file=sys.stderr)
        sys.exit(130)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
