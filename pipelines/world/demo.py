"""The built-in demo of ``python -m pipelines.story_iter`` when the world weights are there:
a 100-frame world story drawn by the world FLUX model with its stage-1 GSA LoRA.

``world_demo()`` returns ``None`` when the committed weights are missing (the caller then falls
back to the tiny random preset), else a dict: ``story`` (path of the story file, written once
into the tiny-model cache root), ``model``, ``loras`` and the run settings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from . import weights as W

DEMO_SEED = 0
DEMO_VERSION = "v1"
# 64x64 frames, 20 flow-matching steps (the world model's sampling setting), 2 rounds
SETTINGS = dict(rounds=2, steps=20, height=64, width=64, batch_size=25)


def demo_story_path(root=None) -> Path:
    from ..tiny import default_cache_root
    from .data import make_story

    root = Path(root) if root is not None else default_cache_root()
    folder = root / f"world-demo-{DEMO_VERSION}"
    path = folder / "story.json"
    if not path.is_file():
        tmp = folder.parent / (folder.name + ".tmp")
        make_story(tmp, seed=DEMO_SEED, frames=100, title="A story of the world")
        try:
            tmp.rename(folder)
        except OSError:            # another process wrote it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path


def world_demo(root=None) -> Optional[Dict[str, Any]]:
    if not W.available():
        return None
    return {"story": str(demo_story_path(root)), "model": W.flux_path(),
            "loras": [W.gsa_lora_path()], **SETTINGS}


def world_default(args) -> Optional[Dict[str, Any]]:
    """For ``python -m pipelines.story_iter``: with neither ``--model`` nor ``--story`` (and no
    backbone or ``--backbone flux``), point ``args`` at the world demo (story, model, stage-1
    LoRA unless ``--lora`` was given) and return its run settings plus a note; else leave the
    tiny random presets in charge (``--backbone`` defaults to sdxl) and return None."""
    world = None
    if args.model is None and args.story is None and args.backbone in (None, "flux"):
        world = world_demo()
    if world is None:
        args.backbone = args.backbone or "sdxl"
        return None
    args.backbone = "flux"
    args.story, args.model = world["story"], world["model"]
    args.lora = list(args.lora) or world["loras"]
    note = (f"No --model or --story given: drawing the built-in story-world demo ({args.story}) "
            f"with the world FLUX model trained here (pipelines/world/weights) and its stage-1 "
            f"GSA LoRA, {SETTINGS['rounds']} rounds x {SETTINGS['steps']} steps at 64x64. The "
            f"contact sheet shows the reader's consistency metrics per round.")
    return {**{k: world[k] for k in SETTINGS}, "note": note}
