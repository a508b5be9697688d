"""Command line of the story world's build.

    python -m pipelines.world_build build [--out DIR] [--weights DIR] [--seed S] [--device D]
                                          [--profile P | --quick] [--only STAGE ...]
                                          [--set KEY=N ...] [--from-weights DIR]
    python -m pipelines.world_build label --url URL SET [--truth FILE] [--no-export]

``build`` runs the stages of :mod:`.build` (training, candidates, labelling, export);
``label`` labels one candidate set through a running studio (:mod:`.label`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..world import weights as W
from .build import SETTINGS, STAGES, run_build


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipelines.world_build",
                                 description="Build the story world's models, label its sets.")
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
    prof = b.add_mutually_exclusive_group()
    prof.add_argument("--profile", default="auto", choices=["auto", *SETTINGS],
                      help="step settings: full = sized for a GPU, cpu = the committed weights' "
                           "(52 min on 2 CPU cores), auto (default) = full on a GPU, "
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
                        "instead of training them; with --only dpo_data dpo export: stage 2 alone; "
                        "with --only naming gsa_data or gsa: only vae and base (stage 1 retrained)")
    lab = sub.add_parser("label", help="label a candidate set with the reader, through a running "
                                       "studio's HTTP API, then export pairs.jsonl")
    lab.add_argument("set", help="the set's id or its folder relative to the studio's ROOT")
    lab.add_argument("--url", default="http://127.0.0.1:8765", help="the studio")
    lab.add_argument("--truth", help="truth.json of the scenarios: checks the references' reading")
    lab.add_argument("--no-export", action="store_true", help="post the marks only")
    return ap


def _label(args) -> int:
    import json

    from ..world.scenarios import load_truth
    from .label import LabelError, label_set

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
