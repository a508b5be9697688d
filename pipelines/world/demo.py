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
DEMO_REFS = "topk:3"


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


def world_default(args, argv) -> Optional[Dict[str, Any]]:
    """For ``python -m pipelines.story_iter``: with no ``--model``, ``--story``, ``--lora`` or
    ``--preset`` (and no ``--backbone`` other than flux in ``argv``), point ``args`` at the
    world demo (story, world model, stage-1 LoRA) and return ``{"settings", "note"}``; else
    change nothing (the tiny random presets stay in charge) and return None."""
    given = any(a == "--backbone" or a.startswith("--backbone=") for a in argv)
    if (args.model is not None or args.story is not None or args.lora
            or getattr(args, "preset", None) or (given and args.backbone != "flux")):
        return None
    world = world_demo()
    if world is None:
        return None
    args.backbone = "flux"
    args.story, args.model, args.lora = world["story"], world["model"], list(world["loras"])
    # The stage-1 LoRA learned from groups of a few references: reading all 100 frames of the
    # previous round at once swamps each frame's own tokens (later rounds turn to noise), so
    # the demo reads the 3 frames that share the most characters, as bench_quality does.
    if not any(a == "--refs" or a.startswith("--refs=") for a in argv):
        args.refs = DEMO_REFS
    note = (f"no --model or --story: the built-in story-world demo ({args.story}) on the world "
            f"FLUX model trained here (pipelines/world/weights) with its stage-1 GSA LoRA; "
            f"{SETTINGS['rounds']} rounds x {SETTINGS['steps']} steps at 64x64, --refs {args.refs} "
            f"unless given; "
            f"the contact sheet shows the reader's consistency metrics per round")
    return {"settings": {k: world[k] for k in SETTINGS}, "note": note}
