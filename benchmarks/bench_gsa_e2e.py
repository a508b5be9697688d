"""End-to-end Group-Shared Attention benchmark: one denoising step (one transformer
forward) for B targets that share K clean references.

Methods, all on the same FluxTransformer2DModel with the same inputs:

  in-batch   rows [B targets ; K references] in one group (G = B + K, T = B): the
             references' forwards are recomputed at every step (training-style joint
             inference).
  replay     B target rows reading the references' K/V from a ReferenceKVCache
             (recorded once per story, outside the timed step).
  flux2-kv   B target rows, diffusers' FLUX.2 reference-KV approach at equal shapes:
             diffusers' own ``_flux2_kv_causal_attention`` (cached reference K/V
             concatenated into every call, then SDPA) called from the FLUX.1
             attention layers with the same cached pool.  diffusers 0.42 ships that
             path for Flux2 only (Flux2KVAttnProcessor), so the function is imported
             and driven by a small FLUX.1 processor written here.
  plain      B target rows without references (the floor).

Models (random weights):
  tiny         the test model: 2 double + 2 single blocks, 2 heads x 16, 32 text +
               256 image tokens.
  flux-blocks  one FLUX.1-dev double block + one single block (hidden 3072, 24 x 128
               heads, joint_attention_dim 4096), 512 text + 1024 image tokens
               (``--image-tokens 4096`` for 1024^2).
  flux-full    (GPU only, ``--full-model``) FLUX.1-dev sized: 19 double + 38 single.

The FLOP model counts every nn.Linear on the tokens it sees plus attention matmuls
(4 * Lq * Lkv * H * D per row and layer).  in-batch / replay FLOP ratio = the speed-up
replay should give; the table prints measured / model ("efficiency", >= 0.8 expected).

Peak memory: replay, flux2-kv and in-batch for B = 1..16 targets sharing one pool of K
references on the flux-blocks model (fewer tokens on CPU to keep the run short);
CUDA: torch.cuda.max_memory_allocated; CPU: resident-set high-water mark (Linux
/proc, see benchmarks/_common.py).

Usage:
  python benchmarks/bench_gsa_e2e.py           # CPU default: a few minutes
  python benchmarks/bench_gsa_e2e.py --flux2   # FLUX.2 rows (bench_gsa_e2e_flux2.py)
  python benchmarks/bench_gsa_e2e.py --quick   # smaller token counts, fewer cases
Writes benchmarks/results/bench_gsa_e2e_{cpu,gpu}.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _common as C  # noqa: E402

from storyattn import GroupSharedAttention, ReferenceKVCache  # noqa: E402

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
FLUX_BLOCKS = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_FULL = dict(FLUX_BLOCKS, num_layers=19, num_single_layers=38)


# ----------------------------------------------------------------------------- FLOP model
def linear_flops_per_row(cfg: dict, Lt: int, Li: int) -> float:
    """FLOPs of every nn.Linear of FluxTransformer2DModel for one row (2 * in * out per
    token it is applied to)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    cin, J, P = cfg["in_channels"], cfg["joint_attention_dim"], cfg["pooled_projection_dim"]
    f = 2 * cin * d * Li + 2 * J * d * Lt                       # x / context embedders
    f += 2 * (256 * d + d * d + P * d + d * d)                  # timestep + pooled text
    if cfg.get("guidance_embeds"):
        f += 2 * (256 * d + d * d)
    # q, k, v, out (4 d^2) + FFN d->4d->d (8 d^2): 12 d^2 MACs per token and stream;
    # single blocks: q, k, v (3 d^2) + proj_mlp (4 d^2) + proj_out (5d -> d): 12 d^2.
    per_token = 2 * 12 * d * d
    f += cfg["num_layers"] * (2 * 2 * d * 6 * d + per_token * (Lt + Li))
    f += cfg["num_single_layers"] * (2 * d * 3 * d + per_token * (Lt + Li))
    f += 2 * d * 2 * d + 2 * d * cfg["in_channels"] * Li         # norm_out, proj_out
    return float(f)


def attention_flops(cfg: dict, rows: int, Lq: int, Lkv: int) -> float:
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return 4.0 * rows * Lq * Lkv * d * (cfg["num_layers"] + cfg["num_single_layers"])


