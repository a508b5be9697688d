"""Command line of the story world.

    python -m pipelines.world build [--out DIR] [--weights DIR] [--seed S] [--device D]
                                    [--quick] [--only STAGE ...]
    python -m pipelines.world story --out DIR [--seed S] [--frames N] [--no-refs]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import weights as W


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipelines.world",
                                 description="The story world: build its models, write stories.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the world's models stage by stage (resumable)")
    b.add_argument("--out", default="outputs/world_build",
                   help="working folder: every stage's result; rerun to resume")
    b.add_argument("--weights", default=str(W.WEIGHTS_DIR),
                   help="where the export stage writes the weights (default: the package's)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    b.add_argument("--quick", action="store_true",
                   help="a few steps per stage: checks the whole chain, trains nothing useful")
    b.add_argument("--only", nargs="+", default=None, help="run only these stages")
    s = sub.add_parser("story", help="write a world story file (story.json, refs/, world.json)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--frames", type=int, default=100)
    s.add_argument("--no-refs", action="store_true",
                   help="characters without reference images (identity from nowhere)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "build":
        from .build import STAGES, run_build

        names = [s.name for s in STAGES]
        bad = [n for n in args.only or [] if n not in names]
        if bad:
            print(f"error: unknown stage(s) {bad}; stages: {', '.join(names)}", file=sys.stderr)
            return 2
        state = run_build(args.out, args.weights, seed=args.seed, device=args.device,
                          mode="quick" if args.quick else "full", only=args.only)
        total = sum(v.get("stage_time_s", 0) for v in state["stages"].values())
        print(f"[world] build done: {len(state['stages'])} stages, {total:.0f} s in all")
        return 0
    from .data import make_story, strip_references

    if args.frames < 1:
        print(f"error: --frames must be >= 1, got {args.frames}", file=sys.stderr)
        return 2
    path = make_story(args.out, seed=args.seed, frames=args.frames)
    if args.no_refs:
        path = strip_references(path)
    print(f"wrote {path}")
    return 0
