"""Command line of the story world itself (its build is ``python -m pipelines.world_build``).

    python -m pipelines.world story --out DIR [--seed S] [--frames N] [--no-refs]
    python -m pipelines.world scenarios OUT [--n N] [--seed S] [--duo-share F] [--layout]
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipelines.world",
                                 description="The story world: write stories and scenarios "
                                             "(build its models: python -m pipelines.world_build).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("story", help="write a world story file (story.json, refs/, world.json)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--frames", type=int, default=100)
    s.add_argument("--no-refs", action="store_true",
                   help="characters without reference images (identity from nowhere)")
    c = sub.add_parser("scenarios", help="scenarios (training identities) for "
                                         "python -m pipelines.candidates, with their truth")
    c.add_argument("out", help="folder: scenarios.json, refs/, truth.json")
    c.add_argument("--n", type=int, default=24, help="number of scenarios")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--split-seed", type=int, default=0,
                   help="seed of the train/held-out identity split (the build's --seed)")
    c.add_argument("--duo-share", type=float, default=0.0,
                   help="share of scenarios with two characters (default 0: one each)")
    c.add_argument("--layout", action="store_true",
                   help="give each reference the box of its character (scenario 'regions')")
    return ap


# the build moved to its own program (it trains, labels and runs other programs; the world
# below it imports none of them): say where instead of argparse's "invalid choice"
_MOVED = {"build": "python -m pipelines.world_build build",
          "label": "python -m pipelines.world_build label"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _MOVED:
        print(f"error: `python -m pipelines.world {argv[0]}` is now `{_MOVED[argv[0]]}`",
              file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    if args.cmd == "scenarios":
        from .scenarios import make_scenarios

        if args.n < 1:
            print(f"error: --n must be >= 1, got {args.n}", file=sys.stderr)
            return 2
        if not 0.0 <= args.duo_share <= 1.0:
            print(f"error: --duo-share must be in [0, 1], got {args.duo_share}", file=sys.stderr)
            return 2
        print(f"wrote {make_scenarios(args.out, n=args.n, seed=args.seed, split_seed=args.split_seed, duo_share=args.duo_share, layout=args.layout)}")
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
