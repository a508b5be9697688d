"""The story stage of ``python -m pipelines.story_iter``: which story the run draws, read
once, and what the run records about where it came from.

``--story`` is a story JSON file (:mod:`pipelines.story`), ``vistorybench:ROOT/STORY_ID``
(read once through the ViStoryBench input adapter, :mod:`pipelines.vistorybench.layout`),
or absent (the built-in demo story).  ``--export vistorybench:DIR`` is checked here, before
anything is drawn, and carried out by :func:`pipelines.vistorybench.export.export_run`.

Kept free of torch/diffusers imports: the parser imports it.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from ..cli_common import UsageError
from ..story import Story, demo_story, load_story
from ..vistorybench.export import PREFIX
from ..vistorybench.layout import read_story

__all__ = ["add_arguments", "load", "check_export_args", "manifest_entry", "export_row"]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group(
        "ViStoryBench",
        "--story vistorybench:ROOT/STORY_ID reads a story folder of the ViStoryBench dataset "
        "(ROOT is the folder holding 01/, 02/, ...); --export vistorybench:DIR writes the last "
        "round's frames where ViStoryBench's evaluator reads them")
    g.add_argument("--lang", choices=["en", "ch"], default="en",
                   help="language of a ViStoryBench story (default en)")
    g.add_argument("--export", metavar="vistorybench:DIR",
                   help="after the run, write the final round to DIR/METHOD/MODE/LANG/"
                        "YYYYMMDD-HHMMSS/STORY_ID/NN.png (NN = the shot's index)")
    g.add_argument("--method", help="method folder name for --export (e.g. story_iter_sdxl)")
    g.add_argument("--vistorybench-mode", default="base", metavar="MODE",
                   help="mode folder name for --export (default base; the evaluator is told "
                        "the mode on its command line)")
    g.add_argument("--timestamp", metavar="YYYYMMDD-HHMMSS",
                   help="run folder for --export (default: the time of the export); give "
                        "every story of one method's run the same one: the evaluator treats "
                        "a timestamp folder as one run")
    g.add_argument("--skip-bad-shots", action="store_true",
                   help="drop a shot that lacks one of the five fields, with a warning, as "
                        "ViStoryBench's loader does (default: refuse the story)")


def _split(spec: str):
    path = Path(spec[len(PREFIX):])
    if not spec[len(PREFIX):]:
        raise UsageError(f"--story {spec!r}: give vistorybench:ROOT/STORY_ID")
    return path


def load(args) -> Story:
    """The run's story from ``--story`` (the demo story without one), before ``--frames``."""
    spec = getattr(args, "story", None)
    if not spec:
        return demo_story()
    if not spec.startswith(PREFIX):
        return load_story(spec)
    d = _split(spec)
    if not d.name.isdigit():
        raise UsageError(f"--story {spec}: the last part must be a story id such as 01 "
                         "(a folder of the dataset root)")
    if not (d / "story.json").is_file():
        raise UsageError(f"--story {spec}: no story.json in {d} (the dataset root is the "
                         "folder holding 01/, 02/, ...)")
    story, _ = read_story(d, getattr(args, "lang", "en"),
                          bool(getattr(args, "skip_bad_shots", False)))
    frames = getattr(args, "frames", None)
    if getattr(args, "export", None) and frames and frames < len(story.frames):
        raise UsageError(f"--frames {frames} with --export: ViStoryBench's evaluator needs all "
                         f"{len(story.frames)} shots of story {d.name} (it stops on a story "
                         "with fewer pictures than shots); drop --frames or --export")
    return story


def check_export_args(args) -> None:
    """Refuse a bad ``--export`` before anything is drawn."""
    ts = getattr(args, "timestamp", None)
    if not getattr(args, "export", None):
        if ts:
            raise UsageError("--timestamp names the run folder of --export; add "
                             "--export vistorybench:DIR --method NAME")
        return
    if ts:
        from pipelines.vistorybench.layout import check_timestamp

        try:
            check_timestamp(ts)
        except ValueError as e:
            raise UsageError(f"--timestamp: {e}") from None
    if not args.export.startswith(PREFIX) or not args.export[len(PREFIX):]:
        raise UsageError(f"--export {args.export!r}: give vistorybench:DIR")
    if not args.method:
        raise UsageError("--export needs --method NAME (the method folder the evaluator reads)")
    if not (args.story or "").startswith(PREFIX):
        raise UsageError("--export vistorybench: needs a ViStoryBench story "
                         "(--story vistorybench:ROOT/STORY_ID)")
    for label, v in (("--method", args.method), ("--vistorybench-mode", args.vistorybench_mode)):
        if "/" in v or "\\" in v or v in (".", ".."):
            raise UsageError(f"{label} {v!r}: expected a plain folder name")


def manifest_entry(args) -> Optional[dict]:
    """What the manifest records about a ViStoryBench story (None for other stories)."""
    if not (getattr(args, "story", None) or "").startswith(PREFIX):
        return None
    return {"lang": args.lang, "story_id": _split(args.story).name,
            "export": args.export, "method": args.method, "mode": args.vistorybench_mode,
            "timestamp": getattr(args, "timestamp", None),
            "skip_bad_shots": bool(getattr(args, "skip_bad_shots", False))}


def export_row(plan) -> Optional[str]:
    """The plan's row: where the last round goes for the evaluator (None: no export)."""
    v = plan.get("vistorybench")
    if not v or not v.get("export"):
        return None
    return (f"ViStoryBench: {v['export'][len(PREFIX):]}/{v['method']}/{v['mode']}/{v['lang']}/"
            f"{v.get('timestamp') or '<timestamp>'}/{v['story_id']}/NN.png")
