"""Train-step time and peak memory of GSA LoRA training: storyattn vs naive concat.

One training step of ``python -m pipelines.train --stage gsa`` (forward of a GSA
in-batch group, flow-matching loss on the target, backward into the LoRA weights,
AdamW step) with two attention paths on the same model and inputs:

* ``storyattn``: ``storyattn.GroupSharedAttention`` in-batch mode (targets read the
  references' image tokens through ``segment_attention``; nothing concatenated).
* ``naive_concat``: a processor written here that does what a plain implementation
  does: for every target, ``torch.cat`` its own keys/values with the group's
  reference image keys/values and call SDPA; references attend to themselves.
  Same reference placement (keys rotated to index ``j + 1``), so both compute the
  same loss, which the script checks.

Configs: ``tiny`` (the tiny FLUX of ``pipelines/tiny.py``), ``flux_blocks``
(FLUX.1 width: 3072 hidden, 24 heads x 128, T5 width 4096, one double + one
single block, 64 image tokens) and ``flux_single_long`` (one FLUX-width single
block, 256 image tokens, 3 references): short enough to run in minutes on a CPU.  Time = median of repeats after a
warm-up step; memory = peak bytes above what was live before the step (CUDA peak
counter on GPU; resident-set high-water mark on CPU, see benchmarks/_common.py).

    python benchmarks/bench_train.py                    # both configs, default device
    python benchmarks/bench_train.py --config tiny --reps 5
    python benchmarks/bench_train.py --device cuda      # GPU rows (bf16)

Writes ``benchmarks/results/bench_train_{cpu,gpu}.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import environment, markdown_table, peak_extra_bytes, text_table, write_results  # noqa: E402

from pipelines import flow_matching as L  # noqa: E402
from pipelines.train import model as M  # noqa: E402

CONFIGS = {
    # name: (transformer config overrides, image tokens side, text tokens, refs, batch groups)
    "tiny": ({}, 8, 32, 2, 1),
    "flux_blocks": ({"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128,
                     "num_attention_heads": 24, "joint_attention_dim": 4096,
                     "pooled_projection_dim": 768, "axes_dims_rope": (16, 56, 56)}, 8, 64, 2, 1),
    # one FLUX-width single-stream block, 256 image tokens (256x256 px), 3 references
    "flux_single_long": ({"num_layers": 0, "num_single_layers": 1, "attention_head_dim": 128,
                          "num_attention_heads": 24, "joint_attention_dim": 4096,
                          "pooled_projection_dim": 768, "axes_dims_rope": (16, 56, 56)},
                         16, 32, 3, 1),
}

DEFAULT_REPS = {"tiny": 15, "flux_blocks": 3, "flux_single_long": 3}


class NaiveConcatFluxProcessor:
    """In-batch group attention by concatenation (the baseline).

    Rows come in groups of ``group_size``; the first ``num_targets`` are targets.
    A target's keys/values are ``cat([own text+image ; ref_1 image ; ... ])`` (the
    reference keys rotated to index ``j + 1`` like storyattn places them); SDPA over
    that.  References attend only to themselves.  The grouping lives on the
    instance (``set_group``): this is a benchmark baseline, not library code.
    """

    def __init__(self, pos_embed):
        self.pos_embed = pos_embed
        self.group_size = self.num_targets = 0

    def set_group(self, group_size, num_targets):
        self.group_size, self.num_targets = group_size, num_targets

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        D = attn.head_dim
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k, v = (x.unflatten(-1, (-1, D)) for x in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        double = encoder_hidden_states is not None
        if double:
            eq = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, D))
            ek = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, D))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, D))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
            text_len = encoder_hidden_states.shape[1]
        else:
            text_len = self.text_len
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)

        B, S, H, _ = q.shape
        G, T = self.group_size, self.num_targets
        ng, K = B // G, G - T
        qg, kg, vg = (x.view(ng, G, S, H, D) for x in (q, k, v))
        ids = torch.zeros(K, len(self.pos_embed.axes_dim), device=q.device)
        ids[:, 0] = torch.arange(1, K + 1, device=q.device, dtype=ids.dtype)
        cos, sin = self.pos_embed(ids)                         # [K, D]
        outs = []
        for g in range(ng):
            refs_k = []
            for j in range(K):
                kr = kg[g, T + j, text_len:]                   # [Lr, H, D]
                c = cos[j].expand(kr.shape[0], -1)
                s = sin[j].expand(kr.shape[0], -1)
                refs_k.append(apply_rotary_emb(kr.unsqueeze(0), (c, s), sequence_dim=1)[0])
            refs_v = [vg[g, T + j, text_len:] for j in range(K)]
            kt = torch.stack([torch.cat([kg[g, t]] + refs_k, 0) for t in range(T)])
            vt = torch.stack([torch.cat([vg[g, t]] + refs_v, 0) for t in range(T)])
            ot = F.scaled_dot_product_attention(qg[g, :T].transpose(1, 2), kt.transpose(1, 2),
                                                vt.transpose(1, 2)).transpose(1, 2)
            orf = F.scaled_dot_product_attention(qg[g, T:].transpose(1, 2),
                                                 kg[g, T:].transpose(1, 2),
                                                 vg[g, T:].transpose(1, 2)).transpose(1, 2)
            outs.append(torch.cat([ot, orf], 0))
        out = torch.cat(outs, 0).flatten(2, 3).to(q.dtype)
        if not double:
            return out
        enc, img = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        return img, attn.to_add_out(enc.contiguous())


class NaiveConcat:
    """Installs NaiveConcatFluxProcessor on every layer; ``in_batch`` like storyattn's."""

    def __init__(self, transformer):
        self.tr = transformer
        self.attns = [b.attn for b in transformer.transformer_blocks] + \
                     [b.attn for b in transformer.single_transformer_blocks]
        self.orig = [a.processor for a in self.attns]
        self.procs = [NaiveConcatFluxProcessor(transformer.pos_embed) for _ in self.attns]
        for a, p in zip(self.attns, self.procs):
            a.set_processor(p)

    def in_batch(self, group_size, num_targets, text_len):
        for p in self.procs:
            p.set_group(group_size, num_targets)
            p.text_len = text_len
        return _Null()

    def remove(self):
        for a, p in zip(self.attns, self.orig):
            a.set_processor(p)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def build(config: str, device: str, dtype: torch.dtype, rank: int):
    from diffusers import FluxTransformer2DModel

    from pipelines.tiny import tiny_flux_transformer_config

    over, side, text_len, refs, groups = CONFIGS[config]
    cfg = dict(tiny_flux_transformer_config(), **over)
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(**cfg).to(device=device, dtype=dtype)
    tr.requires_grad_(False)
    M.add_trainable_lora(tr, "gsa", rank)
    M.activate_adapters(tr, ["gsa"], trainable="gsa")
    with torch.no_grad():          # non-zero B: every LoRA path carries gradient
        for n, p in M.adapter_params(tr, "gsa").items():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    G = refs + 1
    rows = G * groups
    n_img = side * side
    g = torch.Generator().manual_seed(1)
    batch = {
        "x0": torch.randn(rows, n_img, cfg["in_channels"], generator=g).to(device),
        "noise": torch.randn(groups, n_img, cfg["in_channels"], generator=g).to(device),
        "text": torch.randn(rows, text_len, cfg["joint_attention_dim"], generator=g).to(device, dtype),
        "pooled": torch.randn(rows, cfg["pooled_projection_dim"], generator=g).to(device, dtype),
        "sigma": torch.full((groups,), 0.6, device=device),
        "ids": M.image_ids(2 * side, 2 * side, device, dtype),
        "G": G, "text_len": text_len,
    }
    n_params = sum(p.numel() for p in tr.parameters())
    meta = {"config": config, "hidden": cfg["num_attention_heads"] * cfg["attention_head_dim"],
            "heads": cfg["num_attention_heads"], "head_dim": cfg["attention_head_dim"],
            "double_blocks": cfg["num_layers"], "single_blocks": cfg["num_single_layers"],
            "image_tokens": n_img, "text_tokens": text_len, "refs": refs, "groups": groups,
            "rows": rows, "lora_rank": rank, "params": n_params,
            "trainable_params": M.count(M.trainable_parameters(tr))}
    return tr, batch, meta


