"""Install Group-Shared Attention into a diffusers FLUX transformer and switch modes.

::

    gsa = GroupSharedAttention(pipe.transformer)     # every attention layer
    cache = gsa.record_images(pipe, images, prompts) # clean references -> a ReferenceKVCache
    with gsa.record(cache):                          # low level: rows = references at timestep 0
        transformer(...)
    with gsa.replay(cache):                          # batch = targets, read every entry
        transformer(...)
    with gsa.replay(cache, ref_index=idx):           # idx [B, R] long, -1 = none
        transformer(...)
    with gsa.in_batch(group_size=G, num_targets=T):  # groups of G rows: T targets, G-T refs
        transformer(...)
    gsa.remove()                                     # original processors back

The handle keeps the active mode (an immutable object made when a ``with`` block
is entered).  A forward pre-hook on the transformer turns it into a
:class:`~storyattn.processors.flux_gsa.GSAForwardContext` for that forward and
passes it to every processor through ``joint_attention_kwargs["gsa_context"]``:
no global state, and a forward re-run later by gradient checkpointing (often after
the ``with`` block has closed) replays with the context it first ran with.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .cache import CacheSignature, ReferenceKVCache, _dtype_name
from .references import unwrap_model
from .regions import check_ref_regions
from .processors.flux_gsa import GroupSharedFluxAttnProcessor, GSAForwardContext

__all__ = ["GroupSharedAttention"]

Placement = Union[str, Callable[[int], Sequence[float]]]

# FluxTransformer2DModel.forward(hidden_states, encoder_hidden_states, pooled_projections,
# timestep, img_ids, txt_ids, guidance, joint_attention_kwargs, ...): positions of the
# arguments the pre-hook reads or rewrites when they are passed positionally.
_ARG_HIDDEN, _ARG_ENCODER, _ARG_TIMESTEP, _ARG_JOINT_KW = 0, 1, 3, 7


def _hooks_eager_as_top_frames() -> None:
    """Run GSA's forward hooks without dynamo when dynamo meets them as frames of their
    own, which is what ``torch.compile(transformer)`` does (it skips nn.Module's call
    machinery and compiles the hooks and the forward as separate frames).  The hooks
    do the host work of a mode (record's timestep check, cache growth, entry numbers)
    that a graph would specialise on and recompile for; run eagerly they hand the
    forward, itself one graph, only tensors of fixed shapes.  Traced inside a larger
    compiled function they are still inlined, as before (record mode then breaks the
    graph at its host work).  Uses dynamo's per-code frame strategy (no public API
    does this); without it the modes still run, record as a graph break."""
    try:
        from torch._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:  # pragma: no cover - other torch versions
        return
    skip = FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP)  # this frame and callees
    for fn in (GroupSharedAttention._pre_hook, GroupSharedAttention._post_hook):
        set_code_exec_strategy(fn.__code__, skip)


def _host_work_out_of_graphs() -> None:
    """Mark record mode's host work (:meth:`GroupSharedAttention._record_fields`,
    :meth:`~GroupSharedAttention._commit_record`) ``torch.compiler.disable``, once, when the
    first handle is made rather than as decorators: ``torch.compiler.disable`` imports
    dynamo, which loads triton, and ``import storyattn`` stays light."""
    cls = GroupSharedAttention
    if cls.__dict__.get("_host_work_disabled"):
        return
    for name in ("_record_fields", "_commit_record"):
        setattr(cls, name, torch.compiler.disable(cls.__dict__[name]))
    cls._host_work_disabled = True


# Handles of other model families register here when their module is imported (storyattn
# imports storyattn.flux2 at package import): (predicate(transformer) -> bool, subclass).
# GroupSharedAttention(model) builds the first subclass whose predicate holds, so one name
# serves FLUX.1 and FLUX.2 while this module never imports the families (no circle).
_FAMILIES: List[Tuple[Callable[[object], bool], type]] = []


def register_family(predicate: Callable[[object], bool], handle_cls: type) -> None:
    """Make ``GroupSharedAttention(transformer)`` build ``handle_cls`` when
    ``predicate(transformer)`` holds."""
    _FAMILIES.append((predicate, handle_cls))


@dataclass(frozen=True, eq=False)
class _Mode:
    name: str
    cache: Optional[ReferenceKVCache] = None
    ref_index: Optional[torch.Tensor] = None
    ref_regions: Optional[torch.Tensor] = None
    group_size: int = 0
    num_targets: int = 0
    strict_tokens: bool = True


class GroupSharedAttention:
    """Group-Shared Attention on a diffusers ``FluxTransformer2DModel``.

    Given a ``Flux2Transformer2DModel`` (FLUX.2 klein / dev) the constructor returns a
    :class:`storyattn.flux2.Flux2GroupSharedAttention` instead: same API, FLUX.2's layers,
    reference layout and ``record_images`` (see docs/flux2.md).

    Replaces the processor of every attention layer (``transformer_blocks[i].attn``,
    then ``single_transformer_blocks[j].attn``; cache layer numbers follow that
    order) by :class:`GroupSharedFluxAttnProcessor`, keeping the originals for
    :meth:`remove`.  With no mode active the model computes what it computed before.

    Args:
        transformer: a ``FluxTransformer2DModel`` (plain, with peft LoRA adapters, or
            wrapped by ``torch.compile`` / DDP: the model inside is used).  Its layers must run diffusers'
            ``FluxAttnProcessor`` (the default).
        placement: where reference keys go on the rotary axes.  ``"index"`` (default,
            docs/design.md): reference ``i`` at ids ``(i + 1, row, col)``, i.e. one extra
            rotation by the angle of ``(i + 1, 0, 0)``; ``"none"``: no extra rotation
            (references share the targets' positions); or a callable
            ``i -> ids`` (one value per rotary axis) giving the offset of entry ``i``.
            ``i`` is the place in the group (``in_batch``) or the cache entry number
            (``record``/``replay``).
        backend: :func:`storyattn.segment_attention` backend (None = best here).
        rope_backend: backend of :func:`storyattn.rope.qk_norm_rope` in the modes.

    Mode notes:
        * ``replay`` checks the cache against the model (layer counts, heads, head
          dim, dtype, placement, device) when the block is entered and the image
          token count at every forward.
        * ``FluxPipeline`` with ``num_images_per_prompt = n`` runs batches of
          ``prompts * n`` rows, prompt ``p``'s images consecutive: a ``ref_index``
          with one row per prompt is repeated ``n`` times row-wise
          (``repeat_interleave``); one row per image is used as is; any other
          batch size is an error.  True-CFG (``true_cfg_scale > 1``) runs the
          negative prompt as a separate forward with the same batch, so it reads the
          same references.
    """

    def __init__(self, transformer: torch.nn.Module, *, placement: Placement = "index",
                 backend: Optional[str] = None, rope_backend: Optional[str] = None):
        # torch.compile (_orig_mod) and DDP/FSDP-style (module) wrappers: hooks and
        # processors go on the FluxTransformer2DModel inside, which they call.
        model = unwrap_model(transformer)
        if not (hasattr(model, "transformer_blocks") and hasattr(model, "single_transformer_blocks")
                and hasattr(model, "pos_embed")):
            raise TypeError("GroupSharedAttention needs a diffusers FluxTransformer2DModel or "
                            "Flux2Transformer2DModel "
                            "(transformer_blocks, single_transformer_blocks, pos_embed); got "
                            f"{type(model).__name__}")
        if not (placement in ("index", "none") or callable(placement)):
            raise ValueError(f"placement must be 'index', 'none' or a callable i -> ids, got "
                             f"{placement!r}")
        self.transformer = model
        self.placement = placement
        self.backend = backend
        self._mode: Optional[_Mode] = None
        self._pending_record: Optional[Tuple[ReferenceKVCache, int, int, list]] = None

        attns = [b.attn for b in model.transformer_blocks] + \
                [b.attn for b in model.single_transformer_blocks]
        self.num_double_layers = len(model.transformer_blocks)
        self.num_single_layers = len(model.single_transformer_blocks)
        for i, attn in enumerate(attns):
            proc = attn.processor
            if isinstance(proc, GroupSharedFluxAttnProcessor):
                raise RuntimeError(f"attention layer {i} already runs GroupSharedFluxAttnProcessor: "
                                   "call remove() on the existing GroupSharedAttention first")
            self._check_stock_processor(i, proc)
        heads = {a.heads for a in attns}
        dims = {a.head_dim for a in attns}
        if len(heads) != 1 or len(dims) != 1:
            raise ValueError(f"attention layers disagree on heads {heads} / head dim {dims}")
        self.num_heads, self.head_dim = heads.pop(), dims.pop()

        self._attns = attns
        self._originals = [a.processor for a in attns]
        self._procs = []
        for i, attn in enumerate(attns):
            new = self._make_processor(i, attn.processor, backend, rope_backend)
            # Keep diffusers' attention backend choice for the no-mode path.
            new._attention_backend = getattr(attn.processor, "_attention_backend", None)
            new._parallel_config = getattr(attn.processor, "_parallel_config", None)
            attn.set_processor(new)
            self._procs.append(new)
        _host_work_out_of_graphs()
        _hooks_eager_as_top_frames()
        self._hooks = [
            model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            model.register_forward_hook(self._post_hook, with_kwargs=True),
        ]
        self._removed = False

    # What differs between model families (FLUX.2: storyattn.flux2.Flux2GroupSharedAttention).
    # The model's forward(hidden_states, encoder_hidden_states, pooled_projections, timestep,
    # img_ids, txt_ids, guidance, joint_attention_kwargs, ...): positions of the arguments
    # the pre-hook reads or rewrites when they are passed positionally.
    _ARG_HIDDEN, _ARG_ENCODER, _ARG_TIMESTEP, _ARG_JOINT_KW = \
        _ARG_HIDDEN, _ARG_ENCODER, _ARG_TIMESTEP, _ARG_JOINT_KW

    def __new__(cls, transformer=None, *args, **kwargs):
        # GroupSharedAttention(flux2_transformer) gives the FLUX.2 handle (same API)
        if cls is GroupSharedAttention:
            for predicate, family in _FAMILIES:
                if predicate(transformer):
                    cls = family
                    break
        return super().__new__(cls)

    @staticmethod
    def _check_stock_processor(i: int, proc) -> None:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        if not isinstance(proc, FluxAttnProcessor):
            raise TypeError(f"attention layer {i} runs {type(proc).__name__}; "
                            "GroupSharedAttention replaces diffusers' FluxAttnProcessor only "
                            "(pipe.unload_ip_adapter() or "
                            "transformer.set_default_attn_processor() resets it)")

    def _make_processor(self, i: int, stock, backend, rope_backend):
        return GroupSharedFluxAttnProcessor(i, backend=backend, rope_backend=rope_backend)

    # ------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        return self.num_double_layers + self.num_single_layers

    @property
    def placement_name(self) -> str:
        if isinstance(self.placement, str):
            return self.placement
        return "custom:" + getattr(self.placement, "__qualname__", repr(self.placement))

    @property
    def mode(self) -> Optional[str]:
        """Name of the active mode, or None."""
        return None if self._mode is None else self._mode.name

    def cache_signature(self, num_image_tokens: Optional[int],
                        dtype: Optional[torch.dtype] = None) -> CacheSignature:
        """The :class:`CacheSignature` a cache recorded from this model would carry."""
        dtype = dtype or self.transformer.dtype
        return CacheSignature(self.num_double_layers, self.num_single_layers, self.num_heads,
                              self.head_dim, _dtype_name(dtype), num_image_tokens,
                              self.placement_name)

    def estimate_cache_bytes(self, num_entries: int, num_image_tokens: int,
                             dtype: Optional[torch.dtype] = None) -> int:
        """:meth:`ReferenceKVCache.estimate_bytes` for this model."""
        return ReferenceKVCache.estimate_bytes(self.transformer, num_entries, num_image_tokens,
                                               dtype or self.transformer.dtype)

    # ------------------------------------------------------------------ modes
    def _check_alive(self) -> None:
        if self._removed:
            raise RuntimeError("this GroupSharedAttention was removed; install a new one")

    @contextlib.contextmanager
    def _activate(self, mode: _Mode) -> Iterator[None]:
        self._check_alive()
        # identity, not type: diffusers' adapter loaders re-create a layer's processor
        # with no arguments (layer_index 0), which would read the wrong cache layer
        replaced = [i for i, (a, p) in enumerate(zip(self._attns, self._procs))
                    if a.processor is not p]
        if replaced:
            raise RuntimeError(f"attention layers {replaced} no longer run the processors this "
                               "GroupSharedAttention installed (set_attn_processor or an adapter "
                               "loader such as pipe.load_ip_adapter / unload_ip_adapter replaced "
                               "them); call gsa.remove(), then GroupSharedAttention(transformer) "
                               "again")
        if self._mode is not None:
            raise RuntimeError(f"GSA mode {mode.name!r} requested while {self._mode.name!r} is "
                               "active; modes do not nest")
        _hooks_eager_as_top_frames()  # again: a torch._dynamo.reset() may have dropped it
        self._mode = mode
        try:
            yield
        finally:
            self._mode = None
            self._pending_record = None

    def in_batch(self, group_size: int, num_targets: int, *,
                 ref_regions: Optional[torch.Tensor] = None):
        """Context manager: rows come in groups of ``group_size``; the first
        ``num_targets`` rows of each group are targets, the rest its references.

        Targets attend to their own tokens plus their group's references' image
        tokens (reference ``j`` placed at index ``j + 1``); references attend only
        to themselves.  Differentiable (training): gradients reach the references'
        projections through the targets' attention.

        ``ref_regions``: bool ``[targets, group_size - num_targets, N]`` (targets in
        batch order, group by group), image token ``i`` of a target reads its group's
        reference ``j`` only where True (:func:`storyattn.region_masks`).
        """
        self._check_alive()
        for name, val in (("group_size", group_size), ("num_targets", num_targets)):
            if isinstance(val, bool) or int(val) != val:
                raise TypeError(f"{name} must be an int, got {val!r}")
        if not 1 <= num_targets <= group_size:
            raise ValueError(f"need 1 <= num_targets <= group_size, got num_targets={num_targets}, "
                             f"group_size={group_size}")
        if ref_regions is not None:
            ref_regions = check_ref_regions(ref_regions, int(group_size) - int(num_targets),
                                            self._device())
        return self._activate(_Mode("in_batch", group_size=int(group_size),
                                    num_targets=int(num_targets), ref_regions=ref_regions))

    def record_images(self, pipe, images, prompts=None, cache: Optional[ReferenceKVCache] = None,
                      *, height: Optional[int] = None, width: Optional[int] = None,
                      batch_size: int = 4, guidance: float = 3.5,
                      max_sequence_length: Optional[int] = None,
                      replace: bool = False) -> ReferenceKVCache:
        """Record clean reference images into a :class:`ReferenceKVCache` in one call.

        Each image is preprocessed by ``pipe.image_processor`` (resized to
        ``height`` x ``width``, default the first image's size rounded down to a
        multiple of twice the VAE scale factor, 16 for FLUX.1), encoded by ``pipe.vae`` (posterior mode, FLUX shift and
        scaling), packed into 2x2 patch tokens with the ids ``FluxPipeline`` gives a
        lone image, and run through ``pipe.transformer`` at timestep 0 (sigma 0, the
        clean image) with its prompt, ``batch_size`` images per forward, in the
        transformer's dtype and on its device; each image's placed image-token K/V
        of every layer become one cache entry, in order.

        Args:
            pipe: the ``FluxPipeline`` whose transformer this handle was installed on.
            images: a PIL image, a ``[3, H, W]`` / ``[N, 3, H, W]`` tensor (values in
                [0, 1], or [-1, 1]), or a list of those.
            prompts: None (empty prompts), one string for every image, or one per image.
            cache: the cache to append to (a new one when None).
            replace: start ``cache`` over first (storage re-used).
            guidance: distilled guidance value for models with ``guidance_embeds``.
            max_sequence_length: T5 tokens (default: min(512, the tokenizer's limit)).

        Returns the cache.  Targets must later be drawn at the same size (same image
        token count) to replay it.
        """
        from .references import record_images

        return record_images(self, pipe, images, prompts, cache, height=height, width=width,
                             batch_size=batch_size, guidance=guidance,
                             max_sequence_length=max_sequence_length, replace=replace)

    def record(self, cache: ReferenceKVCache, *, replace: bool = False):
        """Context manager (low level): every forward's rows are references at
        timestep 0; they run as lone images and their placed image-token K/V are
        appended to ``cache`` (entry numbers continue from ``len(cache)``).
        ``replace=True`` starts the cache over first (a new Story-Iter round; storage
        re-used).  A forward at a timestep other than 0 is refused, and with it a
        whole ``pipe(...)`` call (its first step is at sigma 1): use
        :meth:`record_images` to record images."""
        self._check_alive()
        if not isinstance(cache, ReferenceKVCache):
            raise TypeError(f"record needs a ReferenceKVCache, got {type(cache).__name__}")
        if replace:
            cache.reset()
        elif len(cache):
            cache.check_signature(self.cache_signature(cache.num_image_tokens),
                                  what="record more entries from")
        return self._activate(_Mode("record", cache=cache))

    def replay(self, cache: ReferenceKVCache, ref_index: Optional[torch.Tensor] = None, *,
               ref_regions: Optional[torch.Tensor] = None, strict_tokens: bool = True):
        """Context manager: the rows are targets; each attends to its own tokens plus
        every entry of ``cache`` (``ref_index=None``) or the entries of its row of
        ``ref_index`` (``[B, R]`` integer, ``-1`` = none).

        ``ref_regions``: bool ``[B, R, N]`` aligned with ``ref_index``: image token ``i``
        of target ``b`` reads slot ``r`` only where True (:func:`storyattn.region_masks`
        makes it from one box per character; :mod:`storyattn.regions`).

        Refuses (``ValueError``) a cache recorded for another layer count, head
        count, head dim, dtype or placement, or on another device; with
        ``strict_tokens`` (default) also targets whose image token count differs
        from the references'.
        """
        self._check_alive()
        if not isinstance(cache, ReferenceKVCache):
            raise TypeError(f"replay needs a ReferenceKVCache, got {type(cache).__name__}")
        if len(cache) == 0:
            raise ValueError("replay: the ReferenceKVCache is empty; record references first")
        cache.check_signature(self.cache_signature(None), what="replay into")
        dev = self._device()
        if cache.device != dev:
            raise ValueError(f"replay: the cache is on {cache.device}, the transformer on {dev}; "
                             f"move it with cache.to({str(dev)!r})")
        if ref_index is not None:
            ref_index = self._check_ref_index(ref_index, len(cache), dev)
        if ref_regions is not None:
            if ref_index is None:
                raise ValueError("replay: ref_regions needs a ref_index (its slots are the "
                                 "ref_index columns)")
            ref_regions = check_ref_regions(ref_regions, ref_index.shape[1], dev,
                                            rows=ref_index.shape[0])
        return self._activate(_Mode("replay", cache=cache, ref_index=ref_index,
                                    ref_regions=ref_regions, strict_tokens=bool(strict_tokens)))

    @staticmethod
    def _check_ref_index(ref_index, num_entries: int, device) -> torch.Tensor:
        if not isinstance(ref_index, torch.Tensor) or ref_index.is_floating_point() \
                or ref_index.dtype == torch.bool:
            raise TypeError("ref_index must be an integer tensor [B, R] (-1 = none), got "
                            f"{getattr(ref_index, 'dtype', type(ref_index).__name__)}")
        if ref_index.dim() != 2:
            raise ValueError(f"ref_index must be [B, R], got shape {tuple(ref_index.shape)}")
        if ref_index.numel():
            lo, hi = int(ref_index.min()), int(ref_index.max())
            if lo < -1 or hi >= num_entries:
                raise ValueError(f"ref_index values must lie in [-1, {num_entries}) for a cache of "
                                 f"{num_entries} entries, got values in [{lo}, {hi}]")
        # Checked once here, on the host, so the forwards need no host sync for it.
        return ref_index.to(device=device, dtype=torch.int64)

    def remove(self) -> None:
        """Put the original processors back and detach the hooks (idempotent)."""
        if self._removed:
            return
        if self._mode is not None:
            raise RuntimeError(f"remove() inside an active {self._mode.name!r} block")
        for attn, orig, ours in zip(self._attns, self._originals, self._procs):
            # ours, or a copy a diffusers loader re-created with no arguments: stock back;
            # any other processor was put there by diffusers since, and stays
            if attn.processor is ours or isinstance(attn.processor, GroupSharedFluxAttnProcessor):
                attn.set_processor(orig)
        for h in self._hooks:
            h.remove()
        self._removed = True

    # ------------------------------------------------------------------ hooks
    def _device(self) -> torch.device:
        return self.transformer.x_embedder.weight.device \
            if hasattr(self.transformer, "x_embedder") else next(self.transformer.parameters()).device

    def _placement_rotary(self, first: int, n: int, device) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) [n, D] that place entries ``first .. first+n-1``, or None."""
        if self.placement == "none" or n == 0:
            return None
        pos_embed = self.transformer.pos_embed
        if self.placement == "index":
            from .rope import reference_key_rotary

            return reference_key_rotary(pos_embed, n, first_entry=first, device=device)
        axes = len(pos_embed.axes_dim)
        rows = []
        for i in range(first, first + n):
            ids = [float(x) for x in self.placement(i)]
            if len(ids) != axes:
                raise ValueError(f"placement({i}) returned {len(ids)} ids; the model's rotary "
                                 f"embedding has {axes} axes")
            rows.append(ids)
        return pos_embed(torch.tensor(rows, dtype=torch.float32, device=device))

    def _pre_hook(self, module, args, kwargs):
        mode = self._mode
        if mode is None:
            return None
        hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[self._ARG_HIDDEN]
        ehs = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs \
            else (args[self._ARG_ENCODER] if len(args) > self._ARG_ENCODER else None)
        if ehs is None:
            raise ValueError("GroupSharedAttention: the transformer was called without "
                             "encoder_hidden_states")
        B, n_img = hs.shape[0], hs.shape[1]
        text_len = ehs.shape[1]
        fields = dict(mode=mode.name, text_len=text_len, num_image_tokens=n_img)
        if mode.name == "in_batch":
            G, T = mode.group_size, mode.num_targets
            if B % G:
                raise ValueError(f"in_batch: batch of {B} rows is not a whole number of groups of "
                                 f"{G}")
            fields.update(group_size=G, num_targets=T,
                          ref_rotary=self._placement_rotary(0, G - T, hs.device),
                          ref_regions=self._regions_for(mode.ref_regions, B // G * T, n_img))
        elif mode.name == "record":
            fields.update(self._record_fields(mode.cache, args, kwargs, B, n_img, hs.device))
        else:  # replay
            cache = mode.cache
            if mode.strict_tokens and n_img != cache.num_image_tokens:
                raise ValueError(f"replay: the targets have {n_img} image tokens but the cached "
                                 f"references {cache.num_image_tokens} (recorded at another "
                                 "resolution); pass strict_tokens=False to allow it")
            ri = mode.ref_index
            if ri is not None and ri.shape[0] != B:
                if B % ri.shape[0]:
                    raise ValueError(f"replay: ref_index has {ri.shape[0]} rows but the batch has "
                                     f"{B}; give one row per image, or one per prompt when "
                                     "num_images_per_prompt repeats each prompt's rows")
                ri = ri.repeat_interleave(B // ri.shape[0], dim=0)
            pools = tuple(cache.layer(i) for i in range(self.num_layers))
            fields.update(pools=pools, ref_index=ri,
                          ref_regions=self._regions_for(mode.ref_regions, B, n_img))
        ctx = GSAForwardContext(**fields)

        if "joint_attention_kwargs" in kwargs or len(args) <= self._ARG_JOINT_KW:
            jak = dict(kwargs.get("joint_attention_kwargs") or {})
            jak["gsa_context"] = ctx
            kwargs["joint_attention_kwargs"] = jak
        else:
            args = list(args)
            jak = dict(args[self._ARG_JOINT_KW] or {})
            jak["gsa_context"] = ctx
            args[self._ARG_JOINT_KW] = jak
            args = tuple(args)
        return args, kwargs

    @staticmethod
    def _regions_for(regions: Optional[torch.Tensor], rows: int, n_img: int
                     ) -> Optional[torch.Tensor]:
        """The mode's ``ref_regions`` for a forward of ``rows`` targets (repeated per image
        when ``num_images_per_prompt`` repeats each prompt's rows)."""
        if regions is None:
            return None
        if regions.shape[2] != n_img:
            raise ValueError(f"ref_regions covers {regions.shape[2]} image tokens but the "
                             f"targets have {n_img}; make it with region_masks(boxes, grid) "
                             "for the targets' token grid")
        if regions.shape[0] != rows:
            if rows % regions.shape[0]:
                raise ValueError(f"ref_regions has {regions.shape[0]} rows but the forward has "
                                 f"{rows} targets; give one row per target")
            regions = regions.repeat_interleave(rows // regions.shape[0], dim=0)
        return regions

    def _record_fields(self, cache: ReferenceKVCache, args, kwargs, B: int, n_img: int,
                       device) -> dict:
        """Record mode's host work before the forward: the timestep check, cache storage
        growth and entry numbers.  The layers get plain slot views and a tensor rotation,
        so nothing in the forward depends on the entry count."""
        ts = kwargs["timestep"] if "timestep" in kwargs else (
            args[self._ARG_TIMESTEP] if len(args) > self._ARG_TIMESTEP else None)
        if ts is None or bool(torch.as_tensor(ts).ne(0).any()):
            got = "no timestep" if ts is None else \
                f"timestep {torch.as_tensor(ts).flatten()[:4].tolist()}"
            raise ValueError(
                f"GroupSharedAttention.record: the transformer was called with {got}, but "
                "references are recorded clean, at timestep 0 (a whole pipe(...) call inside "
                "record() would record the noisy latents of every step); use "
                "gsa.record_images(pipe, images, prompts) to record reference images")
        start = cache._begin(self.cache_signature(n_img))
        fields = dict(record_slots=cache._record_slots(start, B, device), record_written=[],
                      ref_rotary=self._placement_rotary(start, B, device))
        self._pending_record = (cache, start, B, fields["record_written"])
        return fields

    def _post_hook(self, module, args, kwargs, output):
        if self._pending_record is not None:
            self._commit_record()
        return None

    def _commit_record(self) -> None:
        (cache, start, n, written), self._pending_record = self._pending_record, None
        cache._commit(start, n, written)
