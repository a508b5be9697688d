"""Draw K candidates per scenario with the stage-1 FLUX model.

::

    python -m pipelines.candidates --scenarios FILE [--out DIR] [-k K] [--model PATH]
        [--lora FILE ...] [--steps S] [--height H --width W] [--guidance G] [--seed S]
        [--batch-size B] [--device D] [--dtype T]

Per scenario its reference images are recorded once into a fresh
``storyattn.ReferenceKVCache`` (one transformer forward at timestep 0, Group-Shared
Attention's record mode) and the K candidates are drawn reading that cache (replay mode):
the same path Story-Iter's FLUX backbone takes for a round.  Candidate ``k`` of scenario
``s`` uses its own seed (recorded in ``candidates.json``), so a candidate does not depend
on the batch it was drawn in.

Output (the folder the studio labels)::

    OUT/candidates.json          format, config, and per scenario: prompt, characters,
                                 references and candidates (file + seed)
    OUT/<id>/ref_00.png ...      the references, copied so the set is self-contained
    OUT/<id>/cand_00.png ...     each written atomically as soon as it is drawn

Rerunning the same command resumes with the first missing candidate.  With no
``--model`` the story world's FLUX model (``pipelines/world/weights``) draws, with its
committed stage-1 LoRA unless ``--lora`` names others, at the world's 64x64 and 20 steps;
``--model tiny`` builds the tiny FLUX preset offline (random weights: a plumbing demo).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..candidate_sets import FORMAT, MANIFEST, candidate_seed
from ..cli_common import UsageError
from .scenarios import ScenarioError

__all__ = ["main", "build_parser", "candidate_seed", "FORMAT", "MANIFEST"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pipelines.candidates",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="K candidates per scenario, drawn with the stage-1 FLUX model attending to "
                    "the scenario's reference images (Group-Shared Attention from a reference "
                    "KV cache). Output: a candidate set for `python -m pipelines.studio`.",
        epilog="""examples:
  python -m pipelines.candidates --scenarios scenarios.json --out sets/a -k 8
  python -m pipelines.candidates --scenarios s.json --model /models/flux1-dev \\
      --lora outputs/train_gsa/pytorch_lora_weights.safetensors --out sets/b
Rerun the same command to resume. Format of the scenarios file: docs/candidates.md.""")
    ap.add_argument("--scenarios", required=True, help="scenarios JSON (docs/candidates.md)")
    ap.add_argument("--out", default="outputs/candidates", help="output folder (a candidate set)")
    ap.add_argument("-k", "--candidates", type=int, default=4, help="candidates per scenario")
    ap.add_argument("--model", help="local FLUX pipeline folder, or 'tiny' for the tiny offline "
                                    "preset (default: the story world's model)")
    ap.add_argument("--lora", nargs="*", default=None,
                    help="LoRA .safetensors file(s), e.g. stage 1 (default with no --model: the "
                         "world's committed stage-1 LoRA; else none)")
    ap.add_argument("--steps", type=int, help="denoising steps (default 28; world 20; tiny 4)")
    ap.add_argument("--height", type=int, help="default 1024; world and tiny 64")
    ap.add_argument("--width", type=int, help="default 1024; world and tiny 64")
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--seed", type=int, default=0, help="base seed; per-candidate seeds derive from it")
    ap.add_argument("--batch-size", type=int, default=4, help="candidates drawn per forward")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--no-step-progress", action="store_true", help="hide the per-step bar")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .run import run  # torch and diffusers: imported once the arguments parse

        return run(args)
    except (UsageError, ScenarioError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