def target_loss(tr, handle, batch, dtype, autocast: bool):
    """Flow-matching loss of the targets for one in-batch forward (refs at t = 0)."""
    G = batch["G"]
    x0 = batch["x0"]
    tgt = torch.arange(0, x0.shape[0], G, device=x0.device)
    packed = x0.clone()
    packed[tgt] = L.add_noise(x0[tgt], batch["noise"], batch["sigma"])
    sigma = torch.zeros(x0.shape[0], device=x0.device)
    sigma[tgt] = batch["sigma"]
    kw = {"text_len": batch["text_len"]} if isinstance(handle, NaiveConcat) else {}
    ctx = torch.autocast(x0.device.type, dtype=dtype) if autocast else _Null()
    with handle.in_batch(group_size=G, num_targets=1, **kw), ctx:
        pred = M.flux_forward(tr, packed.to(dtype), batch["text"], batch["pooled"], sigma,
                              batch["ids"], 1.0)
        return L.flow_matching_errors(pred[tgt], x0[tgt], batch["noise"]).mean()


def train_step(tr, handle, opt, batch, dtype, autocast: bool):
    loss = target_loss(tr, handle, batch, dtype, autocast)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _handle(tr, variant):
    from storyattn import GroupSharedAttention

    return GroupSharedAttention(tr) if variant == "storyattn" else NaiveConcat(tr)


