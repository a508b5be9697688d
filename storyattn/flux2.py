"""Group-Shared Attention on FLUX.2 (``Flux2Transformer2DModel``: klein 4B/9B, dev).

``GroupSharedAttention(pipe.transformer)`` returns a :class:`Flux2GroupSharedAttention`
when the transformer is FLUX.2's; the API is the FLUX.1 handle's::

    pipe = Flux2KleinKVPipeline.from_pretrained(...)        # or Flux2KleinPipeline
    gsa = GroupSharedAttention(pipe.transformer)
    cache = gsa.record_images(pipe, [ref_a, ref_b], joint=True)
    with gsa.replay(cache):                                  # == pipe(image=[ref_a, ref_b], ...)
        images = pipe(prompt=["...", "...", "..."]).images

What FLUX.2 changes, all here:

* **References attend to no text.**  ``Flux2KleinKVPipeline`` runs reference tokens at a
  fixed timestep (0) attending only to each other; their K/V never depend on a prompt.
  :meth:`~Flux2GroupSharedAttention.record_images` therefore records with zero text
  tokens (and refuses prompts).
* **Where references sit.**  The pipelines give reference ``i`` of a call the rotary ids
  ``(10 + 10 i, row, col, 0)`` and the target ``(0, row, col, 0)``.  Under the default
  placement ``"index"`` cache entry ``i`` is placed at ``T = 10 (i + 1)``, so a cache
  recorded in one call replays exactly what the pipeline attends to.
* **joint or pool.**  ``record_images(..., joint=True)`` runs the images of one call as one
  sequence (their tokens attend to each other: the KV pipeline's semantics) and stores
  one entry per image; the default records each image alone (pool semantics), so a
  target may read any subset (``ref_index``) and adding a reference never changes the
  others.  Either way entry ``i``'s keys are placed at entry number ``i``.
* **Latents.**  FLUX.2's VAE latents are patchified 2x2 into channels (``(c, dy, dx)``
  order), normalised by the VAE's batch-norm statistics and flattened row-major.

Caches carry ``"flux2:"`` in their placement name: a FLUX.1 cache is refused by a FLUX.2
model and the other way round.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from .cache import ReferenceKVCache
from .gsa import GroupSharedAttention, _Mode, register_family
from .processors.flux2_gsa import (GroupSharedFlux2AttnProcessor,
                                   GroupSharedFlux2ParallelAttnProcessor,
                                   flux2_stock_processor_types)
from .references import record_inputs, unwrap_model, unwrap_to

__all__ = ["Flux2GroupSharedAttention", "encode_flux2_latents", "flux2_image_ids",
           "REFERENCE_T_SCALE"]

# Flux2Pipeline._prepare_image_ids: reference i of a call at T = scale + scale * i.
REFERENCE_T_SCALE = 10
FAMILY = "flux2:"


@torch.no_grad()
def encode_flux2_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] -> FLUX.2 tokens ``[B, (H/2f)(W/2f), 4C]``.

    The VAE posterior's mode (``sample_mode="argmax"``, as the pipelines encode
    references), each 2x2 latent patch folded into channels ``(c, dy, dx)``, normalised
    by ``vae.bn``'s running statistics, then flattened row-major (``Flux2Pipeline``'s
    ``_patchify_latents`` / ``_pack_latents``, written here)."""
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    lat = vae.encode(pixels).latent_dist.mode()
    b, c, h, w = lat.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX.2 patchifies 2x2 latent patches; latent size {h}x{w} is not even")
    lat = lat.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(lat.device, lat.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
        lat.device, lat.dtype)
    lat = (lat - mean) / std
    return lat.flatten(2).transpose(1, 2)


def flux2_image_ids(rows: int, cols: int, t: float = 0.0, device=None) -> torch.Tensor:
    """Rotary ids ``[rows * cols, 4]`` of one image's tokens: ``(t, row, col, 0)``, rows
    then columns (``Flux2Pipeline._prepare_latent_ids`` for ``t = 0``)."""
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    ids = torch.stack([torch.zeros_like(r), r, c, torch.zeros_like(r)], dim=-1).float()
    ids[:, 0] = float(t)
    return ids


