"""Group-Shared Attention processors for diffusers' FLUX.2 transformer (klein, dev).

``Flux2Transformer2DModel`` has two attention layer types:

* ``Flux2Attention`` (double-stream blocks): separate image and text projections, as in
  FLUX.1; replaced by :class:`GroupSharedFlux2AttnProcessor`.
* ``Flux2ParallelSelfAttention`` (single-stream blocks): one fused projection gives
  q, k, v *and* the MLP input, and one output projection takes the attention output
  and the MLP activation together; replaced by
  :class:`GroupSharedFlux2ParallelAttnProcessor`.

Token order is diffusers' ``[text ; image]``, the rotary table covers both (FLUX.2's
four axes ``(T, H, W, L)``, pairs interleaved as in FLUX.1), and q/k are normed by
``torch.nn.RMSNorm`` before the rotation: the FLUX.1 processor's mode code
(:class:`~storyattn.processors.flux_gsa.GroupSharedFluxAttnProcessor`) applies as it is,
including the fused qk-norm + RoPE + cache write of record mode and the
segment-attention backends.  What differs is the stock path and the projections.

With no ``gsa_context`` each processor computes what the processor it replaced
computed: diffusers' ``Flux2AttnProcessor`` / ``Flux2ParallelSelfAttnProcessor``, or,
when it replaced the KV variants that ``Flux2KleinKVPipeline`` installs, those,
including their ``kv_cache_mode`` "extract" (reference tokens in the sequence attend
only to each other, their K/V stored) and "cached" (stored K/V joined between the
text and image keys).  A GSA mode and a diffusers KV mode in the same forward are
refused: they are two caches of the same references.

References recorded for FLUX.2 (see :mod:`storyattn.flux2`) attend to no text, as the
KV pipeline's do: their forward has zero text tokens, which the processors handle by
treating a double-stream layer as image-only.
"""
from __future__ import annotations

from typing import Optional

import torch

from .flux_gsa import MODES, GroupSharedFluxAttnProcessor, GSAForwardContext, _heads, _projections

__all__ = ["GroupSharedFlux2AttnProcessor", "GroupSharedFlux2ParallelAttnProcessor",
           "flux2_stock_processor_types"]


def flux2_stock_processor_types():
    """``(plain, kv)`` processor classes diffusers runs in each FLUX.2 layer type:
    ``{"double": (Flux2AttnProcessor, Flux2KVAttnProcessor), "single": (...)}``."""
    from diffusers.models.transformers import transformer_flux2 as t

    return {"double": (t.Flux2AttnProcessor, t.Flux2KVAttnProcessor),
            "single": (t.Flux2ParallelSelfAttnProcessor, t.Flux2KVParallelSelfAttnProcessor)}


class _Flux2Processor(GroupSharedFluxAttnProcessor):
    """What both FLUX.2 layer types share: the KV-aware stock attention and the modes."""

    def __init__(self, layer_index: int = 0, *, backend: Optional[str] = None,
                 rope_backend: Optional[str] = None, kv: bool = False):
        super().__init__(layer_index, backend=backend, rope_backend=rope_backend)
        # True when this replaced diffusers' KV processor: honour kv_cache_mode as it did
        # (the plain processor never receives those arguments: diffusers filters them out)
        self.kv = bool(kv)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layer_index={self.layer_index}, backend={self.backend!r}, "
                f"kv={self.kv})")

    # ------------------------------------------------------------------ stock
    def _stock_attention(self, q, k, v, attention_mask, n_txt, kv_cache, kv_cache_mode,
                         num_ref_tokens):
        """Attention of diffusers' FLUX.2 processors on rotated ``[B, L, H, D]`` q/k/v
        (their KV variants' modes when this replaced one)."""
        dispatch = self._dispatch
        if self.kv and kv_cache_mode == "extract" and kv_cache is not None and num_ref_tokens > 0:
            sl = slice(n_txt, n_txt + num_ref_tokens)
            kv_cache.store(k[:, sl].clone(), v[:, sl].clone())
        if self.kv and kv_cache_mode == "extract" and num_ref_tokens > 0:
            # [txt, ref, img]: text and image queries see every key, references only
            # themselves (diffusers' KV semantics); the KV path passes no parallel config
            end = n_txt + num_ref_tokens
            q_ti = torch.cat([q[:, :n_txt], q[:, end:]], dim=1)
            out_ti = dispatch(q_ti, k, v, backend=self._attention_backend)
            out_ref = dispatch(q[:, n_txt:end], k[:, n_txt:end], v[:, n_txt:end],
                               backend=self._attention_backend)
            return torch.cat([out_ti[:, :n_txt], out_ref, out_ti[:, n_txt:]], dim=1)
        if self.kv and kv_cache_mode == "cached" and kv_cache is not None:
            k_ref, v_ref = kv_cache.get()
            k = torch.cat([k[:, :n_txt], k_ref, k[:, n_txt:]], dim=1)
            v = torch.cat([v[:, :n_txt], v_ref, v[:, n_txt:]], dim=1)
            return dispatch(q, k, v, backend=self._attention_backend)
        return dispatch(q, k, v, attn_mask=attention_mask, backend=self._attention_backend,
                        parallel_config=self._parallel_config)

    # ------------------------------------------------------------------ modes
    def _check_mode_call(self, ctx: GSAForwardContext, attention_mask, kv_cache_mode):
        if attention_mask is not None:
            raise ValueError(f"{type(self).__name__}: attention_mask is not supported in "
                             f"{ctx.mode!r} mode (the shared reference keys have no mask)")
        if kv_cache_mode is not None:
            raise ValueError(f"layer {self.layer_index}: diffusers' kv_cache_mode="
                             f"{kv_cache_mode!r} inside a GSA {ctx.mode!r} block; the references "
                             "are already in the GSA cache: call the pipeline without image=")

    def _mode_attention(self, attn, q, k, v, eq, ek, ev, rot, text_len, double, ctx):
        """Norm, rotation (and cache write) then the mode's attention, ``[B, L, H, D]``."""
        n_img = q.shape[1] - (0 if double else text_len)
        if n_img != ctx.num_image_tokens or n_img <= 0:
            raise ValueError(f"layer {self.layer_index}: expected {ctx.text_len} text + "
                             f"{ctx.num_image_tokens} image tokens, the layer sees {text_len} "
                             f"text and {n_img} image tokens")
        if double and text_len == 0:
            # a reference recorded without text (FLUX.2's references attend to no text):
            # the layer is image-only, the single-stream form of the same code
            double = False
        if ctx.mode == "record":
            q, k, v = self._norm_rope_record(attn, q, k, v, eq, ek, ev, rot, text_len, double, ctx)
            return self._self_attention(q, k, v)
        q, k, v = self._norm_rope(attn, q, k, v, eq, ek, ev, rot, text_len, double)
        if ctx.mode == "replay":
            return self._replay(q, k, v, text_len, ctx)
        if ctx.mode == "in_batch":
            return self._in_batch(q, k, v, text_len, ctx)
        raise ValueError(f"unknown GSA mode {ctx.mode!r}; expected one of {MODES}")


