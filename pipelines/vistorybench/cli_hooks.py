"""What ``python -m pipelines.story_iter`` needs from ViStoryBench: the options, reading
``--story vistorybench:ROOT/ID`` and exporting a finished run (``--export``).

Kept free of torch/diffusers imports: the story_iter parser imports it."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from ..cli_common import UsageError

PREFIX = "vistorybench:"

__all__ = ["PREFIX", "add_arguments", "load_story_arg", "export_run", "run_frames",
           "check_export_args", "manifest_entry", "export_row"]


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
    story, _ = read_story(d, lang, bool(getattr(args, "skip_bad_shots", False)))
    frames = getattr(args, "frames", None) if args is not None else None
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


def export_run(run_dir, to: str, method: str, mode: str = "base", lang: Optional[str] = None,
               timestamp: Optional[str] = None) -> Path:
    """Export a finished story_iter run folder made from a ViStoryBench story: its last
    round's frames, named by the shots' indices, under the run folder ``timestamp``
    (default now).  Returns the story folder written."""
    from pipelines.vistorybench.layout import export_frames

    frames, indices, story_dir, lang = run_frames(run_dir, lang)
    return export_frames(frames, indices, to[len(PREFIX):] if to.startswith(PREFIX) else to,
                         method, story_dir.name, lang, mode, timestamp)


def run_frames(run_dir, lang: Optional[str] = None):
    """A finished run's last-round frame paths, its shots' indices, its dataset story
    folder and language; UsageError (one line) when the run cannot be exported."""
    from pipelines.story_iter.report import frame_path, read_json
    from pipelines.vistorybench.layout import read_story

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
    v = man.get("vistorybench") or {}
    lang = lang or v.get("lang", "en")
    # the shots the run drew: with --skip-bad-shots the dropped ones have no picture, and
    # the evaluator's loader drops them too, so the rest pair up in order
    _, indices = read_story(story_dir, lang, bool(v.get("skip_bad_shots")), warn=lambda m: None)
    cfg = man["config"]
    last = cfg["rounds"]
    n = cfg["frames"]
    if n != len(indices):
        raise UsageError(f"{run_dir}: {n} frames but {story_dir} now has {len(indices)} shots "
                         f"({lang}); the story changed since the run")
    return [frame_path(run_dir, last, i) for i in range(n)], indices, story_dir, lang


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
