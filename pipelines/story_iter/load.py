"""The load stage of ``python -m pipelines.story_iter``: the memory check before any weight
loads (:mod:`.memory` does the arithmetic) and the backbone the plan names, configured with
the run's sampling options."""
from __future__ import annotations

from typing import List, Optional

__all__ = ["make_backbone", "preflight", "preflight_estimate", "truncation_note"]


def make_backbone(plan, step_progress: bool, cache_budget: Optional[int] = None):
    from .presets import configure_backbone

    return configure_backbone(_make_backbone(plan, step_progress, cache_budget),
                              plan["sampling"])


def _make_backbone(plan, step_progress: bool, cache_budget: Optional[int] = None):
    import torch

    cfg = plan["config"]
    dtype = getattr(torch, plan["dtype"])
    if cfg["backbone"] == "sdxl":
        from pipelines.backbones.sdxl import SDXLBackbone

        return SDXLBackbone(plan["model"], plan["ip_adapter"], plan["image_encoder"],
                            cfg["loras"], plan["device"], dtype, cfg["height"], cfg["width"],
                            cfg["steps"], cfg["guidance"],
                            step_progress=step_progress)
    if cfg["backbone"] == "flux2":
        from pipelines.backbones.flux2 import Flux2Backbone as FluxBackbone
    else:
        from pipelines.backbones.flux import FluxBackbone

    return FluxBackbone(plan["model"], cfg["loras"], plan["device"], dtype, cfg["height"],
                        cfg["width"], cfg["steps"], cfg["guidance"],
                        step_progress=step_progress, cache_budget_bytes=cache_budget,
                        record_batch=cfg["batch_size"])


def _memory_plan(plan, char_images: int):
    from pipelines.story_iter.memory import MemoryPlan

    cfg, story = plan["config"], plan["story"]
    extra = [p for p in (plan["ip_adapter"], plan["image_encoder"]) if p] + list(cfg["loras"])
    return MemoryPlan(backbone=cfg["backbone"], model=plan["model"],
                      extra_weight_paths=tuple(extra), dtype=plan["dtype"],
                      device=plan["device"], frames=cfg["frames"], batch_size=cfg["batch_size"],
                      height=cfg["height"], width=cfg["width"], guidance=cfg["guidance"],
                      refs=cfg["refs"], extra_refs=char_images, ip_adapter=plan["ip_adapter"],
                      characters=max([len(f.characters) for f in story.frames] + [1]),
                      story_characters=max(1, len(story.characters)))


def preflight_estimate(plan, args, char_images: int):
    """The estimate and the available memory, without refusing (non-main processes)."""
    from pipelines.story_iter.memory import GiB, available_bytes, estimate

    avail = (int(args.max_memory * GiB) if args.max_memory is not None
             else available_bytes(plan["device"])[0])
    return estimate(_memory_plan(plan, char_images)), avail


def preflight(plan, args, char_images: int):
    """``(estimate, available)``; raises PreflightError with options when it will not fit."""
    from pipelines.story_iter.memory import GiB, check_fits

    mp = _memory_plan(plan, char_images)
    if args.max_memory is not None:
        return check_fits(mp, int(args.max_memory * GiB), "--max-memory")
    return check_fits(mp)


def truncation_note(backbone, prompts: List[str]) -> Optional[str]:
    """How many prompts the text encoders cut (the stock pipelines truncate to their limit)."""
    pipe = backbone.pipe
    worst = None
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is None:
            continue
        limit = int(tok.model_max_length)
        # FLUX.1's T5 (tokenizer_2) and FLUX.2's Qwen3 (tokenizer) read max_seq tokens
        if (name == "tokenizer_2" or getattr(backbone, "name", "") == "flux2") \
                and getattr(backbone, "max_seq", None):
            limit = int(backbone.max_seq)
        n = sum(len(tok(p).input_ids) > limit for p in prompts)
        if n and (worst is None or n > worst[0]):
            worst = (n, limit)
    if worst is None:
        return None
    return (f"note: {worst[0]} of {len(prompts)} prompts are longer than the text encoder's "
            f"{worst[1]} tokens; they are truncated to {worst[1]}, as the stock pipeline does")
