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
DEMO_VERSION = "v3"            # v3: every frame carries its layout (regions); v2: big characters
# 64x64 frames, 10 flow-matching steps (what the build and bench_quality draw with; 20 took
# twice the time for the same reader figures), rounds 0..3
SETTINGS = dict(rounds=3, steps=10, height=64, width=64, batch_size=25)
DEMO_REFS = "solo:1"
DEMO_ROUND0_REFS = "characters"


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
    # The stage-1 LoRA learned to read one reference per character, inside its box: round 0
    # reads the characters' images (without them it draws no legible character), and a later
    # round reads beside each image one frame of the previous round that shows that character
    # alone (solo:1) -- whole scenes (topk:K) or more frames per character (solo:3) pulled
    # identity down (docs/world.md, "Story-Iter's rounds").
    if not any(a == "--refs" or a.startswith("--refs=") for a in argv):
        args.refs = DEMO_REFS
    if not any(a == "--round0-refs" or a.startswith("--round0-refs=") for a in argv):
        args.round0_refs = DEMO_ROUND0_REFS
    note = (f"no --model or --story: the built-in story-world demo ({args.story}) on the world "
            f"FLUX model trained here (pipelines/world/weights) with its stage-1 GSA LoRA; "
            f"{SETTINGS['rounds']} rounds x {SETTINGS['steps']} steps at 64x64, --refs {args.refs} "
            f"and --round0-refs {args.round0_refs} unless given; "
            f"the contact sheet shows the reader's consistency metrics per round")
    return {"settings": {k: world[k] for k in SETTINGS}, "note": note}
