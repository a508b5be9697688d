"""Group-Shared Attention processor for diffusers' FLUX.1 transformer.

``GroupSharedFluxAttnProcessor`` replaces ``FluxAttnProcessor`` in the double-stream
(``FluxTransformerBlock``) and single-stream (``FluxSingleTransformerBlock``)
attention layers.  Token order is diffusers': ``[text ; image]`` along the sequence
(double blocks concatenate the projected text and image tokens themselves; single
blocks receive the concatenation), and the rotary embedding covers both.

What it does is chosen per forward by a :class:`GSAForwardContext` that arrives as
the ``gsa_context`` keyword (``GroupSharedAttention`` injects it into
``joint_attention_kwargs``).  The processor itself holds no mode and no global
state, only its layer number and backend choice, so a forward recomputed later
(gradient checkpointing) sees exactly the context it first ran with.

* no context: exactly ``FluxAttnProcessor`` (same calls, same order).
* ``in_batch``: rows come in groups of ``G``; the first ``T`` rows of a group are
  targets, the others references.  Every query of a target (text and image)
  attends to its own ``[text ; image]`` keys plus the image-token keys/values of
  its group's references, reference ``j`` placed at rotary index ``j + 1``.
  References attend only to themselves.
* ``record``: the rows are references (timestep 0); they attend to themselves and
  their placed image-token keys and values are written into the cache as entries
  ``start .. start + B - 1``.
* ``replay``: the rows are targets; each attends to its own tokens plus every
  cached entry (or the entries its ``ref_index`` row names).

The shared part is computed by :func:`storyattn.segment_attention` from views of
the pool, never a per-call concatenation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..api import segment_attention
from ..regions import regional_segment_attention
from ..rope import qk_norm_rope, qk_norm_rope_into_cache, rotate_keys

__all__ = ["GroupSharedFluxAttnProcessor", "GSAForwardContext", "MODES"]

MODES = ("in_batch", "record", "replay")

Rotary = Tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, eq=False)
class GSAForwardContext:
    """Everything one transformer forward needs to know about the active mode.

    Built by ``GroupSharedAttention`` once per forward (immutable afterwards).

    Attributes:
        mode: ``"in_batch"``, ``"record"`` or ``"replay"``.
        text_len: text tokens at the start of the joint sequence (single-stream
            blocks cannot see it otherwise).
        num_image_tokens: image tokens per row.
        group_size, num_targets: ``in_batch`` grouping (``G``, ``T``).
        ref_rotary: ``(cos, sin)`` ``[n, D]`` extra rotation placing reference keys
            (``in_batch``: one row per place ``0 .. G-T-1`` in a group; ``record``:
            one row per recorded row); None = keys not moved.
        record_slots: ``record`` per-layer ``(pool_k, pool_v)`` ``[B, Lr, H, D]``
            views of the cache storage where row ``b``'s entry goes (made before
            the forward, so a compiled forward sees the same shapes every call).
        record_written: ``record`` list the layers append their number to once
            they have written their slot (the cache checks it after the forward).
        pools: ``replay`` per-layer ``(ref_k, ref_v)`` views ``[P, Lr, H, D]``.
        ref_index: ``replay`` page table ``[B, R]`` (-1 = none) or None = all entries.
        ref_regions: ``replay`` / ``in_batch`` bool ``[B, R, N]`` (targets, reference
            slots, image tokens): image token ``i`` reads slot ``r`` only where True
            (:mod:`storyattn.regions`); None = every token reads every slot.
    """

    mode: str
    text_len: int
    num_image_tokens: int
    group_size: int = 0
    num_targets: int = 0
    ref_rotary: Optional[Rotary] = None
    record_slots: Optional[Tuple[Tuple[torch.Tensor, torch.Tensor], ...]] = None
    record_written: Optional[list] = None
    pools: Optional[Tuple[Tuple[torch.Tensor, torch.Tensor], ...]] = None
    ref_index: Optional[torch.Tensor] = None
    ref_regions: Optional[torch.Tensor] = None


def _diffusers_fns():
    """diffusers' attention dispatch and rotary function.

    Imported here rather than at module import (``import storyattn`` stays free of
    diffusers) and called by the processor's constructor, which keeps them as plain
    attributes: a lazy cache read inside the forward would change a torch.compile guard
    after the first call and force a recompile."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb

    return dispatch_attention_fn, apply_rotary_emb


