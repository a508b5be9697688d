"""FLUX.2 [klein] backbone of Story-Iter: Group-Shared Attention replay from a pool.

The same round structure as :mod:`pipelines.backbones.flux` (FLUX.1): per round r >= 1 the
references (round r-1's frames, then any character images) are recorded once into a
:class:`storyattn.ReferenceKVCache` by ``Flux2GroupSharedAttention.record_images`` and the
targets are drawn in batches by the stock ``Flux2KleinPipeline.__call__`` inside
``replay``, each reading its entries (``ref_index``, built from ``--refs``).

What differs from FLUX.1, and why:

* references are recorded one by one (pool semantics, ``joint=False``): a target reads
  any subset of the round's frames and adding a frame never changes another's keys;
  they attend to no text (``Flux2KleinKVPipeline``'s semantics), so no prompts are passed;
* reference number j sits at rotary ``T = 10 (j + 1)`` (the pipelines' place for the
  j-th image of a call) whatever cache entry holds it, so the pictures do not depend on
  the cache scope (round or batch);
* the distilled klein (``is_distilled`` in ``model_index.json``) ignores guidance: it is
  passed as 1.0 so the stock pipeline neither runs CFG nor warns; the base klein runs CFG
  with the run's guidance (both branches read the same references); FLUX.2 dev
  (``Flux2Pipeline``) feeds it to its guidance embedding.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from pipelines.backbones.flux import FluxBackbone
from pipelines.lora_files import load_lora_files
from storyattn import GroupSharedAttention
from storyattn.flux2 import REFERENCE_T_SCALE

__all__ = ["Flux2Backbone", "pipeline_class"]


def pipeline_class(model: str) -> str:
    """The diffusers class a FLUX.2 folder's ``model_index.json`` names (klein by default)."""
    import json
    from pathlib import Path

    try:
        cls = json.loads((Path(model) / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        cls = None
    return "Flux2Pipeline" if cls == "Flux2Pipeline" else "Flux2KleinPipeline"


class Flux2Backbone(FluxBackbone):
    """:class:`FluxBackbone`'s rounds, cache scopes and ``draw``; FLUX.2's loading,
    recording and pipeline arguments."""

    name = "flux2"

    def __init__(self, model: str, loras: Sequence[str] = (), device: str = "cpu",
                 dtype=torch.float32, height: int = 1024, width: int = 1024, steps: int = 4,
                 guidance: float = 1.0, step_progress: bool = True,
                 cache_budget_bytes: Optional[int] = None, record_batch: int = 4):
        super().__init__(model, loras, device, dtype, height, width, steps, guidance,
                         step_progress, cache_budget_bytes, record_batch)
        self.distilled = True   # read from the folder (is_distilled) by load()

    def load(self) -> None:
        import diffusers

        from pipelines.backbones.sampling import prepare_pipe

        # klein (Qwen3) folders name Flux2KleinPipeline, FLUX.2 dev's Flux2Pipeline: load the
        # class the folder names (the KV variant's image= path is not used: GSA replays)
        cls = pipeline_class(self.model)
        pipe = getattr(diffusers, cls).from_pretrained(self.model, dtype=self.dtype)
        load_lora_files(pipe, self.loras, "flux2")
        prepare_pipe(pipe, self, "flux2")
        self.pipe = pipe
        self.distilled = bool(getattr(pipe.config, "is_distilled", False))
        self.max_seq = min(512, int(getattr(pipe.tokenizer, "model_max_length", 512)))

        def placement(entry: int):
            return [float(REFERENCE_T_SCALE * (self._cached[entry] + 1)), 0.0, 0.0, 0.0]

        placement.__qualname__ = "story_reference_number"
        self.gsa = GroupSharedAttention(pipe.transformer, placement=placement)

    def _call_guidance(self) -> float:
        return 1.0 if self.distilled else self.guidance

    @torch.no_grad()
    def _record(self, ref_ids: List[int]) -> None:
        """Record references ``ref_ids`` (in this order) into a fresh cache, each alone."""
        self._cached = list(ref_ids)  # read by the placement while recording
        self.gsa.record_images(self.pipe, [self._refs[i] for i in ref_ids], None,
                               cache=self.cache, joint=False, height=self.height,
                               width=self.width, batch_size=self.record_batch, replace=True)
        self.encoder_images += len(ref_ids)
        self.record_forwards += -(-len(ref_ids) // self.record_batch)

    def _pipe_kwargs(self, prompts, generators) -> dict:
        return dict(prompt=prompts, generator=generators, num_inference_steps=self.steps,
                    guidance_scale=self._call_guidance(), height=self.height, width=self.width,
                    max_sequence_length=self.max_seq, output_type="pil")