def step_flops(cfg: dict, method: str, B: int, K: int, Lt: int, Li: int) -> float:
    Lq = Lt + Li
    shared = attention_flops(cfg, B, Lq, Lq + K * Li) if method != "plain" else \
        attention_flops(cfg, B, Lq, Lq)
    if method == "in-batch":
        return (B + K) * linear_flops_per_row(cfg, Lt, Li) + shared + \
            attention_flops(cfg, K, Lq, Lq)
    return B * linear_flops_per_row(cfg, Lt, Li) + shared


# ----------------------------------------------------------------------------- FLUX.2 baseline
class Flux2KVBaselineProcessor:
    """FLUX.1 attention whose targets read cached reference K/V the FLUX.2 way:
    diffusers' ``_flux2_kv_causal_attention`` concatenates ``[text ; refs ; image]``
    keys/values in every call (the pool expanded to the batch) and runs SDPA."""

    def __init__(self, pool: Tuple[torch.Tensor, torch.Tensor], text_len: int):
        self.pool = pool
        self.text_len = text_len

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux2 import (
            Flux2KVLayerCache, _flux2_kv_causal_attention)

        hd = lambda t: t.unflatten(-1, (-1, attn.head_dim))  # noqa: E731
        q = attn.norm_q(hd(attn.to_q(hidden_states)))
        k = attn.norm_k(hd(attn.to_k(hidden_states)))
        v = hd(attn.to_v(hidden_states))
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            q = torch.cat([attn.norm_added_q(hd(attn.add_q_proj(e))), q], 1)
            k = torch.cat([attn.norm_added_k(hd(attn.add_k_proj(e))), k], 1)
            v = torch.cat([hd(attn.add_v_proj(e)), v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        B = q.shape[0]
        pk, pv = self.pool
        P, Lr, H, D = pk.shape
        cache = Flux2KVLayerCache()
        # FLUX.2 keeps the reference K/V per batch row: [B, refs * Lr, H, D].
        cache.store(pk.reshape(1, P * Lr, H, D).expand(B, -1, -1, -1),
                    pv.reshape(1, P * Lr, H, D).expand(B, -1, -1, -1))
        out = _flux2_kv_causal_attention(q, k, v, self.text_len, 0, kv_cache=cache)
        out = out.flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        n = encoder_hidden_states.shape[1]
        return attn.to_out[1](attn.to_out[0](out[:, n:])), attn.to_add_out(out[:, :n])


# ----------------------------------------------------------------------------- harness
def build(cfg: dict, device: str, dtype: torch.dtype, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        m = FluxTransformer2DModel(**cfg)
    return m.to(dtype).eval()


def inputs(cfg: dict, rows: int, Lt: int, side: int, device, dtype, seed=0, timestep=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    t = torch.rand(rows, generator=g) if timestep is None else torch.full((rows,), timestep)
    x = dict(hidden_states=torch.randn(rows, side * side, cfg["in_channels"], generator=g),
             encoder_hidden_states=torch.randn(rows, Lt, cfg["joint_attention_dim"], generator=g),
             pooled_projections=torch.randn(rows, cfg["pooled_projection_dim"], generator=g),
             timestep=t, img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(Lt, 3))
    if cfg.get("guidance_embeds"):
        x["guidance"] = torch.full((rows,), 3.5)
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
            for k, v in x.items()}


def cat_inputs(a: dict, b: dict) -> dict:
    per_row = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
               "guidance")
    return {k: (torch.cat([a[k], b[k]]) if k in per_row else a[k]) for k in a}


class Case:
    """One model + token counts; builds the step closures of every method."""

    def __init__(self, name, cfg, Lt, side, device, dtype):
        self.name, self.cfg, self.Lt, self.side = name, cfg, Lt, side
        self.Li = side * side
        self.device, self.dtype = device, dtype
        self.model = build(cfg, device, dtype)
        self.gsa = GroupSharedAttention(self.model)
        self.attns = [b.attn for b in self.model.transformer_blocks] + \
                     [b.attn for b in self.model.single_transformer_blocks]

    def record(self, K: int) -> Tuple[ReferenceKVCache, dict]:
        refs = inputs(self.cfg, K, self.Lt, self.side, self.device, self.dtype, seed=100,
                      timestep=0.0)
        cache = ReferenceKVCache()
        with torch.no_grad(), self.gsa.record(cache):
            self.model(**refs)
        return cache, refs

    def steps(self, B: int, K: int):
        cache, refs = self.record(K)
        tg = inputs(self.cfg, B, self.Lt, self.side, self.device, self.dtype, seed=B)
        joint = cat_inputs(tg, refs)
        m, gsa = self.model, self.gsa

        def in_batch():
            with gsa.in_batch(group_size=B + K, num_targets=B):
                return m(**joint).sample[:B]

        def replay():
            with gsa.replay(cache):
                return m(**tg).sample

        def plain():
            return m(**tg).sample

        def flux2():
            mine = [a.processor for a in self.attns]
            for i, a in enumerate(self.attns):
                a.set_processor(Flux2KVBaselineProcessor(cache.layer(i), self.Lt))
            try:
                return m(**tg).sample
            finally:
                for a, p in zip(self.attns, mine):
                    a.set_processor(p)

        return {"in-batch": in_batch, "replay": replay, "flux2-kv": flux2, "plain": plain}, cache


def _interleaved_ms(fns: Dict[str, object], names: List[str], reps: int, warmup: int
                    ) -> Dict[str, float]:
    """CPU timer: methods run round-robin, median per method, so that a load change
    on a shared machine hits every method alike."""
    import statistics

    for _ in range(warmup):
        for n in names:
            fns[n]()
    ts = {n: [] for n in names}
    for _ in range(reps):
        for n in names:
            t0 = time.perf_counter()
            fns[n]()
            ts[n].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(v) for n, v in ts.items()}


def run_timing(case: Case, BK: List[Tuple[int, int]], reps: int, warmup: int,
               methods=("replay", "in-batch", "flux2-kv", "plain")) -> List[Dict]:
    out = []
    for B, K in BK:
        fns, cache = case.steps(B, K)
        res, ref = {}, None
        with torch.no_grad():
            diffs = {}
            for meth in methods:
                y = fns[meth]()
                if ref is None:
                    ref = y.float()
                diffs[meth] = float((y.float() - ref).abs().max() / ref.abs().max())
                del y
            if case.device == "cuda":
                times = {m: C.time_fn(fns[m], case.device) for m in methods}
            else:
                times = _interleaved_ms(fns, list(methods), reps, warmup)
        for meth in methods:
            fl = step_flops(case.cfg, meth, B, K, case.Lt, case.Li)
            ms = times[meth]
            res[meth] = dict(ms=ms, flops=fl, rel_diff_vs_replay=diffs[meth])
            print(f"  {case.name:11s} B={B:2d} K={K} {meth:9s} {ms:10.1f} ms  "
                  f"{fl / 1e12:8.3f} TFLOP  {fl / ms / 1e9:7.3f} TFLOP/s  "
                  f"diff vs replay {diffs[meth]:.1e}", flush=True)
        model_ratio = res["in-batch"]["flops"] / res["replay"]["flops"]
        meas_ratio = res["in-batch"]["ms"] / res["replay"]["ms"]
        out.append(dict(model=case.name, B=B, K=K, text_tokens=case.Lt, image_tokens=case.Li,
                        heads=case.cfg["num_attention_heads"],
                        head_dim=case.cfg["attention_head_dim"],
                        double_blocks=case.cfg["num_layers"],
                        single_blocks=case.cfg["num_single_layers"],
                        dtype=str(case.dtype).replace("torch.", ""), reps=reps,
                        methods=res, flop_model_ratio=model_ratio, measured_ratio=meas_ratio,
                        efficiency=meas_ratio / model_ratio,
                        flux2_over_replay=res["flux2-kv"]["ms"] / res["replay"]["ms"],
                        cache_nbytes=cache.nbytes))
        print(f"  -> in-batch/replay measured {meas_ratio:.2f}x, FLOP model {model_ratio:.2f}x, "
              f"efficiency {meas_ratio / model_ratio:.2f}; flux2-kv/replay "
              f"{res['flux2-kv']['ms'] / res['replay']['ms']:.2f}x", flush=True)
    return out


def run_memory(case: Case, Bs: List[int], K: int) -> List[Dict]:
    out = []
    for B in Bs:
        fns, cache = case.steps(B, K)
        row = dict(model=case.name, B=B, K=K, text_tokens=case.Lt, image_tokens=case.Li,
                   pool_mib=cache.nbytes / 2**20)
        for meth in ("replay", "flux2-kv", "in-batch"):
            with torch.no_grad():
                fns[meth]()  # first-call allocations (rotary tables, etc.) are not the step's
                t0 = time.perf_counter()
                peak = C.peak_extra_bytes(fns[meth], case.device)
                row[f"{meth}_peak_mib"] = peak / 2**20
                row[f"{meth}_ms"] = (time.perf_counter() - t0) * 1e3
        out.append(row)
        print(f"  mem B={B:2d} K={K}: replay {row['replay_peak_mib']:8.1f} MiB  flux2-kv "
              f"{row['flux2-kv_peak_mib']:8.1f} MiB  in-batch {row['in-batch_peak_mib']:8.1f} MiB"
              f"  (pool {row['pool_mib']:.1f} MiB)", flush=True)
        del fns, cache
        if case.device == "cuda":
            torch.cuda.empty_cache()
    return out


def report(timing, memory, env, args, cmd):
    headers = ["model", "tokens t+i", "B", "K", "in-batch ms", "replay ms", "flux2-kv ms",
               "plain ms", "measured x", "FLOP-model x", "efficiency", "flux2/replay"]
    rows = [[r["model"], f"{r['text_tokens']}+{r['image_tokens']}", r["B"], r["K"],
             f"{r['methods']['in-batch']['ms']:.1f}", f"{r['methods']['replay']['ms']:.1f}",
             f"{r['methods']['flux2-kv']['ms']:.1f}",
             f"{r['methods']['plain']['ms']:.1f}" if "plain" in r["methods"] else "-",
             f"{r['measured_ratio']:.2f}", f"{r['flop_model_ratio']:.2f}",
             f"{r['efficiency']:.2f}", f"{r['flux2_over_replay']:.2f}"] for r in timing]
    mheaders = ["model", "tokens t+i", "K", "B", "pool MiB", "replay peak MiB",
                "flux2-kv peak MiB", "in-batch peak MiB"]
    mrows = [[r["model"], f"{r['text_tokens']}+{r['image_tokens']}", r["K"], r["B"],
              f"{r['pool_mib']:.1f}", f"{r['replay_peak_mib']:.1f}",
              f"{r['flux2-kv_peak_mib']:.1f}", f"{r['in-batch_peak_mib']:.1f}"] for r in memory]
    print()
    print(C.text_table(headers, rows))
    if mrows:
        print()
        print(C.text_table(mheaders, mrows))
    notes = [
        "- one step = one transformer forward; replay excludes the one-off record forward "
        "of the references (amortised over every step and guidance branch).",
        "- FLOP model: every nn.Linear on the tokens it sees + attention matmuls "
        "(4 Lq Lkv H D per row and layer); efficiency = measured ratio / model ratio "
        "(>= 0.8 expected).",
        "- flux2-kv: diffusers' `_flux2_kv_causal_attention` (FLUX.2 reference-KV path: "
        "cached ref K/V concatenated per call + SDPA) driven from FLUX.1 layers, same pool.",
        "- peak memory: extra bytes during the step beyond what was live before it "
        + ("(torch.cuda.max_memory_allocated)." if env.get("gpu") else
           "(CPU resident-set high-water mark; includes allocator slack, so small "
           "differences are noise)."),
    ]
    if timing:
        for model in dict.fromkeys(r["model"] for r in timing):
            effs = [r["efficiency"] for r in timing if r["model"] == model]
            notes.append(f"- {model}: efficiency min {min(effs):.2f}, max {max(effs):.2f} over "
                         f"{len(effs)} cases" + (" (per-call overhead, not FLOPs, dominates "
                                                 "this model: the FLOP model does not apply)"
                                                 if model == "tiny" else "") + ".")
    try:
        notes.append(f"- load average during the run: {os.getloadavg()[0]:.1f} on "
                     f"{os.cpu_count()} CPUs (shared machine: CPU timings are noisy).")
    except OSError:
        pass
    notes.append(f"- reproduce: `{cmd}`")
    md = "## One denoising step\n\n" + C.markdown_table(headers, rows)
    if mrows:
        md += "\n\n## Peak memory, B targets sharing one pool\n\n" + C.markdown_table(mheaders, mrows)
    notes_s = "\n".join(notes)
    print("\n" + notes_s)
    rows_out = [dict(kind="step", **r) for r in timing] + [dict(kind="memory", **r) for r in memory]
    paths = C.write_results("bench_gsa_e2e", env, rows_out, md, notes_s)
    print("wrote " + ", ".join(paths))


def main(argv: Optional[List[str]] = None):
    if "--flux2" in (sys.argv[1:] if argv is None else argv):
        # FLUX.2 [klein] rows (B targets x K shared references against diffusers'
        # Flux2KleinKVPipeline path): benchmarks/bench_gsa_e2e_flux2.py, its own options
        import bench_gsa_e2e_flux2

        return bench_gsa_e2e_flux2.main(argv)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer cases, fewer tokens")
    p.add_argument("--image-tokens", type=int, default=1024, choices=(1024, 4096),
                   help="flux-blocks image tokens (4096 = 1024^2)")
    p.add_argument("--full-model", action="store_true",
                   help="also the FLUX.1-dev sized model (19 + 38 blocks; GPU only)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even with a GPU")
    p.add_argument("--smoke", action="store_true",
                   help="the tiny model only (tools/gpu_session.sh --dry-run): harness check")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--mem-batches", default="1,2,4,8,16")
    p.add_argument("--mem-k", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: steadier timings on a shared machine)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
        # Set up the RSS meter (glibc mmap threshold) before any tensor is allocated,
        # so freed blocks leave the resident set and peaks are measured, not hidden.
        C.peak_extra_bytes(lambda: None, "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gpu = device == "cuda"
    t0 = time.time()
    side = int(round(args.image_tokens ** 0.5))
    timing, memory = [], []

    print("tiny model", flush=True)
    tiny = Case("tiny", TINY, 32, 16, device, dtype)
    timing += run_timing(tiny, [(1, 1), (1, 3), (4, 3)], reps=args.reps or 15, warmup=2)
    del tiny
    if args.smoke:
        report(timing, memory, C.environment(device), args, "python benchmarks/bench_gsa_e2e.py --smoke")
        print(f"total {time.time() - t0:.0f} s")
        return

    if args.quick:
        fb_text, fb_side, fb_cases = 128, 16, [(1, 1), (1, 2)]
    else:
        fb_text, fb_side = 512, side
        fb_cases = [(1, 1), (1, 2), (2, 3)] if gpu else [(1, 1), (1, 2)]
    print(f"flux-blocks: {fb_text} text + {fb_side ** 2} image tokens", flush=True)
    fb = Case("flux-blocks", FLUX_BLOCKS, fb_text, fb_side, device, dtype)
    # CPU: no "plain" floor and two interleaved rounds keep this to a few minutes.
    timing += run_timing(fb, fb_cases, reps=args.reps or (10 if gpu else 2),
                         warmup=3 if gpu else 0,
                         methods=("replay", "in-batch", "flux2-kv", "plain") if gpu
                         else ("replay", "in-batch", "flux2-kv"))
    if not args.no_memory:
        # CPU: the sweep uses fewer tokens so 5 batch sizes x 3 methods stay short.
        mem_case = fb if gpu else Case("flux-blocks", FLUX_BLOCKS, 32, 8 if args.quick else 12,
                                       device, dtype)
        bs = [int(b) for b in args.mem_batches.split(",")]
        if args.quick and not gpu:
            bs = [b for b in bs if b in (1, 4, 16)]
        memory = run_memory(mem_case, bs, args.mem_k)
        del mem_case
    del fb

    if args.full_model:
        if not gpu:
            print("--full-model needs a GPU (57 FLUX-sized blocks on CPU would take hours); "
                  "skipped")
        else:
            full = Case("flux-full", FLUX_FULL, 512, side, device, dtype)
            timing += run_timing(full, [(1, 1), (1, 3), (4, 3)], reps=args.reps or 5, warmup=2)
            del full

    cmd = "python benchmarks/bench_gsa_e2e.py" + " ".join(
        [""] + (["--quick"] if args.quick else []) +
        ([f"--image-tokens {args.image_tokens}"] if args.image_tokens != 1024 else []) +
        (["--full-model"] if args.full_model else []))
    env = C.environment(device)
    report(timing, memory, env, args, cmd)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