class GroupSharedFlux2AttnProcessor(_Flux2Processor):
    """Drop-in for diffusers' ``Flux2AttnProcessor`` / ``Flux2KVAttnProcessor``
    (double-stream ``Flux2Attention``) with Group-Shared Attention modes.

    Args:
        layer_index: this layer's number in the cache (double blocks first).
        backend, rope_backend: as for :class:`GroupSharedFluxAttnProcessor`.
        kv: it replaces ``Flux2KVAttnProcessor``: ``kv_cache_mode`` is honoured.
    """

    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb=None, kv_cache=None, kv_cache_mode: Optional[str] = None,
                 num_ref_tokens: int = 0, gsa_context: Optional[GSAForwardContext] = None):
        q, k, v, eq, ek, ev = _projections(attn, hidden_states, encoder_hidden_states)
        D = attn.head_dim
        q, k, v = _heads(q, D), _heads(k, D), _heads(v, D)
        if gsa_context is None:
            q, k = attn.norm_q(q), attn.norm_k(k)
            if attn.added_kv_proj_dim is not None:
                eq, ek, ev = _heads(eq, D), _heads(ek, D), _heads(ev, D)
                q = torch.cat([attn.norm_added_q(eq), q], dim=1)
                k = torch.cat([attn.norm_added_k(ek), k], dim=1)
                v = torch.cat([ev, v], dim=1)
            if image_rotary_emb is not None:
                q = self._apply_rotary(q, image_rotary_emb, sequence_dim=1)
                k = self._apply_rotary(k, image_rotary_emb, sequence_dim=1)
            n_txt = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
            out = self._stock_attention(q, k, v, attention_mask, n_txt, kv_cache, kv_cache_mode,
                                        num_ref_tokens)
        else:
            ctx = gsa_context
            self._check_mode_call(ctx, attention_mask, kv_cache_mode)
            double = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
            text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None \
                else ctx.text_len
            out = self._mode_attention(attn, q, k, v, eq, ek, ev, image_rotary_emb, text_len,
                                       double, ctx)
        out = out.flatten(2, 3).to(q.dtype)
        return self._output(attn, out, encoder_hidden_states)


class GroupSharedFlux2ParallelAttnProcessor(_Flux2Processor):
    """Drop-in for diffusers' ``Flux2ParallelSelfAttnProcessor`` /
    ``Flux2KVParallelSelfAttnProcessor`` (single-stream ``Flux2ParallelSelfAttention``:
    fused QKV + MLP-in projection, fused attention + MLP output projection) with
    Group-Shared Attention modes.  Arguments as :class:`GroupSharedFlux2AttnProcessor`.
    """

    def __call__(self, attn, hidden_states: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None, image_rotary_emb=None,
                 kv_cache=None, kv_cache_mode: Optional[str] = None, num_txt_tokens: int = 0,
                 num_ref_tokens: int = 0, gsa_context: Optional[GSAForwardContext] = None):
        proj = attn.to_qkv_mlp_proj(hidden_states)
        # Split by the global QKV : MLP width ratio, as diffusers does, so a column-sharded
        # (tensor-parallel) projection splits the same way.
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        n_qkv = proj.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(proj, [n_qkv, proj.shape[-1] - n_qkv], dim=-1)
        q, k, v = qkv.chunk(3, dim=-1)
        D = attn.head_dim
        q, k, v = _heads(q, D), _heads(k, D), _heads(v, D)
        if gsa_context is None:
            q, k = attn.norm_q(q), attn.norm_k(k)
            if image_rotary_emb is not None:
                q = self._apply_rotary(q, image_rotary_emb, sequence_dim=1)
                k = self._apply_rotary(k, image_rotary_emb, sequence_dim=1)
            out = self._stock_attention(q, k, v, attention_mask, num_txt_tokens, kv_cache,
                                        kv_cache_mode, num_ref_tokens)
        else:
            ctx = gsa_context
            self._check_mode_call(ctx, attention_mask, kv_cache_mode)
            out = self._mode_attention(attn, q, k, v, None, None, None, image_rotary_emb,
                                       ctx.text_len, False, ctx)
        out = out.flatten(2, 3).to(q.dtype)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))
