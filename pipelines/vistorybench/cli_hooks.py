"""What ``python -m pipelines.story_iter`` needs from ViStoryBench: the options, reading
``--story vistorybench:ROOT/ID`` and exporting a finished run (``--export``).

Kept free of torch/diffusers imports: the story_iter parser imports it."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from ..cli_common import UsageError

PREFIX = "vistorybench:"

__all__ = ["PREFIX", "add_arguments", "load_story_arg", "export_run", "check_export_args",
           "manifest_entry", "export_row"]


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


def _split(spec: str):
    path = Path(spec[len(PREFIX):])
    if not spec[len(PREFIX):]:
        raise UsageError(f"--story {spec!r}: give vistorybench:ROOT/STORY_ID")
    return path


def load_story_arg(spec: str, args=None):
    """``--story``: a story JSON file, or ``vistorybench:ROOT/STORY_ID``."""
    from pipelines.story import load_story

    if not spec.startswith(PREFIX):
        return load_story(spec)
    from pipelines.vistorybench.layout import read_story

    d = _split(spec)
    if not d.name.isdigit():
        raise UsageError(f"--story {spec}: the last part must be a story id such as 01 "
                         "(a folder of the dataset root)")
    if not (d / "story.json").is_file():
        raise UsageError(f"--story {spec}: no story.json in {d} (the dataset root is the "
                         "folder holding 01/, 02/, ...)")
    lang = getattr(args, "lang", "en") if args is not None else "en"
    story, _ = read_story(d, lang)
    return story


def check_export_args(args) -> None:
    """Refuse a bad ``--export`` before anything is drawn."""
    if not getattr(args, "export", None):
        return
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


def export_run(run_dir, to: str, method: str, mode: str = "base", lang: Optional[str] = None,
               timestamp: Optional[str] = None) -> Path:
    """Export a finished story_iter run folder made from a ViStoryBench story: its last
    round's frames, named by the shots' indices.  Returns the story folder written."""
    from pipelines.story_iter.report import frame_path, read_json
    from pipelines.vistorybench.layout import export_frames, read_story

    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").is_file():
        raise UsageError(f"{run_dir}: no manifest.json (not a story_iter output folder)")
    man = read_json(run_dir / "manifest.json")
    source = man.get("story", {}).get("source") or ""
    if not source.startswith(PREFIX):
        raise UsageError(f"{run_dir}: not made from a ViStoryBench story (source {source!r})")
    if man.get("status") != "complete":
        raise UsageError(f"{run_dir}: the run is {man.get('status')!r}; finish it (rerun the "
                         "same command) before exporting")
    story_dir = Path(source[len(PREFIX):])
    lang = lang or man.get("vistorybench", {}).get("lang", "en")
    _, indices = read_story(story_dir, lang)
    cfg = man["config"]
    last = cfg["rounds"]
    n = cfg["frames"]
    frames = [frame_path(run_dir, last, i) for i in range(n)]
    return export_frames(frames, indices[:n], to[len(PREFIX):] if to.startswith(PREFIX) else to,
                         method, story_dir.name, lang, mode, timestamp)


def manifest_entry(args) -> Optional[dict]:
    """What the manifest records about a ViStoryBench story (None for other stories)."""
    if not (getattr(args, "story", None) or "").startswith(PREFIX):
        return None
    return {"lang": args.lang, "story_id": _split(args.story).name,
            "export": args.export, "method": args.method, "mode": args.vistorybench_mode}


def export_row(plan) -> Optional[str]:
    """The plan's row: where the last round goes for the evaluator (None: no export)."""
    v = plan.get("vistorybench")
    if not v or not v.get("export"):
        return None
    return (f"ViStoryBench: {v['export'][len(PREFIX):]}/{v['method']}/{v['mode']}/{v['lang']}/"
            f"<timestamp>/{v['story_id']}/NN.png")
