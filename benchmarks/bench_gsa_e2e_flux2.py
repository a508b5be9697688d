"""FLUX.2 rows of the end-to-end GSA benchmark: B targets x K shared references.

Run through ``python benchmarks/bench_gsa_e2e.py --flux2 [options]`` (or this file).

Both methods run the same ``Flux2Transformer2DModel`` (random weights) with the KV
processors ``Flux2KleinKVPipeline`` installs, on the same inputs:

  storyattn   GSA installed; the K references recorded once into a ReferenceKVCache (one
              copy, K entries; text-free, timestep 0, as the KV pipeline records them);
              each denoising step: B target rows inside ``gsa.replay(cache)``: the pool
              is read in place by segment attention (no concatenation, no copies).
  flux2-kv    diffusers' path, as Flux2KleinKVPipeline runs it: step 0 ("extract") puts
              the K references' tokens into every one of the B rows and keeps their K/V
              per row (B copies); every later step ("cached") concatenates
              ``[text ; refs ; image]`` keys/values in every layer.

Reported per (B, K): one denoising step (storyattn replay vs flux2-kv cached step), the
one-off reference pass (storyattn record of K images vs flux2-kv extract step 0), the
reference cache bytes each keeps and each step's peak extra memory, all measured in one
run, and the ratios.  FLOP model of a step (the same for both methods: the same keys
are read): every nn.Linear on the tokens it sees (26 d^2 FLOPs per token and layer in
both block types) + attention (4 Lq Lkv d per row and layer).  "growth" = (ms / ms of
the smallest case) / (FLOPs / FLOPs of the smallest case): <= ~1 means the cost grows
no faster than the FLOP model.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _common as C  # noqa: E402

from storyattn import GroupSharedAttention, ReferenceKVCache  # noqa: E402

_BASE = dict(patch_size=1, in_channels=128, attention_head_dim=128, mlp_ratio=3.0,
             timestep_guidance_channels=256, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000,
             guidance_embeds=False)
SIZES = {
    # CPU: a klein-shaped slice at medium width (6 heads x 128 = 768)
    "medium": dict(_BASE, num_layers=1, num_single_layers=2, num_attention_heads=6,
                   joint_attention_dim=768),
    # klein 4B: Qwen3-4B text (3 x 2560), 24 heads x 128, 5 double + 20 single blocks
    "klein-4b": dict(_BASE, num_layers=5, num_single_layers=20, num_attention_heads=24,
                     joint_attention_dim=7680),
    # klein 9B: Qwen3-8B text (3 x 4096), 32 heads x 128, 8 double + 24 single blocks
    "klein-9b": dict(_BASE, num_layers=8, num_single_layers=24, num_attention_heads=32,
                     joint_attention_dim=12288),
}


def step_flops(cfg: dict, B: int, K: int, Lt: int, Li: int) -> float:
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    layers = cfg["num_layers"] + cfg["num_single_layers"]
    Lq = Lt + Li
    linear = 2 * 13 * d * d * Lq * layers + 2 * (cfg["in_channels"] * Li +
                                               cfg["joint_attention_dim"] * Lt) * d
    return float(B * (linear + 4 * Lq * (Lq + K * Li) * d * layers))


def _ids(side: int, t: float = 0.0) -> torch.Tensor:
    r = torch.arange(side).repeat_interleave(side)
    c = torch.arange(side).repeat(side)
    ids = torch.stack([torch.zeros_like(r), r, c, torch.zeros_like(r)], -1).float()
    ids[:, 0] = t
    return ids


class Case:
    def __init__(self, name: str, Lt: int, side: int, device: str, dtype: torch.dtype):
        from diffusers.models.transformers.transformer_flux2 import (
            Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor, Flux2Transformer2DModel)

        self.name, self.cfg, self.Lt, self.side, self.Li = name, SIZES[name], Lt, side, side * side
        self.device, self.dtype = device, dtype
        torch.manual_seed(0)
        with torch.device(device):
            m = Flux2Transformer2DModel(**self.cfg)
        for b in m.transformer_blocks:  # what Flux2KleinKVPipeline installs
            b.attn.set_processor(Flux2KVAttnProcessor())
        for b in m.single_transformer_blocks:
            b.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
        self.model = m.to(dtype).eval()
        self.gsa = GroupSharedAttention(self.model)

    def _rand(self, *shape, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*shape, generator=g).to(self.device, self.dtype)

    def steps(self, B: int, K: int) -> Dict[str, object]:
        m, gsa, cfg, dev, dt = self.model, self.gsa, self.cfg, self.device, self.dtype
        Lt, Li, side = self.Lt, self.Li, self.side
        refs = self._rand(K, Li, cfg["in_channels"], seed=100)
        tgt = dict(hidden_states=self._rand(B, Li, cfg["in_channels"], seed=B),
                   encoder_hidden_states=self._rand(B, Lt, cfg["joint_attention_dim"], seed=B + 1),
                   timestep=torch.full((B,), 0.7, device=dev, dtype=dt),
                   img_ids=_ids(side).to(dev),
                   txt_ids=torch.stack([torch.zeros(Lt)] * 3 + [torch.arange(Lt).float()],
                                       -1).to(dev),
                   guidance=None, return_dict=False)
        ref_ids = torch.cat([_ids(side, 10.0 * (i + 1)) for i in range(K)]).to(dev)
        extract_in = dict(tgt, hidden_states=torch.cat(
            [refs.reshape(1, K * Li, -1).expand(B, -1, -1), tgt["hidden_states"]], 1),
            img_ids=torch.cat([ref_ids, tgt["img_ids"]]))
        state = {}

        def record():  # storyattn's one-off reference pass: K images, one copy
            cache = ReferenceKVCache(capacity=K)
            with gsa.record(cache):
                m(hidden_states=refs, encoder_hidden_states=torch.zeros(
                    K, 0, cfg["joint_attention_dim"], device=dev, dtype=dt),
                  timestep=torch.zeros(K, device=dev, dtype=dt), img_ids=_ids(side).to(dev),
                  txt_ids=torch.zeros(0, 4, device=dev), guidance=None, return_dict=False)
            state["pool"] = cache

        def extract():  # diffusers' step 0: the references in every row, K/V kept per row
            state["kv"] = m(**extract_in, kv_cache_mode="extract", num_ref_tokens=K * Li)[1]

        def replay():
            with gsa.replay(state["pool"]):
                return m(**tgt)[0]

        def cached():
            return m(**tgt, kv_cache=state["kv"], kv_cache_mode="cached")[0]

        with torch.no_grad():
            record()
            extract()
        return dict(record=record, extract=extract, replay=replay, cached=cached, state=state)


def _kv_bytes(kv) -> int:
    return sum(t.numel() * t.element_size() for c in kv.double_block_caches + kv.single_block_caches
               for t in (c.k_ref, c.v_ref))


def run(case: Case, BK, reps: int) -> List[Dict]:
    rows, base = [], None
    for B, K in BK:
        f = case.steps(B, K)
        with torch.no_grad():
            diff = float((f["replay"]() - f["cached"]()).float().abs().max())
            times = C.time_round_robin({k: f[k] for k in ("replay", "cached", "record", "extract")},
                                       case.device, reps=reps)
            peak = {k: C.peak_extra_bytes(f[k], case.device) / 2**20 for k in ("replay", "cached")}
        pool_mib = f["state"]["pool"].nbytes / 2**20
        kv_mib = _kv_bytes(f["state"]["kv"]) / 2**20
        fl = step_flops(case.cfg, B, K, case.Lt, case.Li)
        row = dict(model=case.name, B=B, K=K, text_tokens=case.Lt, image_tokens=case.Li,
                   dtype=str(case.dtype).replace("torch.", ""),
                   storyattn_step_ms=times["replay"], flux2_kv_step_ms=times["cached"],
                   storyattn_record_ms=times["record"], flux2_kv_extract_ms=times["extract"],
                   storyattn_cache_mib=pool_mib, flux2_kv_cache_mib=kv_mib,
                   storyattn_step_peak_mib=peak["replay"], flux2_kv_step_peak_mib=peak["cached"],
                   step_flops=fl, max_abs_diff=diff)
        row["step_time_ratio"] = times["cached"] / times["replay"]
        row["cache_mem_ratio"] = kv_mib / pool_mib
        row["step_peak_ratio"] = (peak["cached"] + kv_mib) / max(peak["replay"] + pool_mib, 1e-9)
        if base is None:
            base = row
        for meth, key in (("storyattn", "storyattn_step_ms"), ("flux2_kv", "flux2_kv_step_ms")):
            row[f"{meth}_growth"] = (row[key] / base[key]) / (fl / base["step_flops"])
        rows.append(row)
        print(f"  {case.name} B={B} K={K}: step storyattn {times['replay']:.1f} ms / flux2-kv "
              f"{times['cached']:.1f} ms ({row['step_time_ratio']:.2f}x); refs record "
              f"{times['record']:.1f} / extract {times['extract']:.1f} ms; cache {pool_mib:.1f} / "
              f"{kv_mib:.1f} MiB ({row['cache_mem_ratio']:.1f}x); growth vs FLOPs "
              f"{row['storyattn_growth']:.2f} / {row['flux2_kv_growth']:.2f}; |diff| {diff:.2g}",
              flush=True)
        del f
        if case.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def report(rows, env, cmd):
    headers = ["model", "t+i", "B", "K", "storyattn ms", "flux2-kv ms", "step x",
               "record ms", "extract ms", "cache MiB sa/kv", "cache x", "step+cache peak x",
               "growth sa/kv", "max|diff|"]
    table = [[r["model"], f"{r['text_tokens']}+{r['image_tokens']}", r["B"], r["K"],
              f"{r['storyattn_step_ms']:.1f}", f"{r['flux2_kv_step_ms']:.1f}",
              f"{r['step_time_ratio']:.2f}", f"{r['storyattn_record_ms']:.1f}",
              f"{r['flux2_kv_extract_ms']:.1f}",
              f"{r['storyattn_cache_mib']:.1f}/{r['flux2_kv_cache_mib']:.1f}",
              f"{r['cache_mem_ratio']:.1f}", f"{r['step_peak_ratio']:.2f}",
              f"{r['storyattn_growth']:.2f}/{r['flux2_kv_growth']:.2f}",
              f"{r['max_abs_diff']:.1e}"] for r in rows]
    print()
    print(C.text_table(headers, table))
    notes = "\n".join([
        "- step x = flux2-kv cached step ms / storyattn replay step ms (same FLOPs); "
        "cache x = reference K/V bytes flux2-kv keeps (B copies) / storyattn's pool (one).",
        "- step+cache peak x = (step peak extra + cache) of flux2-kv / of storyattn.",
        "- record / extract: the one-off reference pass (storyattn: once per story, K "
        "images alone; flux2-kv: step 0 of every pipeline call, B rows of K refs + target).",
        "- growth = (ms / ms of the first row) / (FLOPs / FLOPs of the first row).",
        f"- reproduce: `{cmd}`"])
    print("\n" + notes)
    md = "## FLUX.2: B targets x K shared references\n\n" + C.markdown_table(headers, table)
    paths = C.write_results("bench_gsa_e2e_flux2", env, [dict(kind="flux2", **r) for r in rows],
                            md, notes)
    print("wrote " + ", ".join(paths))


def main(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flux2", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default=None,
                   help="comma list of medium, klein-4b, klein-9b (default: medium on CPU, "
                        "klein-4b,klein-9b on a GPU)")
    p.add_argument("--image-tokens", type=int, default=None,
                   help="image tokens per image (default 256 on CPU, 1024 = 512^2 on GPU)")
    p.add_argument("--text-tokens", type=int, default=None, help="default 64 CPU, 512 GPU")
    p.add_argument("--bk", default="1x1,1x3,4x1,4x3", help="B x K cases")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    gpu = device == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
        C.peak_extra_bytes(lambda: None, "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    sizes = (args.sizes or ("klein-4b,klein-9b" if gpu else "medium")).split(",")
    Li = args.image_tokens or (1024 if gpu else 256)
    Lt = args.text_tokens or (512 if gpu else 64)
    side = int(round(Li ** 0.5))
    bk = [tuple(int(x) for x in s.split("x")) for s in args.bk.split(",")]
    t0, rows = time.time(), []
    for name in sizes:
        print(f"{name}: {Lt} text + {side * side} image tokens, {device} {dtype}", flush=True)
        case = Case(name, Lt, side, device, dtype)
        rows += run(case, bk, reps=args.reps or (5 if gpu else 3))
        del case
        if gpu:
            torch.cuda.empty_cache()
    cmd = "python benchmarks/bench_gsa_e2e.py --flux2" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (("sizes", args.sizes), ("image_tokens",
                                                     args.image_tokens), ("bk", args.bk))
        if v is not None and not (k == "bk" and v == "1x1,1x3,4x1,4x3")) + \
        (" --cpu" if args.cpu else "")
    report(rows, C.environment(device), cmd)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
