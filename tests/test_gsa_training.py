"""Training through GroupSharedAttention on a tiny random FluxTransformer2DModel:

* in-batch backward with peft LoRA == an independent naive concat implementation,
  and gradients reach the references' tokens;
* gradient checkpointing replays a forward with the context it first ran with;
* peft LoRA adapters are live inside the processors in replay.

Helpers (tiny model, inputs, rows) are test_gsa_processor.py's.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

from storyattn import GroupSharedAttention  # noqa: E402
from test_gsa_processor import (TOL, flux_inputs, group_rows, record_refs, rel_err,  # noqa: E402
                                rows, tiny_flux, zero_ref_timesteps)


# ----------------------------------------------------------------------------- naive reference
def _rope_complex(x, cos, sin):
    """RoPE written as a complex product (adjacent pairs), independent of diffusers."""
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    f = torch.complex(cos[..., 0::2].double(), sin[..., 0::2].double())
    return torch.view_as_real(xc * f).flatten(-2).to(x.dtype)


class NaiveGroupProcessor:
    """Group-shared attention by explicit concatenation, one row at a time (test only)."""

    def __init__(self, spec):
        self.spec = spec  # dict: G, T, text_len, place (cos, sin) [K, D], detach_refs

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        s = self.spec
        D = attn.head_dim
        hd = lambda t: t.unflatten(-1, (-1, D))  # noqa: E731
        q = attn.norm_q(hd(attn.to_q(hidden_states)))
        k = attn.norm_k(hd(attn.to_k(hidden_states)))
        v = hd(attn.to_v(hidden_states))
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            q = torch.cat([attn.norm_added_q(hd(attn.add_q_proj(e))), q], 1)
            k = torch.cat([attn.norm_added_k(hd(attn.add_k_proj(e))), k], 1)
            v = torch.cat([hd(attn.add_v_proj(e)), v], 1)
        cos, sin = image_rotary_emb
        q = _rope_complex(q, cos[None, :, None], sin[None, :, None])
        k = _rope_complex(k, cos[None, :, None], sin[None, :, None])
        G, T, tl = s["G"], s["T"], s["text_len"]
        pcos, psin = s["place"]
        outs = []
        for b in range(q.shape[0]):
            g, p = divmod(b, G)
            keys, vals = [k[b]], [v[b]]
            if p < T:
                for j, r in enumerate(range(g * G + T, g * G + G)):
                    kr = _rope_complex(k[r, tl:], pcos[j], psin[j])
                    vr = v[r, tl:]
                    if s["detach_refs"]:
                        kr, vr = kr.detach(), vr.detach()
                    keys.append(kr)
                    vals.append(vr)
            kk, vv = torch.cat(keys, 0), torch.cat(vals, 0)  # [Lk, H, D]
            scores = torch.einsum("qhd,khd->hqk", q[b], kk) / math.sqrt(D)
            outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv))
        out = torch.stack(outs).flatten(2, 3)
        if encoder_hidden_states is None:
            return out
        n = encoder_hidden_states.shape[1]
        return attn.to_out[1](attn.to_out[0](out[:, n:])), attn.to_add_out(out[:, :n])


def _add_lora(m, seed=0):
    from peft import LoraConfig

    m.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
        "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        "proj_mlp"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:  # peft starts B at zero: give A a gradient
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return {n: p for n, p in m.named_parameters() if "lora_" in n}


def _lora_grads(m, x, tgt, weight, run):
    m.zero_grad(set_to_none=True)
    x = {k: (v.clone().requires_grad_(True) if k == "hidden_states" else v) for k, v in x.items()}
    out = run(x)
    loss = (out[tgt] * weight).sum()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                          if "lora_" in n}, x["hidden_states"].grad


def test_in_batch_backward_lora_matches_naive_concat():
    G, T, ng = 3, 1, 2
    m = tiny_flux()
    lora = _add_lora(m)
    assert lora and all(p.requires_grad for p in lora.values())
    tgt, refs = group_rows(ng, G, T)
    x = zero_ref_timesteps(flux_inputs(ng * G, seed=11), sum(refs, []))
    weight = torch.randn(len(tgt), 16, 16, generator=torch.Generator().manual_seed(1))

    gsa = GroupSharedAttention(m)

    def run_gsa(xx):
        with gsa.in_batch(G, T):
            return m(**xx).sample

    out_g, grads_g, dx_g = _lora_grads(m, x, tgt, weight, run_gsa)
    gsa.remove()

    from storyattn.rope import reference_key_rotary

    spec = dict(G=G, T=T, text_len=5, detach_refs=False,
                place=reference_key_rotary(m.pos_embed, G - T))
    m.set_attn_processor(NaiveGroupProcessor(spec))

    def run_naive(xx):
        return m(**xx).sample

    out_n, grads_n, dx_n = _lora_grads(m, x, tgt, weight, run_naive)
    assert rel_err(out_g, out_n) <= TOL
    for n in grads_n:
        assert rel_err(grads_g[n], grads_n[n]) <= 1e-4, n
    # the loss reads only the targets, yet the references' inputs get gradients:
    ref_rows = sum(refs, [])
    assert dx_g[ref_rows].abs().max() > 0
    assert rel_err(dx_g, dx_n) <= 1e-4
    # and the LoRA gradients include the path through the references' tokens
    spec["detach_refs"] = True
    _, grads_d, _ = _lora_grads(m, x, tgt, weight, run_naive)
    through_refs = [n for n in grads_n if "to_k" in n or "to_v" in n]
    assert through_refs
    for n in through_refs:
        assert rel_err(grads_d[n], grads_n[n]) > 1e-3, n


def test_gradient_checkpointing_in_batch_backward_outside_block():
    G, T = 3, 1
    m = tiny_flux()
    _add_lora(m)
    gsa = GroupSharedAttention(m)
    x = zero_ref_timesteps(flux_inputs(G, seed=2), [1, 2])

    def grads():
        m.zero_grad(set_to_none=True)
        with gsa.in_batch(G, T):
            out = m(**x).sample
        out[:T].square().sum().backward()  # backward after the block closed
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain = grads()
    m.enable_gradient_checkpointing()
    m.train()
    ckpt = grads()
    assert m.gradient_checkpointing
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        assert rel_err(ckpt[n], plain[n]) <= 1e-5, n


def test_peft_lora_replay_equals_in_batch():
    m = tiny_flux()
    _add_lora(m, seed=4)
    gsa = GroupSharedAttention(m)
    x = zero_ref_timesteps(flux_inputs(4, seed=21), [2, 3])
    with torch.no_grad():
        with gsa.in_batch(4, 2):
            ib = m(**x).sample
        cache = record_refs(gsa, m, x, [2, 3])
        with gsa.replay(cache):
            rp = m(**rows(x, [0, 1])).sample
        m.disable_adapters()
        with gsa.replay(cache):
            rp_off = m(**rows(x, [0, 1])).sample
    assert rel_err(rp, ib[:2]) <= TOL
    assert rel_err(rp_off, rp) > 1e-4  # the adapters are live inside the processors
