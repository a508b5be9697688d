"""A finished Story-Iter run folder -> the layout ViStoryBench's evaluator reads.

Used by ``python -m pipelines.vistorybench export`` and by ``python -m pipelines.story_iter
--export``; reads the run folder through :mod:`pipelines.run_folder` (never through the
program that wrote it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..cli_common import UsageError
from ..run_folder import MANIFEST, frame_path, read_json
from .layout import export_frames, read_story

# ``--story vistorybench:ROOT/ID`` / ``--export vistorybench:DIR``: a ViStoryBench path
PREFIX = "vistorybench:"

__all__ = ["PREFIX", "export_run", "run_frames"]


def export_run(run_dir, to: str, method: str, mode: str = "base", lang: Optional[str] = None,
               timestamp: Optional[str] = None) -> Path:
    """Export a finished story_iter run folder made from a ViStoryBench story: its last
    round's frames, named by the shots' indices, under the run folder ``timestamp``
    (default now).  Returns the story folder written."""
    frames, indices, story_dir, lang = run_frames(run_dir, lang)
    return export_frames(frames, indices, to[len(PREFIX):] if to.startswith(PREFIX) else to,
                         method, story_dir.name, lang, mode, timestamp)


def run_frames(run_dir, lang: Optional[str] = None):
    """A finished run's last-round frame paths, its shots' indices, its dataset story
    folder and language; UsageError (one line) when the run cannot be exported."""
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).is_file():
        raise UsageError(f"{run_dir}: no manifest.json (not a story_iter output folder)")
    man = read_json(run_dir / MANIFEST)
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