def run_variants(tr, batch, variants, device, dtype, reps, autocast):
    """Time and measure every variant on the same weights.  Repeats are interleaved
    (A B A B ...) so load from other processes on a shared machine hits all
    variants alike; AdamW runs with lr 0 so every repeat sees the same weights."""
    params = M.trainable_parameters(tr)
    opt = torch.optim.AdamW(params, lr=0.0)
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    res = {v: {"variant": v, "times": []} for v in variants}

    def once(variant, fn):
        handle = _handle(tr, variant)
        try:
            return fn(handle)
        finally:
            handle.remove()

    for v in variants:                                          # warm-up, loss
        res[v]["loss"] = float(once(v, lambda h: train_step(tr, h, opt, batch, dtype, autocast)))
    for _ in range(reps):
        for v in variants:
            def timed(h):
                sync()
                t0 = time.perf_counter()
                train_step(tr, h, opt, batch, dtype, autocast)
                sync()
                return time.perf_counter() - t0
            res[v]["times"].append(once(v, timed))
    for v in variants:
        peak = once(v, lambda h: peak_extra_bytes(
            lambda: train_step(tr, h, opt, batch, dtype, autocast), device))
        t = sorted(res[v].pop("times"))
        res[v].update({"step_ms_median": round(1e3 * t[len(t) // 2], 1),
                       "step_ms_min": round(1e3 * t[0], 1), "reps": reps,
                       "peak_extra_mib": round(peak / 2**20, 2)})
    return res


def lora_grad_norm(tr, batch, variant, dtype, autocast):
    handle = _handle(tr, variant)
    params = M.trainable_parameters(tr)
    try:
        for p in params:
            p.grad = None
        loss = target_loss(tr, handle, batch, dtype, autocast)
        loss.backward()
        g = torch.cat([p.grad.flatten().float() for p in params])
        for p in params:
            p.grad = None
        return g
    finally:
        handle.remove()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=list(CONFIGS) + ["all"], default="all")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed repeats per variant (default 15 tiny, 3 flux_blocks)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    device = args.device
    gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    configs = list(CONFIGS) if args.config == "all" else [args.config]
    rows = []
    for config in configs:
        t0 = time.perf_counter()
        load_before = os.getloadavg()[0]
        tr, batch, meta = build(config, device, dtype, args.rank)
        print(f"[{config}] built in {time.perf_counter() - t0:.1f}s: {meta}", flush=True)
        g_sa = lora_grad_norm(tr, batch, "storyattn", dtype, gpu)
        g_nv = lora_grad_norm(tr, batch, "naive_concat", dtype, gpu)
        grad_rel = float((g_sa - g_nv).norm() / g_nv.norm().clamp_min(1e-30))
        reps = args.reps or DEFAULT_REPS[config]
        res = run_variants(tr, batch, ("storyattn", "naive_concat"), device, dtype, reps, gpu)
        for variant, r in res.items():
            print(f"[{config}] {variant}: {r}", flush=True)
        for variant, r in res.items():
            rows.append({**meta, **r, "device": device, "dtype": str(dtype).replace("torch.", ""),
                         "loss_abs_diff_vs_naive": abs(r["loss"] - res["naive_concat"]["loss"]),
                         "lora_grad_rel_diff_vs_naive": grad_rel,
                         "loadavg_1m_before": round(load_before, 2),
                         "loadavg_1m_after": round(os.getloadavg()[0], 2),
                         "command": f"python benchmarks/bench_train.py --config {config} "
                                    f"--device {device} --reps {reps}"})
        del tr, batch
    headers = ["config", "hidden", "blocks (d+s)", "tokens img+txt", "rows", "variant",
               "step ms (median)", "peak extra MiB", "loss diff", "grad rel diff"]
    table = [[r["config"], r["hidden"], f"{r['double_blocks']}+{r['single_blocks']}",
              f"{r['image_tokens']}+{r['text_tokens']}", r["rows"], r["variant"],
              r["step_ms_median"], r["peak_extra_mib"], f"{r['loss_abs_diff_vs_naive']:.1e}",
              f"{r['lora_grad_rel_diff_vs_naive']:.1e}"] for r in rows]
    print(text_table(headers, table))
    if not args.no_write:
        env = environment(device)
        notes = ("One LoRA training step (forward + backward + AdamW) on one GSA group "
                 "(1 target + refs) per row group; time = median of repeats after a warm-up "
                 "step; memory = peak above the memory live before the step (CPU: resident-set "
                 "high-water mark). 'loss diff' and 'grad rel diff' compare storyattn's loss and "
                 "LoRA gradient with the naive concat baseline on the same weights and inputs."
                 + ("" if gpu else " CPU only: no GPU was available for this run; no GPU figures "
                                   "are reported. The CPU is shared with other jobs: the JSON rows "
                                   "carry the 1-minute load average before/after each config, and "
                                   "repeats are interleaved so the load hits both variants alike."))
        for p in write_results("bench_train", env, rows, markdown_table(headers, table), notes):
            print("wrote", p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
