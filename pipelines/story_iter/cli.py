"""Story-Iter: iterative story visualization over R rounds x N frames.

::

    python -m pipelines.story_iter [--story FILE] [--backbone sdxl|flux|flux2] [--model PATH]
        [--ip-adapter PATH] [--image-encoder PATH] [--lora PATH ...] [--frames N]
        [--rounds R] [--steps S] [--guidance G] [--scales A:B] [--seed S]
        [--batch-size B] [--height H --width W] [--out DIR] [--device D] [--dtype T]
        [--refs all|topk:K|window:W|solo:K]

Round 0 draws every frame from its prompt alone; round r = 1..R draws every frame again
while it attends to the frames of round r-1:

* ``sdxl`` (the published method): SDXL + IP-Adapter; Global Reference Cross-Attention
  over all N frames (4 tokens each), weight ``scale_r = linspace(A, B, R)[r-1]``.
* ``flux``: FLUX + Group-Shared Attention replaying a ``ReferenceKVCache`` recorded from
  round r-1's frames at timestep 0; ``--refs`` picks each frame's references.
* ``flux2``: FLUX.2 [klein] (or dev) + GSA, the same pool of round r-1's frames (each
  recorded alone, attending to no text); ``--preset flux2-klein`` (distilled, 4 steps) or
  ``flux2-klein-base`` (50 steps, CFG).

``--model DIR`` alone picks the backbone its ``model_index.json`` names; an explicit
``--backbone`` that does not fit the folder is refused, naming the fix.

With no ``--model`` it runs the built-in 100-frame demo (a snowman who meets a fox) on a
tiny model with random weights that it builds offline, with fewer rounds and steps than
the published defaults (it says so when it starts).  Real weights come from local paths.

Before any weight loads it prints the plan (every setting, and whether it resumes); a
user's mistake is one line on stderr with exit code 2.  Outputs (``--out``):
``round_XX/frame_YYY.png`` (written atomically when their batch finishes),
``manifest.json``, ``index.html``; ``.lock`` while a run owns the folder.  Ctrl-C stops
after marking the manifest "interrupted"; rerunning the same command resumes with the
first unfinished frame.  Under ``accelerate launch`` (or ``torchrun``) each process draws
its share of every round (whole batches, so the result equals a single-process run).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .. import quiet
from ..cli_common import OneLineParser, UsageError, report_usage_error
from ..world.demo import world_default
from . import presets, story
from .plan import DEMO, PUBLISHED, check_device, parse_refs
from .refs import round_scales, select_refs

__all__ = ["main", "build_parser", "select_refs", "parse_refs", "round_scales", "DEMO"]

PROG = "python -m pipelines.story_iter"


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Story-Iter: R rounds x N frames of a story, each round attending to the "
                    "previous one. No arguments: the built-in demo on a tiny offline model.",
        epilog="""examples:
  python -m pipelines.story_iter                       # built-in demo, tiny offline SDXL
  python -m pipelines.story_iter --backbone flux       # the same on the tiny FLUX preset
  python -m pipelines.story_iter --backbone flux2      # ... on the tiny FLUX.2 klein preset
  python -m pipelines.story_iter --model /models/FLUX.2-klein-4B --preset flux2-klein \
      --refs topk:3 --out runs/klein
  python -m pipelines.story_iter --story my.json --model /models/sdxl \\
      --ip-adapter /models/ip/sdxl_models/ip-adapter_sdxl.safetensors --out runs/my
  python -m pipelines.story_iter --backbone flux --model /models/flux1-dev \\
      --lora stage1.safetensors stage2.safetensors --refs topk:3 --out runs/flux
  accelerate launch --multi_gpu --num_processes 2 -m pipelines.story_iter ...
      (each process draws its share of every round; also works on CPU, with gloo)
Rerun the same command to resume an interrupted run.""")
    ap.add_argument("--story", help="story JSON (default: the built-in 100-frame demo)")
    ap.add_argument("--backbone", choices=["sdxl", "flux", "flux2"], default=None,
                    help="default: the one --model's model_index.json names (sdxl without "
                         "--model)")
    ap.add_argument("--model", help="local diffusers pipeline folder (default: tiny offline "
                                    "preset, random weights)")
    ap.add_argument("--ip-adapter", help="SDXL: local IP-Adapter weights file")
    ap.add_argument("--image-encoder", help="SDXL: CLIP image encoder folder (default: "
                                            "image_encoder/ next to the adapter file)")
    ap.add_argument("--lora", nargs="+", default=[], metavar="PATH",
                    help="LoRA files to load with pipe.load_lora_weights (e.g. GSA stage 1 and "
                         "stage 2)")
    ap.add_argument("--frames", type=int, help="use the first N frames of the story")
    ap.add_argument("--rounds", type=int, help="refinement rounds R after round 0 "
                                               f"(published: {PUBLISHED['rounds']})")
    ap.add_argument("--steps", type=int, help=f"denoising steps (published: {PUBLISHED['steps']})")
    ap.add_argument("--guidance", type=float, help="guidance scale (sdxl: CFG, default 5.0; "
                                                   "flux: distilled guidance, default 3.5; "
                                                   "flux2: klein base CFG, default 4.0, "
                                                   "ignored by the distilled klein)")
    ap.add_argument("--scales", help="A:B, reference weight of round r = linspace(A, B, R) "
                                     "(default 0.3:0.5)")
    ap.add_argument("--seed", type=int, help="seed of every frame's generator (default 0)")
    ap.add_argument("--seed-per-frame", action="store_true",
                    help="seed frame i with seed + i instead of one seed for all frames")
    ap.add_argument("--batch-size", type=int, help="frames per denoising batch")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--refs", default="all",
                    help="references per frame: all | topk:K (frames sharing most characters, "
                         "ties by distance) | window:W (the W nearest frames) | solo:K (per "
                         "character of the frame, the K previous-round frames showing it alone "
                         "that look most like its consensus, each read inside the character's "
                         "box: needs a story with regions)")
    ap.add_argument("--out", help="output folder (default: story_iter_out/<title>-<backbone>)")
    ap.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                    help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--max-memory", type=float, metavar="GiB",
                    help="memory available to the run (default: measured free memory)")
    ap.add_argument("--no-step-progress", action="store_true", help="hide the per-step bar")
    presets.add_arguments(ap)
    story.add_arguments(ap)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet.install()  # before diffusers/transformers import: some notices fire at import
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_device(args.device)  # before a process group is set up on it
        # no --model/--story/--lora/--preset: the story world's trained model, when built
        args.world = world_default(args, sys.argv[1:] if argv is None else argv)
        args.preset_notes = presets.apply(args, parser, argv)  # --preset fills what is unset
        story.check_export_args(args)
    except UsageError as e:
        return report_usage_error(PROG, e)
    from .dist import init_dist  # torch.distributed: imported once the arguments are good
    from .run import run

    dist = init_dist(args.device)
    try:
        return run(args, dist)
    except UsageError as e:
        return report_usage_error(PROG, e)
    finally:
        dist.close()