def _resolve_backends() -> None:
    """Load the backend registry and cache every backend's availability (both ops the
    processor calls) now, for the same reason: done lazily inside a compiled forward it
    would be an import (a graph break) and a cache fill (a guard that changes)."""
    from .. import backends

    for b in backends.all_backends(op=None):
        backends.availability(b)


def _projections(attn, hidden_states, encoder_hidden_states):
    """q, k, v (and the text stream's in double blocks), as FluxAttnProcessor gets them."""
    eq = ek = ev = None
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            eq = attn.add_q_proj(encoder_hidden_states)
            ek = attn.add_k_proj(encoder_hidden_states)
            ev = attn.add_v_proj(encoder_hidden_states)
    return q, k, v, eq, ek, ev


def _heads(x, head_dim):
    return x.unflatten(-1, (-1, head_dim))


def _split_rotary(rot: Optional[Rotary], lo: int, hi: Optional[int]) -> Optional[Rotary]:
    if rot is None:
        return None
    return rot[0][lo:hi], rot[1][lo:hi]


class GroupSharedFluxAttnProcessor:
    """Drop-in for diffusers' ``FluxAttnProcessor`` with Group-Shared Attention modes.

    Args:
        layer_index: this layer's number in the cache (double blocks first, then
            single blocks, in model order).
        backend: :func:`storyattn.segment_attention` backend (None = best available).
        rope_backend: :func:`storyattn.rope.qk_norm_rope` backend used in the modes
            (None = fused Triton on CUDA without gradients, else torch; "cuda" =
            the precompiled csrc kernel, inference).

    Install it with :class:`storyattn.GroupSharedAttention`, which also builds the
    per-forward :class:`GSAForwardContext`.  Called without ``gsa_context`` it is
    ``FluxAttnProcessor``.
    """

    # diffusers' set_attention_backend / parallel config write these; honoured
    # when no mode is active (the modes run segment_attention).
    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer_index: int = 0, *, backend: Optional[str] = None,
                 rope_backend: Optional[str] = None):
        self.layer_index = int(layer_index)
        self.backend = backend
        self.rope_backend = rope_backend
        self._dispatch, self._apply_rotary = _diffusers_fns()
        _resolve_backends()

    def __repr__(self) -> str:
        return (f"GroupSharedFluxAttnProcessor(layer_index={self.layer_index}, "
                f"backend={self.backend!r})")

    # ------------------------------------------------------------------ entry
    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[Rotary] = None,
                 gsa_context: Optional[GSAForwardContext] = None):
        if gsa_context is None:
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask,
                               image_rotary_emb)
        ctx = gsa_context
        if attention_mask is not None:
            raise ValueError(f"GroupSharedFluxAttnProcessor: attention_mask is not supported in "
                             f"{ctx.mode!r} mode (the shared reference keys have no mask); "
                             "leave the mode to use a mask")
        double = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None \
            else ctx.text_len
        n_img = hidden_states.shape[1] - (0 if encoder_hidden_states is not None else text_len)
        if n_img != ctx.num_image_tokens or n_img <= 0:
            raise ValueError(f"layer {self.layer_index}: expected {ctx.text_len} text + "
                             f"{ctx.num_image_tokens} image tokens, the layer sees "
                             f"{text_len} text and {n_img} image tokens")

        q, k, v, eq, ek, ev = _projections(attn, hidden_states, encoder_hidden_states)
        D = attn.head_dim
        q, k, v = _heads(q, D), _heads(k, D), _heads(v, D)

        if ctx.mode == "record":
            q, k, v = self._norm_rope_record(attn, q, k, v, eq, ek, ev, image_rotary_emb,
                                             text_len, double, ctx)
        else:
            q, k, v = self._norm_rope(attn, q, k, v, eq, ek, ev, image_rotary_emb, text_len, double)

        if ctx.mode == "record":
            out = self._self_attention(q, k, v)
        elif ctx.mode == "replay":
            out = self._replay(q, k, v, text_len, ctx)
        elif ctx.mode == "in_batch":
            out = self._in_batch(q, k, v, text_len, ctx)
        else:
            raise ValueError(f"unknown GSA mode {ctx.mode!r}; expected one of {MODES}")
        return self._output(attn, out.flatten(2, 3).to(q.dtype), encoder_hidden_states)

    # ------------------------------------------------------------------ stock
    def _stock(self, attn, hidden_states, encoder_hidden_states, attention_mask,
               image_rotary_emb):
        """FluxAttnProcessor, call for call (so results are bit-identical)."""
        dispatch, apply_rotary_emb = self._dispatch, self._apply_rotary
        q, k, v, eq, ek, ev = _projections(attn, hidden_states, encoder_hidden_states)
        D = attn.head_dim
        q, k, v = _heads(q, D), _heads(k, D), _heads(v, D)
        q = attn.norm_q(q)
        k = attn.norm_k(k)
        if attn.added_kv_proj_dim is not None:
            eq, ek, ev = _heads(eq, D), _heads(ek, D), _heads(ev, D)
            eq = attn.norm_added_q(eq)
            ek = attn.norm_added_k(ek)
            q = torch.cat([eq, q], dim=1)
            k = torch.cat([ek, k], dim=1)
            v = torch.cat([ev, v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = dispatch(q, k, v, attn_mask=attention_mask, backend=self._attention_backend,
                       parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(q.dtype)
        return self._output(attn, out, encoder_hidden_states)

    @staticmethod
    def _output(attn, out, encoder_hidden_states):
        if encoder_hidden_states is None:
            return out
        t = encoder_hidden_states.shape[1]
        enc, img = out.split_with_sizes([t, out.shape[1] - t], dim=1)
        img = attn.to_out[0](img.contiguous())
        img = attn.to_out[1](img)
        enc = attn.to_add_out(enc.contiguous())
        return img, enc

    # ------------------------------------------------------------------ modes
    def _norm_rope(self, attn, q, k, v, eq, ek, ev, rot, text_len, double):
        """q/k RMSNorm + RoPE of the joint sequence; returns [B, text+image, H, D]."""
        if not double:
            q, k = qk_norm_rope(q, k, attn.norm_q, attn.norm_k, rot, backend=self.rope_backend)
            return q, k, v
        D = attn.head_dim
        eq, ek, ev = _heads(eq, D), _heads(ek, D), _heads(ev, D)
        # Norm and rotation act per token, so the two streams can go separately.
        qi, ki = qk_norm_rope(q, k, attn.norm_q, attn.norm_k, _split_rotary(rot, text_len, None),
                              backend=self.rope_backend)
        qt, kt = qk_norm_rope(eq, ek, attn.norm_added_q, attn.norm_added_k,
                              _split_rotary(rot, 0, text_len), backend=self.rope_backend)
        return torch.cat([qt, qi], dim=1), torch.cat([kt, ki], dim=1), torch.cat([ev, v], dim=1)

    def _norm_rope_record(self, attn, q, k, v, eq, ek, ev, rot, text_len, double, ctx):
        """As _norm_rope, writing the placed image-token keys and values into the cache."""
        B = q.shape[0]
        start = 0 if double else text_len
        pool_k, pool_v = ctx.record_slots[self.layer_index]
        img = k[:, start:]
        if img.shape != pool_k.shape or img.dtype != pool_k.dtype:
            raise ValueError(f"layer {self.layer_index}: reference keys {tuple(img.shape)} "
                             f"{img.dtype} do not match the cache slot {tuple(pool_k.shape)} "
                             f"{pool_k.dtype} (the cache signature)")
        rows = list(range(B))  # a Python list: its checks run at trace time, not on device
        if not double:
            q, k = qk_norm_rope_into_cache(q, k, v, attn.norm_q, attn.norm_k, rot, pool_k, pool_v,
                                           rows, pool_start=text_len, pool_rotary=ctx.ref_rotary,
                                           backend=self.rope_backend)
            ctx.record_written.append(self.layer_index)
            return q, k, v
        D = attn.head_dim
        eq, ek, ev = _heads(eq, D), _heads(ek, D), _heads(ev, D)
        qi, ki = qk_norm_rope_into_cache(q, k, v, attn.norm_q, attn.norm_k,
                                         _split_rotary(rot, text_len, None), pool_k, pool_v, rows,
                                         pool_start=0, pool_rotary=ctx.ref_rotary,
                                         backend=self.rope_backend)
        ctx.record_written.append(self.layer_index)
        qt, kt = qk_norm_rope(eq, ek, attn.norm_added_q, attn.norm_added_k,
                              _split_rotary(rot, 0, text_len), backend=self.rope_backend)
        return torch.cat([qt, qi], dim=1), torch.cat([kt, ki], dim=1), torch.cat([ev, v], dim=1)

    def _replay(self, q, k, v, text_len, ctx):
        """Targets over their own tokens plus their cache entries (regional when asked)."""
        ref_k, ref_v = ctx.pools[self.layer_index]
        if ctx.ref_regions is not None:
            return regional_segment_attention(q, k, v, ref_k, ref_v, ctx.ref_index,
                                              ctx.ref_regions, text_len, backend=self.backend)
        return segment_attention(q, k, v, ref_k, ref_v, ref_index=ctx.ref_index,
                                 backend=self.backend)

    def _self_attention(self, q, k, v):
        """Rows attending only to themselves (references), as the stock processor does."""
        return self._dispatch(q, k, v, backend=self._attention_backend)

    def _in_batch(self, q, k, v, text_len, ctx):
        B, L, H, D = q.shape
        G, T = ctx.group_size, ctx.num_targets
        if B % G:
            raise ValueError(f"in_batch: batch {B} is not a multiple of group_size {G}")
        ng, K = B // G, G - T

        def split(x):
            xg = x.view(ng, G, L, H, D)
            return xg[:, :T].reshape(ng * T, L, H, D), xg[:, T:].reshape(ng * K, L, H, D)

        (qt, qr), (kt, kr), (vt, vr) = split(q), split(k), split(v)
        if K == 0:
            return segment_attention(qt, kt, vt, backend=self.backend).view(B, L, H, D)
        pool_k = kr[:, text_len:]
        pool_v = vr[:, text_len:].contiguous()
        if ctx.ref_rotary is not None:
            cos, sin = ctx.ref_rotary  # [K, D]: place j of every group
            pool_k = rotate_keys(pool_k, cos.repeat(ng, 1), sin.repeat(ng, 1))
        else:
            pool_k = pool_k.contiguous()
        ref_index = None
        if ng > 1 or ctx.ref_regions is not None:
            ref_index = torch.arange(ng * K, device=q.device).view(ng, K).repeat_interleave(T, dim=0)
        if ctx.ref_regions is not None:
            out_t = regional_segment_attention(qt, kt, vt, pool_k, pool_v, ref_index,
                                               ctx.ref_regions, text_len, backend=self.backend)
        else:
            out_t = segment_attention(qt, kt, vt, pool_k, pool_v, ref_index=ref_index,
                                      backend=self.backend)
        out_r = self._self_attention(qr, kr, vr).to(out_t.dtype)
        out = torch.cat([out_t.view(ng, T, L, H, D), out_r.view(ng, K, L, H, D)], dim=1)
        return out.view(B, L, H, D)