@dataclass(frozen=True, eq=False)
class _Flux2Mode(_Mode):
    joint: int = 0  # record: > 0 = one row holding this many images' tokens


class Flux2GroupSharedAttention(GroupSharedAttention):
    """:class:`~storyattn.GroupSharedAttention` on a diffusers ``Flux2Transformer2DModel``.

    Made by ``GroupSharedAttention(transformer)``; same arguments and modes.  The layers
    may run diffusers' plain FLUX.2 processors or the KV ones ``Flux2KleinKVPipeline``
    installs; with no mode active each computes what it computed before (the KV
    pipeline's ``image=`` path included).  Cache layers: double-stream blocks, then
    single-stream blocks.  ``placement="index"`` puts entry ``i`` at rotary ids
    ``(10 (i + 1), 0, 0, 0)`` on top of the image's own (the pipelines' reference
    layout); a callable gives 4 ids (``T, H, W, L``) per entry.
    """

    # Flux2Transformer2DModel.forward(hidden_states, encoder_hidden_states, timestep,
    # img_ids, txt_ids, guidance, joint_attention_kwargs, ...)
    _ARG_HIDDEN, _ARG_ENCODER, _ARG_TIMESTEP, _ARG_JOINT_KW = 0, 1, 2, 6

    def __init__(self, transformer, *, placement="index", backend=None, rope_backend=None):
        _record_host_work_out_of_graphs()
        super().__init__(transformer, placement=placement, backend=backend,
                         rope_backend=rope_backend)

    @staticmethod
    def _check_stock_processor(i: int, proc) -> None:
        kinds = flux2_stock_processor_types()
        if not isinstance(proc, kinds["double"] + kinds["single"]):
            raise TypeError(f"attention layer {i} runs {type(proc).__name__}; GroupSharedAttention "
                            "replaces diffusers' Flux2AttnProcessor / Flux2ParallelSelfAttnProcessor "
                            "and their KV variants only (transformer.set_default_attn_processor() "
                            "resets it)")

    def _make_processor(self, i: int, stock, backend, rope_backend):
        kinds = flux2_stock_processor_types()
        kv = isinstance(stock, (kinds["double"][1], kinds["single"][1]))
        cls = GroupSharedFlux2AttnProcessor if i < self.num_double_layers \
            else GroupSharedFlux2ParallelAttnProcessor
        return cls(i, backend=backend, rope_backend=rope_backend, kv=kv)

    @property
    def placement_name(self) -> str:
        return FAMILY + super().placement_name

    # ------------------------------------------------------------------ placement
    def _placement_ids(self, first: int, n: int, device) -> torch.Tensor:
        """``[n, 4]`` rotary id offsets of entries ``first .. first + n - 1``."""
        if self.placement == "index":
            ids = torch.zeros(n, 4, device=device)
            ids[:, 0] = REFERENCE_T_SCALE * torch.arange(first + 1, first + n + 1, device=device)
            return ids
        if self.placement == "none":
            return torch.zeros(n, 4, device=device)
        rows = []
        for i in range(first, first + n):
            ids = [float(x) for x in self.placement(i)]
            if len(ids) != 4:
                raise ValueError(f"placement({i}) returned {len(ids)} ids; FLUX.2's rotary "
                                 "embedding has 4 axes (T, H, W, L)")
            rows.append(ids)
        return torch.tensor(rows, dtype=torch.float32, device=device)

    def _placement_rotary(self, first: int, n: int, device):
        if self.placement == "none" or n == 0:
            return None
        return self.transformer.pos_embed(self._placement_ids(first, n, device))

    # ------------------------------------------------------------------ family checks
    @staticmethod
    def _check_family(cache: ReferenceKVCache, what: str) -> None:
        sig = cache.signature if isinstance(cache, ReferenceKVCache) else None
        if sig is not None and not sig.placement.startswith(FAMILY):
            raise ValueError(f"{what}: this ReferenceKVCache was recorded from a FLUX.1 model; a "
                             "FLUX.2 transformer cannot use it (record the references with this "
                             "model)")

    def replay(self, cache, ref_index=None, *, ref_regions=None, strict_tokens: bool = True):
        self._check_family(cache, "replay")
        return super().replay(cache, ref_index, ref_regions=ref_regions,
                              strict_tokens=strict_tokens)

    def record(self, cache, *, replace: bool = False):
        if not replace:
            self._check_family(cache, "record")
        return super().record(cache, replace=replace)

    def _record_joint(self, cache: ReferenceKVCache, n: int):
        """record() for one forward whose single row holds ``n`` images' tokens."""
        self._check_family(cache, "record")
        return self._activate(_Flux2Mode("record", cache=cache, joint=int(n)))

    def _record_fields(self, cache, args, kwargs, B, n_img, device) -> dict:
        joint = getattr(self._mode, "joint", 0)
        if not joint:
            return super()._record_fields(cache, args, kwargs, B, n_img, device)
        ts = kwargs["timestep"] if "timestep" in kwargs else (
            args[self._ARG_TIMESTEP] if len(args) > self._ARG_TIMESTEP else None)
        if ts is None or bool(torch.as_tensor(ts).ne(0).any()):
            raise ValueError("Flux2GroupSharedAttention: joint references are recorded at "
                             "timestep 0")
        if B != 1 or n_img % joint:
            raise ValueError(f"joint record: expected one row of {joint} images' tokens, got "
                             f"{B} rows of {n_img} tokens")
        start = cache._begin(self.cache_signature(n_img // joint))
        slots = tuple((k.view(1, -1, *k.shape[2:]), v.view(1, -1, *v.shape[2:]))
                      for k, v in cache._record_slots(start, joint, device))
        # the keys are placed by the rotary ids of the forward itself: no extra rotation
        fields = dict(record_slots=slots, record_written=[], ref_rotary=None)
        self._pending_record = (cache, start, joint, fields["record_written"])
        return fields

    # ------------------------------------------------------------------ record_images
    def record_images(self, pipe, images, prompts=None, cache: Optional[ReferenceKVCache] = None,
                      *, joint: bool = False, height: Optional[int] = None,
                      width: Optional[int] = None, batch_size: int = 4, guidance: float = 4.0,
                      max_sequence_length=None, replace: bool = False) -> ReferenceKVCache:
        """Record clean reference images into a :class:`ReferenceKVCache`, FLUX.2 style.

        Each image is sized as the FLUX.2 pipelines size a reference (shrunk to at most
        1024^2 pixels, cropped to a multiple of twice the VAE scale factor; or resized to
        ``height`` x ``width`` when given), encoded (posterior mode, 2x2 patchify, batch-norm
        normalisation) and run through the transformer at timestep 0 with no text.

        Args:
            pipe: a ``Flux2KleinPipeline``, ``Flux2KleinKVPipeline`` or ``Flux2Pipeline``
                whose transformer this handle was installed on.
            images: PIL images (or ``[3, H, W]`` tensors in [0, 1]); all must come to the
                same size (one cache entry size).
            prompts: must be None: FLUX.2 references attend to no text.
            joint: True: the images form one group whose tokens attend to each other
                (``Flux2KleinKVPipeline(image=images)``); False (default): each alone.
            cache, replace: the cache to append to (a new one when None) / start it over.
            batch_size: images per forward when ``joint`` is False.
            guidance: guidance embedding for models with ``guidance_embeds`` (FLUX.2 dev).

        Returns the cache; entry ``len(cache_before) + j`` is image ``j``.
        """
        if prompts is not None:
            raise ValueError("record_images: FLUX.2 references attend to no text (as in "
                             "Flux2KleinKVPipeline); pass prompts=None")
        del max_sequence_length  # no text is encoded
        if unwrap_to(getattr(pipe, "transformer", None), self.transformer) is not self.transformer or \
                not hasattr(pipe, "vae"):
            raise ValueError("record_images: pipe must be a FLUX.2 pipeline whose transformer is "
                             "the one this GroupSharedAttention was installed on")
        items, cache = record_inputs(images, batch_size, cache, replace)
        self._check_family(cache, "record_images")
        pixels = self._preprocess(pipe, items, height, width)
        cache.reserve(len(cache) + len(items))

        model, device = self.transformer, self._device()
        dtype, n = model.dtype, len(items)
        text_dim = model.config.joint_attention_dim
        with_guidance = bool(getattr(model.config, "guidance_embeds", False))
        with torch.no_grad():
            tokens = torch.cat([encode_flux2_latents(pipe.vae, pixels[s:s + batch_size].to(device))
                                for s in range(0, n, int(batch_size))]).to(dtype)
            rows, cols = pixels.shape[-2] // (2 * self._vae_scale(pipe)), \
                pixels.shape[-1] // (2 * self._vae_scale(pipe))
            base = flux2_image_ids(rows, cols, device=device)
            groups = [(0, n)] if joint else [(s, min(n, s + int(batch_size)))
                                             for s in range(0, n, int(batch_size))]
            for lo, hi in groups:
                m = hi - lo
                if joint:
                    start = len(cache)
                    offsets = self._placement_ids(start, m, device)
                    ids = torch.cat([base + offsets[j] for j in range(m)])
                    x = tokens[lo:hi].reshape(1, m * base.shape[0], -1)
                    ctx = self._record_joint(cache, m)
                else:
                    ids, x, ctx = base, tokens[lo:hi], self.record(cache)
                b = x.shape[0]
                g = torch.full((b,), float(guidance), device=device, dtype=torch.float32) \
                    if with_guidance else None
                with ctx:
                    pipe.transformer(hidden_states=x,
                                     encoder_hidden_states=torch.zeros(b, 0, text_dim, device=device,
                                                                       dtype=dtype),
                                     timestep=torch.zeros(b, device=device, dtype=dtype),
                                     img_ids=ids, txt_ids=torch.zeros(0, 4, device=device),
                                     guidance=g, return_dict=False)
        return cache

    @staticmethod
    def _vae_scale(pipe) -> int:
        return int(getattr(pipe, "vae_scale_factor", 8))

    def _preprocess(self, pipe, items: List, height, width) -> torch.Tensor:
        """Pixels ``[N, 3, H, W]`` in [-1, 1], sized as the FLUX.2 pipelines size references."""
        proc = pipe.image_processor
        multiple = 2 * self._vae_scale(pipe)
        out = []
        for im in items:
            if height is None and width is None and _is_pil(im):
                w, h = im.size
                if w * h > 1024 * 1024:
                    im = proc._resize_to_target_area(im, 1024 * 1024)
                    w, h = im.size
                h, w = (h // multiple) * multiple, (w // multiple) * multiple
                out.append(proc.preprocess(im, height=h, width=w, resize_mode="crop"))
            else:
                out.append(proc.preprocess(im, height=height, width=width))
        sizes = {tuple(p.shape[-2:]) for p in out}
        if len(sizes) != 1:
            raise ValueError(f"record_images: the references come to sizes {sorted(sizes)}; a cache "
                             "holds one size: pass height= and width=")
        return torch.cat(out)


def _is_pil(im) -> bool:
    """A PIL image (sized the pipelines' way); tensors and arrays keep their size."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - diffusers needs Pillow
        return False
    return isinstance(im, Image.Image)


def _record_host_work_out_of_graphs() -> None:
    """As storyattn.gsa does for FLUX.1: record mode's host work (timestep check, cache
    growth, entry numbers) stays eager, so a compiled forward sees fixed shapes."""
    cls = Flux2GroupSharedAttention
    if cls.__dict__.get("_host_work_disabled"):
        return
    cls._record_fields = torch.compiler.disable(cls.__dict__["_record_fields"])
    cls._host_work_disabled = True


def _is_flux2(transformer) -> bool:
    """A diffusers Flux2Transformer2DModel, possibly inside torch.compile / DDP wrappers."""
    return type(unwrap_model(transformer)).__name__ == "Flux2Transformer2DModel"


register_family(_is_flux2, Flux2GroupSharedAttention)
