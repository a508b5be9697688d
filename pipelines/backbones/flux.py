"""FLUX backbone of Story-Iter: Group-Shared Attention replay from a per-round cache.

Per round r >= 1 the references (round r-1's frames, plus any character reference
images) are recorded once into a :class:`storyattn.ReferenceKVCache` by
``GroupSharedAttention.record_images``: each image goes through the VAE encoder
(counted), is packed into FLUX's 2x2 patch tokens, and a transformer forward at
timestep 0 with its own prompt writes its image-token K/V of every layer into the cache.  Targets are then drawn in
batches with the stock ``FluxPipeline.__call__`` inside ``GroupSharedAttention.replay``,
each reading its selected entries (``ref_index``; -1 = padding).

Cache scope: the whole round's references are recorded once when they fit
``cache_budget_bytes``; otherwise (e.g. 100 frames at 1024x1024 with ``--refs topk:K``)
the cache holds one batch's union of references and is re-recorded per batch (the
VAE-encoder count in the manifest then exceeds N).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from pipelines.lora_files import load_lora_files
from storyattn import GroupSharedAttention, ReferenceKVCache, region_masks

__all__ = ["FluxBackbone"]


class FluxBackbone:
    name = "flux"

    def __init__(self, model: str, loras: Sequence[str] = (), device: str = "cpu",
                 dtype=torch.float32, height: int = 1024, width: int = 1024, steps: int = 28,
                 guidance: float = 3.5, step_progress: bool = True,
                 cache_budget_bytes: Optional[int] = None, record_batch: int = 4):
        self.model, self.loras, self.device, self.dtype = model, list(loras), device, dtype
        self.height, self.width, self.steps, self.guidance = height, width, steps, guidance
        self.step_progress = step_progress
        self.cache_budget_bytes = cache_budget_bytes
        self.record_batch = max(1, record_batch)
        self.encoder_images = 0       # images through the VAE encoder (all rounds)
        self.record_forwards = 0      # transformer forwards at timestep 0 (record mode)
        self.pipe = None
        self.gsa: Optional[GroupSharedAttention] = None
        self.cache = ReferenceKVCache()
        self._refs: List = []
        self._ref_prompts: List[str] = []
        self._cached: List[int] = []  # reference numbers held by the cache, in entry order
        self._open = False
        self.scope = "round"
        self.scheduler = "model"   # model | euler (presets.configure_backbone)
        self.vae_fp32 = False

    # -- loading ----------------------------------------------------------------------------
    def load(self) -> None:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(self.model, dtype=self.dtype)
        load_lora_files(pipe, self.loras, "flux")
        from pipelines.backbones.sampling import prepare_pipe

        prepare_pipe(pipe, self, "flux")
        self.pipe = pipe
        self.max_seq = min(512, int(pipe.tokenizer_2.model_max_length))
        # Reference j (its number in the round: frame j of round r-1, then the character
        # images) sits at rotary ids (j + 1, 0, 0) whatever cache entry holds it, so the
        # pictures do not depend on the cache scope (the default "index" placement of
        # docs/design.md when entry == reference, as in a round-scope cache).
        axes = len(pipe.transformer.pos_embed.axes_dim)

        def placement(entry: int):
            return [float(self._cached[entry] + 1)] + [0.0] * (axes - 1)

        placement.__qualname__ = "story_reference_number"
        self.gsa = GroupSharedAttention(pipe.transformer, placement=placement)

    # -- references -------------------------------------------------------------------------
    @property
    def cache_bytes(self) -> int:
        return int(self.cache.nbytes)

    def _token_grid(self):
        """(rows, cols) of the image tokens: the VAE's factor, then 2x2 latent patches (FLUX.1
        and FLUX.2 alike)."""
        s = self.pipe.vae_scale_factor * 2
        return self.height // s, self.width // s

    def _image_tokens(self) -> int:
        gh, gw = self._token_grid()
        return gh * gw

    def begin_round(self, ref_images: List, scale: float,
                    ref_prompts: Optional[List[str]] = None) -> dict:
        """Keep the round's references; record them all now when they fit the budget.
        (``scale`` is unused: GSA attends to references in the same softmax.)"""
        if self._open:
            raise RuntimeError("a round is already open")
        self._refs = list(ref_images)
        self._ref_prompts = list(ref_prompts or [""] * len(ref_images))
        self._cached = []
        self.cache.clear()
        self._open = True
        need = self.gsa.estimate_cache_bytes(len(self._refs), self._image_tokens(), self.dtype) \
            if self._refs else 0
        self.scope = "round" if (self.cache_budget_bytes is None
                                 or need <= self.cache_budget_bytes) else "batch"
        before = self.encoder_images
        if self._refs and self.scope == "round":
            self._record(list(range(len(self._refs))))
        return {"encoder_images": self.encoder_images - before, "cache_bytes": self.cache_bytes,
                "num_refs": len(self._refs), "cache_scope": self.scope}

    def end_round(self) -> None:
        self._open = False
        self._refs, self._ref_prompts, self._cached = [], [], []
        self.cache.clear()

    @torch.no_grad()
    def _record(self, ref_ids: List[int]) -> None:
        """Record references ``ref_ids`` (in this order) into a fresh cache."""
        self._cached = list(ref_ids)  # read by the placement while recording
        self.gsa.record_images(self.pipe, [self._refs[i] for i in ref_ids],
                               [self._ref_prompts[i] for i in ref_ids], cache=self.cache,
                               height=self.height, width=self.width,
                               batch_size=self.record_batch, guidance=self.guidance,
                               max_sequence_length=self.max_seq, replace=True)
        self.encoder_images += len(ref_ids)
        self.record_forwards += -(-len(ref_ids) // self.record_batch)

    # -- drawing ----------------------------------------------------------------------------
    def _pipe_kwargs(self, prompts: List[str], generators: List[torch.Generator]) -> dict:
        """The stock pipeline's arguments for one batch (FLUX.2 passes its own)."""
        return dict(prompt=prompts, generator=generators, num_inference_steps=self.steps,
                    guidance_scale=self.guidance, height=self.height, width=self.width,
                    max_sequence_length=self.max_seq, output_type="pil")

    @torch.no_grad()
    def draw(self, prompts: List[str], generators: List[torch.Generator],
             ref_index: Optional[List[List[int]]] = None,
             regions: Optional[List[List]] = None) -> List:
        """Draw one batch; ``ref_index[i]``: reference numbers frame i reads (None = all);
        ``regions[i]``: one box (or None) per entry of ``ref_index[i]``, where frame i's
        image tokens read that reference (:func:`storyattn.region_masks`)."""
        if not self._open:
            raise RuntimeError("draw() outside a round")
        kw = self._pipe_kwargs(prompts, generators)
        if not self._refs:
            return self.pipe(**kw).images
        wanted = sorted({j for row in ref_index for j in row}) if ref_index is not None \
            else list(range(len(self._refs)))
        if self.scope == "batch" and not set(wanted) <= set(self._cached):
            self._record(wanted)
        entry = {ref: e for e, ref in enumerate(self._cached)}
        idx = None
        if ref_index is not None:
            width = max(len(r) for r in ref_index)
            idx = torch.full((len(ref_index), max(1, width)), -1, dtype=torch.long)
            for row, refs in enumerate(ref_index):
                for c, ref in enumerate(refs):
                    idx[row, c] = entry[ref]
        elif len(self._cached) != len(self._refs):
            idx = torch.tensor([[entry[j] for j in wanted]] * len(prompts), dtype=torch.long)
        masks = None
        if regions is not None and any(b is not None for row in regions for b in row):
            if ref_index is None:
                raise ValueError("draw: regions need ref_index (one box per entry it names)")
            masks = region_masks(regions, self._token_grid(), num_slots=idx.shape[1])
        with self.gsa.replay(self.cache, ref_index=idx, ref_regions=masks):
            return self.pipe(**kw).images
