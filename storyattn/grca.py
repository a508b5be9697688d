"""Install Global Reference Cross-Attention (GRCA) into an SDXL UNet and open rounds.

The SDXL counterpart of :mod:`storyattn.gsa` (the FLUX handle): the processors live in
:mod:`storyattn.processors.grca`, this module puts them on a UNet and returns the handle whose
context managers switch them between text-only rounds and rounds with references::

    handle = install_global_reference_attention(pipe.unet)   # after pipe.load_ip_adapter(...)
    with handle.text_only():                                  # Story-Iter round 0
        images = pipe(prompt=prompts, ...).images
    with handle.references(image_embeds, scale=0.4, guidance=True):
        images = pipe(prompt=prompts, ...).images
    handle.remove()                                           # stock IP-Adapter processors back

It imports diffusers (the processor subclasses diffusers' IP-Adapter processor), so
``storyattn`` loads it on first access.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .processors.grca import GlobalReferenceAttnProcessor, GRCALayerKV, GRCAState
from .regions import Box

__all__ = ["GRCAHandle", "install_global_reference_attention"]


def _is_ip_adapter_processor(proc) -> bool:
    return hasattr(proc, "to_k_ip") and hasattr(proc, "to_v_ip") and not isinstance(
        proc, GlobalReferenceAttnProcessor)


class GRCAHandle:
    """Installed GRCA processors of one UNet; see :func:`install_global_reference_attention`.

    Attributes:
        state: the :class:`GRCAState` the processors read.
        processors: layer name -> :class:`GlobalReferenceAttnProcessor`.
        kv_fills: how many times the per-layer reference K/V were computed (one per layer per
            :meth:`references` block).
    """

    def __init__(self, unet, processors: Dict[str, GlobalReferenceAttnProcessor],
                 originals: Dict[str, object], state: GRCAState, adapter_index: int):
        self.unet = unet
        self.processors = processors
        self._originals = originals
        self.state = state
        self.adapter_index = adapter_index
        self.kv_fills = 0
        self._removed = False

    @property
    def nbytes(self) -> int:
        """Bytes held by the open round's per-layer reference K/V."""
        return self.state.nbytes

    def _projection(self):
        proj = getattr(self.unet, "encoder_hid_proj", None)
        layers = getattr(proj, "image_projection_layers", None)
        if layers is None:
            raise RuntimeError("the UNet has no IP-Adapter image projection "
                               "(unet.encoder_hid_proj); load one with pipe.load_ip_adapter(...)")
        return layers[self.adapter_index]

    @torch.no_grad()
    def project(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``[N, E]`` (or ``[N, S, E]`` for Plus adapters) -> tokens
        ``[N, T, C]`` through the adapter's projection, as diffusers does per image."""
        proj = self._projection()
        p = next(proj.parameters())
        return proj(image_embeds.to(device=p.device, dtype=p.dtype))

    @contextlib.contextmanager
    def references(self, image_embeds: Optional[torch.Tensor] = None, *, scale: float,
                   guidance: bool = True, negative_image_embeds: Optional[torch.Tensor] = None,
                   tokens: Optional[torch.Tensor] = None, null_tokens: Optional[torch.Tensor] = None,
                   backend: Optional[str] = None) -> Iterator[GRCAState]:
        """Open a round: the references' per-layer K/V are computed here, once.

        Give either ``image_embeds`` ``[N, E]`` (the image encoder's ``image_embeds``; the
        negative defaults to zeros, as diffusers' pipelines use for a plain IP-Adapter) or
        the projected ``tokens`` ``[N, T, C]`` (and ``null_tokens`` ``[1, T, C]`` when
        ``guidance``).  ``guidance=True``: every forward's batch is diffusers' CFG layout
        ``[unconditional ; conditional]``.  While open, the UNet's image projection is
        detached so the pipeline is called with prompts only.  ``backend``: the
        :func:`storyattn.segment_attention` backend (None = best available), or ``"sdpa"``
        for torch's SDPA on the same folded problem without the op's dispatch.
        """
        self._check_can_open()
        if tokens is None:
            if image_embeds is None:
                raise ValueError("give image_embeds or tokens")
            tokens = self.project(image_embeds)
            if guidance and null_tokens is None:
                neg = (negative_image_embeds if negative_image_embeds is not None
                       else torch.zeros_like(image_embeds[:1]))
                null_tokens = self.project(neg[:1])
        elif guidance and null_tokens is None:
            raise ValueError("guidance=True with tokens= needs null_tokens (the projection of the "
                             "negative image embedding)")
        if tokens.dim() != 3:
            raise ValueError(f"reference tokens must be [N, T, C], got {tuple(tokens.shape)}")
        if null_tokens is not None and null_tokens.dim() == 2:
            null_tokens = null_tokens.unsqueeze(0)
        modules = dict(self.unet.named_modules())
        kv: Dict[str, GRCALayerKV] = {}
        for name, proc in self.processors.items():
            attn = modules[name[: -len(".processor")]]
            kv[name] = proc.compute_kv(attn, tokens, null_tokens if guidance else None)
            self.kv_fills += 1
        st = self.state
        st.kv, st.scale, st.guidance = kv, float(scale), bool(guidance)
        st.num_refs, st.ref_index, st.backend = int(tokens.shape[0]), None, backend
        with self._open_round():
            yield st

    @contextlib.contextmanager
    def text_only(self) -> Iterator[GRCAState]:
        """Open a round without references (Story-Iter round 0): the pipeline is called with
        prompts only and the layers compute text attention alone, which is what diffusers'
        IP-Adapter processor computes at scale 0."""
        self._check_can_open()
        st = self.state
        st.kv = {name: None for name in self.processors}
        st.scale, st.num_refs, st.ref_index, st.guidance = 0.0, 0, None, False
        with self._open_round():
            yield st

    def _replaced_layers(self) -> List[str]:
        """Layers whose processor is no longer this handle's (a diffusers call such as
        ``pipe.load_ip_adapter`` / ``unload_ip_adapter`` / ``set_attn_processor`` put
        another one there)."""
        procs = self.unet.attn_processors
        return [n for n, p in self.processors.items() if procs.get(n) is not p]

    def _check_can_open(self) -> None:
        if self._removed:
            raise RuntimeError("this GRCA handle was removed; install a new one with "
                               "install_global_reference_attention(pipe.unet)")
        if self.state.active:
            raise RuntimeError("a GRCA round is already open on this handle")
        replaced = self._replaced_layers()
        if replaced:
            raise RuntimeError(
                f"{len(replaced)} of {len(self.processors)} cross-attention layers (first: "
                f"{replaced[0]}) no longer run this handle's GlobalReferenceAttnProcessor "
                "(pipe.load_ip_adapter, unload_ip_adapter or set_attn_processor replaced them "
                "after install); call handle.remove(), then install_global_reference_attention("
                "pipe.unet) again with an IP-Adapter loaded")

    @contextlib.contextmanager
    def _open_round(self) -> Iterator[None]:
        """Mark the state active and detach the UNet's image projection (the pipeline
        is called with prompts only); on exit restore it and clear the round."""
        saved_proj = self.unet.encoder_hid_proj
        st = self.state
        st.active = True
        self.unet.encoder_hid_proj = None
        try:
            yield
        finally:
            # a diffusers call inside the block that replaced the processors (a new or
            # unloaded adapter) owns the projection now: leave its value
            if self.unet.encoder_hid_proj is None and not self._replaced_layers():
                self.unet.encoder_hid_proj = saved_proj
            st.active = False
            st.kv = {}
            st.ref_index = None
            st.num_refs = 0

    @contextlib.contextmanager
    def select(self, ref_index: Optional[Sequence[Sequence[int]]],
               regions: Optional[Sequence[Sequence[Optional[Box]]]] = None,
               size: Optional[Tuple[int, int]] = None) -> Iterator[None]:
        """Inside a round: conditional row i reads only pool entries ``ref_index[i]``
        (-1 = padding).  None = every row reads all entries.

        ``regions`` (a layout): per row, one box ``(x0, y0, x1, y1)`` in fractions of the
        frame (or None) per entry of its ``ref_index`` row; an image token inside boxes
        reads only those entries, one in no box reads all of the row's entries, an entry
        without a box is read by every token (the policy of :func:`storyattn.region_masks`).
        ``size``: the frame's ``(height, width)`` (any unit), which places each layer's
        tokens on the frame; required with ``regions``."""
        if not self.state.active:
            raise RuntimeError("select() needs an open round (handle.references(...))")
        prev = (self.state.ref_index, self.state.regions, self.state.aspect)
        if ref_index is not None and not isinstance(ref_index, torch.Tensor):
            width = max((len(r) for r in ref_index), default=0)
            ref_index = torch.tensor([list(r) + [-1] * (width - len(r)) for r in ref_index],
                                     dtype=torch.long).reshape(len(ref_index), width)
        if ref_index is not None and ref_index.numel() and int(ref_index.max()) >= self.state.num_refs:
            raise ValueError(f"ref_index names entry {int(ref_index.max())} but the round has "
                             f"{self.state.num_refs} references")
        aspect = None
        if regions is not None:
            if ref_index is None:
                raise ValueError("regions go with a ref_index: one box per entry a row reads")
            if len(regions) != ref_index.shape[0]:
                raise ValueError(f"regions has {len(regions)} rows, ref_index "
                                 f"{ref_index.shape[0]}: one row of boxes per frame")
            for i, row in enumerate(regions):
                if len(row) > ref_index.shape[1]:
                    raise ValueError(f"regions row {i} has {len(row)} boxes for "
                                     f"{ref_index.shape[1]} entries")
            if size is None or len(size) != 2 or min(size) <= 0:
                raise ValueError("regions need size=(height, width) of the frame")
            aspect = float(size[0]) / float(size[1])
            regions = [list(r) for r in regions]
        self.state.ref_index, self.state.regions, self.state.aspect = ref_index, regions, aspect
        self.state.region_groups.clear()
        try:
            yield
        finally:
            self.state.ref_index, self.state.regions, self.state.aspect = prev
            self.state.region_groups.clear()

    def remove(self) -> None:
        """Put the stock IP-Adapter processors back (idempotent).  Layers a diffusers call
        has meanwhile given another processor (a reloaded or unloaded adapter) keep it."""
        if self._removed:
            return
        if self.state.active:
            raise RuntimeError("close the open round before remove()")
        modules = dict(self.unet.named_modules())
        current = self.unet.attn_processors
        for name, original in self._originals.items():
            if current.get(name) is self.processors[name]:
                modules[name[: -len(".processor")]].set_processor(original)
        self._removed = True


def install_global_reference_attention(unet, adapter_index: int = 0) -> GRCAHandle:
    """Replace every IP-Adapter cross-attention processor of ``unet`` by a
    :class:`GlobalReferenceAttnProcessor`; return the handle (``references``, ``select``,
    ``remove``).  The IP-Adapter must already be loaded (``pipe.load_ip_adapter``)."""
    state = GRCAState()
    modules = dict(unet.named_modules())
    processors: Dict[str, GlobalReferenceAttnProcessor] = {}
    originals: Dict[str, object] = {}
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, GlobalReferenceAttnProcessor):
            raise RuntimeError(f"{name} already has a GlobalReferenceAttnProcessor; remove() the "
                               "existing handle first")
        if not _is_ip_adapter_processor(proc):
            continue
        new = GlobalReferenceAttnProcessor(proc, state, name, adapter_index)
        modules[name[: -len(".processor")]].set_processor(new)
        processors[name] = new
        originals[name] = proc
    if not processors:
        raise ValueError("no IP-Adapter cross-attention processors found in this UNet; load an "
                         "adapter first with pipe.load_ip_adapter(local_path, ...)")
    return GRCAHandle(unet, processors, originals, state, adapter_index)
