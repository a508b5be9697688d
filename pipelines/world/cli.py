"""Command line of the story world.

    python -m pipelines.world build [--out DIR] [--weights DIR] [--seed S] [--device D]
                                    [--profile P | --quick] [--only STAGE ...] [--set KEY=N ...]
                                    [--from-weights DIR]
    python -m pipelines.world story --out DIR [--seed S] [--frames N] [--no-refs]
    python -m pipelines.world scenarios OUT [--n N] [--seed S]
    python -m pipelines.world label --url URL SET [--truth FILE] [--no-export]
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
    b.add_argument("--weights", default=None,
                   help="where the export stage writes the weights (default: OUT/weights; "
                        f"{W.WEIGHTS_DIR.relative_to(W.WEIGHTS_DIR.parents[2])} replaces the "
                        "committed ones)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    from .build import SETTINGS

    prof = b.add_mutually_exclusive_group()
    prof.add_argument("--profile", default="auto", choices=["auto", *SETTINGS],
                      help="step settings: full = the committed weights' (sized for a GPU), cpu = "
                           "cut to about 42 min on 2 CPU cores, auto (default) = full on a GPU, "
                           "cpu without one (docs/world.md)")
    prof.add_argument("--quick", action="store_const", dest="profile", const="quick",
                      help="= --profile quick: a few steps per stage: checks the whole chain, "
                           "trains nothing useful "
                           "(stage 2's reader needs a stage 1 that draws: add --from-weights "
                           "pipelines/world/weights --only dpo_data dpo export, ~1 min on CPU)")
    b.add_argument("--only", nargs="+", default=None, help="run only these stages")
    b.add_argument("--set", action="append", default=[], metavar="KEY=N",
                   help="change one step setting of the profile (e.g. dpo_steps=200); repeatable; "
                        "written to build.json with the others")
    b.add_argument("--from-weights", default=None, metavar="DIR",
                   help="take vae, base and stage 1 from a weights folder (e.g. the package's) "
                        "instead of training them; with --only dpo_data dpo export: stage 2 alone")
    s = sub.add_parser("story", help="write a world story file (story.json, refs/, world.json)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--frames", type=int, default=100)
    s.add_argument("--no-refs", action="store_true",
                   help="characters without reference images (identity from nowhere)")
    c = sub.add_parser("scenarios", help="one-character scenarios (training identities) for "
                                         "python -m pipelines.candidates, with their truth")
    c.add_argument("out", help="folder: scenarios.json, refs/, truth.json")
    c.add_argument("--n", type=int, default=24, help="number of scenarios")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--split-seed", type=int, default=0,
                   help="seed of the train/held-out identity split (the build's --seed)")
    lab = sub.add_parser("label", help="label a candidate set with the reader, through a running "
                                       "studio's HTTP API, then export pairs.jsonl")
    lab.add_argument("set", help="the set's id or its folder relative to the studio's ROOT")
    lab.add_argument("--url", default="http://127.0.0.1:8765", help="the studio")
    lab.add_argument("--truth", help="truth.json of the scenarios: checks the references' reading")
    lab.add_argument("--no-export", action="store_true", help="post the marks only")
    return ap


def _label(args) -> int:
    import json

    from .label import LabelError, label_set
    from .scenarios import load_truth

    try:
        truth = load_truth(args.truth) if args.truth else None
        res = label_set(args.url, args.set, truth=truth, export=not args.no_export)
    except (LabelError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res.pop("labels")
    print(json.dumps(res))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "label":
        return _label(args)
    if args.cmd == "scenarios":
        from .scenarios import make_scenarios

        if args.n < 1:
            print(f"error: --n must be >= 1, got {args.n}", file=sys.stderr)
            return 2
        print(f"wrote {make_scenarios(args.out, n=args.n, seed=args.seed, split_seed=args.split_seed)}")
        return 0
    if args.cmd == "build":
        from .build import STAGES, run_build

        names = [s.name for s in STAGES]
        bad = [n for n in args.only or [] if n not in names]
        if bad:
            print(f"error: unknown stage(s) {bad}; stages: {', '.join(names)}", file=sys.stderr)
            return 2
        overrides = {}
        for kv in args.set:
            key, _, val = kv.partition("=")
            if not val.lstrip("-").isdigit():
                print(f"error: --set {kv}: expected KEY=INTEGER, e.g. dpo_steps=200",
                      file=sys.stderr)
                return 2
            overrides[key] = int(val)
        weights = args.weights or str(Path(args.out) / "weights")
        state = run_build(args.out, weights, seed=args.seed, device=args.device,
                          mode=args.profile, only=args.only,
                          from_weights=args.from_weights, overrides=overrides)
        total = sum(v.get("stage_time_s", 0) for v in state["stages"].values())
        print(f"[world] build done: {len(state['stages'])} stages, {total:.0f} s in all; "
              f"weights in {weights}")
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
