"""Global Reference Cross-Attention (GRCA) for UNet cross-attention layers with an IP-Adapter.

Story-Iter round r draws every frame while each cross-attention layer adds attention over
the image-prompt tokens of *all* frames of round r-1::

    out = attn(q, text_k, text_v) + scale_r * attn(q, ref_k, ref_v)

with two separate softmaxes (the IP-Adapter "decoupled" cross-attention).  The reference
tokens (4 per frame for a plain IP-Adapter) are fixed for a whole round, so their per-layer
keys/values ``to_k_ip(tokens)`` / ``to_v_ip(tokens)`` are computed once per round and kept
as a pool ``[N, T, H, D]`` per layer that every frame, every denoising step and both
classifier-free-guidance branches read.  The reference attention folds the batch into the
query length (``q.reshape(1, B * Lq, H, D)``) and calls :func:`storyattn.segment_attention`
once against the pool, so the pool is never repeated per frame.

Equivalence with diffusers' ``IPAdapterAttnProcessor2_0``:

* N images given to one adapter as multi-image input (``ip_adapter_image=[[img_1..img_N]]``)
  arrive there as ``[B, N, T, C]``; ``to_k_ip`` followed by ``view(B, -1, heads, head_dim)``
  concatenates the N x T tokens into one key sequence, i.e. one softmax over all 4N tokens.
  The conditional rows here read the N pool entries as that same single sequence.
* The unconditional (negative) branch of classifier-free guidance uses the projection of a
  zero image embedding for every image.  N identical copies of the same T tokens give the same
  softmax as one copy, so the unconditional rows read one "null" entry of T tokens.

The handle that installs these processors and opens rounds is ``storyattn.grca``::

    handle = install_global_reference_attention(pipe.unet)
    with handle.references(image_embeds, scale=0.4, guidance=True):
        images = pipe(prompt=prompts, ...).images     # no ip_adapter_image here
    handle.remove()                                   # stock IP-Adapter processors back

Outside a ``references`` block the processor *is* diffusers' IP-Adapter processor: it
subclasses ``IPAdapterAttnProcessor2_0`` (so diffusers' ``set_ip_adapter_scale``,
``unload_ip_adapter`` and xformers switch recognise it), its ``scale`` list is the wrapped
stock processor's own list, and every call is handed to that stock processor unchanged
(scales incl. per-layer dicts, ``ip_adapter_masks``, multi-token embeddings, several
adapters).  Inside a block the weight is the round's ``scale``, and only the adapter at
``adapter_index`` is used (others loaded alongside it are ignored).  The processors keep no
global state: the round's values live in a :class:`GRCAState` owned by the handle.  A
diffusers call that replaces them (``pipe.load_ip_adapter``, ``unload_ip_adapter``,
``set_attn_processor``) leaves the handle stale: its rounds then refuse to open.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from ..api import segment_attention
from ..regions import region_masks

__all__ = ["GlobalReferenceAttnProcessor", "GRCAState", "GRCALayerKV"]


@dataclass
class GRCALayerKV:
    """Keys/values of one layer for the round: ``[N, T, H, D]`` pool + ``[1, T, H, D]`` null."""

    ref_k: torch.Tensor
    ref_v: torch.Tensor
    null_k: Optional[torch.Tensor]
    null_v: Optional[torch.Tensor]

    @property
    def nbytes(self) -> int:
        ts = [self.ref_k, self.ref_v, self.null_k, self.null_v]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass
class GRCAState:
    """Per-round values the processors read (owned by a :class:`GRCAHandle`).

    ``active``: a round is open; ``scale``: weight of the reference attention;
    ``guidance``: the batch is ``[unconditional rows ; conditional rows]`` (diffusers' CFG
    layout) and the first half reads the null tokens; ``ref_index``: None (every conditional
    row reads all N entries) or a long tensor ``[B_cond, K]`` of entries per conditional row
    (-1 = none); ``kv``: layer name -> :class:`GRCALayerKV`.
    """

    active: bool = False
    scale: float = 0.0
    guidance: bool = True
    ref_index: Optional[torch.Tensor] = None
    regions: Optional[List[List[Optional[Tuple[float, float, float, float]]]]] = None
    aspect: Optional[float] = None
    # (row, image tokens) -> that row's token groups under its layout: the same for every
    # denoising step, both CFG halves and every layer of a resolution, so computed once per
    # select() (which empties it)
    region_groups: Dict[Tuple[int, int], list] = field(default_factory=dict)
    kv: Dict[str, GRCALayerKV] = field(default_factory=dict)
    num_refs: int = 0
    backend: Optional[str] = None

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.kv.values() if e is not None)


def _heads_view(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[..., T, H*D]`` -> ``[..., T, H, D]`` (a view)."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads))


class GlobalReferenceAttnProcessor(IPAdapterAttnProcessor2_0):
    """Drop-in replacement for diffusers' ``IPAdapterAttnProcessor2_0`` (see module docs).

    A subclass, so diffusers' own ``isinstance`` checks (``set_ip_adapter_scale``,
    ``unload_ip_adapter``) treat it as the IP-Adapter processor it wraps.  It reuses the
    stock processor's ``to_k_ip`` / ``to_v_ip`` ModuleLists (same attribute names, so the
    UNet's state dict keys do not change), shares its ``scale`` list, and keeps the stock
    processor to restore it and to run it while no round is open.

    Args:
        original: the ``IPAdapterAttnProcessor2_0`` installed by ``pipe.load_ip_adapter``.
        state: the :class:`GRCAState` shared by the layers of one handle.
        name: the layer's key in ``unet.attn_processors`` (indexes ``state.kv``).
        adapter_index: which loaded adapter's ``to_k_ip``/``to_v_ip`` GRCA uses.
    """

    def __init__(self, original, state: GRCAState, name: str, adapter_index: int = 0):
        # the parent's __init__ would build new to_k_ip/to_v_ip layers: the stock
        # processor's own are registered below instead
        torch.nn.Module.__init__(self)
        if not (hasattr(original, "to_k_ip") and hasattr(original, "to_v_ip")):
            raise TypeError(f"{name}: processor {type(original).__name__} carries no IP-Adapter "
                            "weights (to_k_ip/to_v_ip); load one with pipe.load_ip_adapter(...)")
        if not 0 <= adapter_index < len(original.to_k_ip):
            raise ValueError(f"{name}: adapter_index {adapter_index} out of range; "
                             f"{len(original.to_k_ip)} IP-Adapter(s) loaded")
        self.to_k_ip = original.to_k_ip
        self.to_v_ip = original.to_v_ip
        self.hidden_size = getattr(original, "hidden_size", None)
        self.cross_attention_dim = getattr(original, "cross_attention_dim", None)
        self.num_tokens = getattr(original, "num_tokens", None)
        self.layer_name = name
        self.adapter_index = adapter_index
        # plain attributes (not submodules): the stock processor's weights are already
        # registered above, and the state is shared by every layer of the handle.
        object.__setattr__(self, "original", original)
        object.__setattr__(self, "state", state)

    @property
    def scale(self) -> list:
        """The stock processor's per-adapter scale list itself: diffusers'
        ``set_ip_adapter_scale`` assigns its items, and the stock call outside a round
        reads them."""
        return self.original.scale

    @scale.setter
    def scale(self, value) -> None:
        self.original.scale = value

    # -- per-round K/V --------------------------------------------------------------------
    @torch.no_grad()
    def compute_kv(self, attn, tokens: torch.Tensor, null_tokens: Optional[torch.Tensor]
                   ) -> GRCALayerKV:
        """K/V of the reference tokens ``[N, T, C]`` (and null tokens ``[1, T, C]``)."""
        to_k = self.to_k_ip[self.adapter_index]
        to_v = self.to_v_ip[self.adapter_index]
        w = to_k.weight
        tokens = tokens.to(device=w.device, dtype=w.dtype)
        ref_k = _heads_view(to_k(tokens), attn.heads).contiguous()
        ref_v = _heads_view(to_v(tokens), attn.heads).contiguous()
        null_k = null_v = None
        if null_tokens is not None:
            null_tokens = null_tokens.to(device=w.device, dtype=w.dtype)
            null_k = _heads_view(to_k(null_tokens), attn.heads).contiguous()
            null_v = _heads_view(to_v(null_tokens), attn.heads).contiguous()
        return GRCALayerKV(ref_k, ref_v, null_k, null_v)

    # -- forward ---------------------------------------------------------------------------
    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 temb: Optional[torch.Tensor] = None, scale: float = 1.0,
                 ip_adapter_masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        state = self.state
        if not state.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, scale=scale, ip_adapter_masks=ip_adapter_masks)
        if isinstance(encoder_hidden_states, tuple):
            raise ValueError(
                f"{self.layer_name}: a GRCA round is open, so the reference tokens come from "
                "handle.references(...); do not also pass ip_adapter_image / "
                "ip_adapter_image_embeds to the pipeline")
        if ip_adapter_masks is not None:
            raise ValueError(f"{self.layer_name}: ip_adapter_masks are not supported while a "
                             "GRCA round is open")
        if self.layer_name not in state.kv:
            raise RuntimeError(f"{self.layer_name}: no reference K/V for this layer in the open "
                               "round (was the handle installed on this UNet?)")

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        # text attention: the same call the stock processor makes
        q4 = query.view(batch_size, -1, attn.heads, head_dim)
        k4 = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        v4 = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        text = F.scaled_dot_product_attention(q4.transpose(1, 2), k4, v4, attn_mask=attention_mask,
                                              dropout_p=0.0, is_causal=False)
        hidden_states = text.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if state.scale != 0 and state.num_refs > 0:
            ref = self._reference_attention(q4, state.kv[self.layer_name], state)
            hidden_states = hidden_states + state.scale * ref.reshape(hidden_states.shape)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _reference_attention(self, q: torch.Tensor, kv: GRCALayerKV, state: GRCAState
                             ) -> torch.Tensor:
        """Attention of every row's queries over its reference tokens, ``[B, Lq, H, D]``."""
        B, Lq, H, D = q.shape
        dtype = q.dtype
        if state.guidance:
            if B % 2:
                raise ValueError(f"{self.layer_name}: guidance=True needs an even batch "
                                 f"[uncond ; cond], got {B} rows")
            n_uncond = B // 2
        else:
            n_uncond = 0
        parts: List[torch.Tensor] = []
        if n_uncond:
            if kv.null_k is None:
                raise RuntimeError(f"{self.layer_name}: guidance=True but the round has no null "
                                   "tokens")
            parts.append(self._fold_attend(q[:n_uncond], kv.null_k, kv.null_v, state))
        q_cond = q[n_uncond:]
        if state.ref_index is None:
            N, T = kv.ref_k.shape[:2]
            # [N, T, H, D] -> [1, N*T, H, D] is a view: all 4N tokens in one softmax
            parts.append(self._fold_attend(q_cond, kv.ref_k.reshape(1, N * T, H, D),
                                           kv.ref_v.reshape(1, N * T, H, D), state))
        else:
            parts.append(self._attend_selected(q_cond, kv, state.ref_index, state))
        return torch.cat(parts, dim=0).to(dtype) if len(parts) > 1 else parts[0].to(dtype)

    @staticmethod
    def _fold_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: GRCAState
                     ) -> torch.Tensor:
        """Rows of ``q`` [b, Lq, H, D] all read the same keys ``[1, Lr, H, D]``: fold the rows
        into the query length so the keys are read once, not repeated b times."""
        b, Lq, H, D = q.shape
        if b == 0:
            return q.new_empty(q.shape)
        k = k.reshape(1, -1, H, D).to(q.dtype)
        v = v.reshape(1, -1, H, D).to(q.dtype)
        qf = q.reshape(1, b * Lq, H, D)
        if state.backend == "sdpa":
            # plain torch SDPA on the same folded problem: skips the op's dispatch, which
            # costs more than the attention itself at tiny CPU sizes
            out = F.scaled_dot_product_attention(qf.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2)).transpose(1, 2)
        else:
            out = segment_attention(qf, k, v, backend=state.backend)
        return out.reshape(b, Lq, H, D)

    def _attend_selected(self, q: torch.Tensor, kv: GRCALayerKV, ref_index: torch.Tensor,
                         state: GRCAState) -> torch.Tensor:
        """Per-row subsets of the pool: rows with the same subset are folded together."""
        b = q.shape[0]
        if ref_index.shape[0] != b:
            raise ValueError(f"{self.layer_name}: ref_index has {ref_index.shape[0]} rows but the "
                             f"batch has {b} conditional rows")
        out = q.new_zeros(q.shape)
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for row, sel in enumerate(ref_index.tolist()):
            if state.regions is not None and any(b is not None for b in state.regions[row]):
                out[row] = self._attend_regional(q[row], kv, row, sel, state.regions[row],
                                                 state)
                continue
            groups.setdefault(tuple(j for j in sel if j >= 0), []).append(row)
        for sel, rows in groups.items():
            if not sel:
                continue  # no references: the reference term is zero for these rows
            idx = torch.tensor(sel, device=kv.ref_k.device)
            k = kv.ref_k.index_select(0, idx)
            v = kv.ref_v.index_select(0, idx)
            r = torch.tensor(rows, device=q.device)
            out[r] = self._fold_attend(q.index_select(0, r), k, v, state)
        return out

    def _region_groups(self, row: int, Lq: int, sel: List[int], boxes, state: GRCAState,
                       device) -> list:
        """``[(entries, tokens)]`` of one row: the image tokens (long tensor) that read the
        same pool entries (long tensor) under the row's boxes; cached in the state."""
        key = (row, Lq)
        if key not in state.region_groups:
            rows = max(1, round((Lq * state.aspect) ** 0.5))
            cols = Lq // rows
            if rows * cols != Lq:
                raise ValueError(f"{self.layer_name}: {Lq} image tokens do not tile a frame of "
                                 f"aspect {state.aspect:.3f} (height / width)")
            mask = region_masks([list(boxes)], (rows, cols), num_slots=len(sel))[0]  # [K, Lq]
            mask &= torch.tensor([j >= 0 for j in sel])[:, None]
            codes: Dict[Tuple[int, ...], List[int]] = {}
            for i, col in enumerate(mask.t().tolist()):
                codes.setdefault(tuple(j for j, m in zip(sel, col) if m), []).append(i)
            # tokens that read no entry get no group: their reference term is zero
            state.region_groups[key] = [
                (torch.tensor(entries, device=device), torch.tensor(toks, device=device))
                for entries, toks in codes.items() if entries]
        return state.region_groups[key]

    def _attend_regional(self, q: torch.Tensor, kv: GRCALayerKV, row: int, sel: List[int],
                         boxes, state: GRCAState) -> torch.Tensor:
        """One conditional row ``q`` [Lq, H, D] with a layout: each image token reads only the
        entries whose box covers it (policy of :func:`storyattn.region_masks`); tokens with the
        same set of entries share one attention call."""
        out = q.new_zeros(q.shape)
        for idx, t in self._region_groups(row, q.shape[0], sel, boxes, state, q.device):
            idx = idx.to(kv.ref_k.device)
            part = self._fold_attend(q.index_select(0, t)[None], kv.ref_k.index_select(0, idx),
                                     kv.ref_v.index_select(0, idx), state)
            out[t] = part[0]
        return out
