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

__all__ = ["PREFIX", "export_run"]


def export_run(run_dir, to: str, method: str, mode: str = "base", lang: Optional[str] = None,
               timestamp: Optional[str] = None) -> Path:
    """Export a finished story_iter run folder made from a ViStoryBench story: its last
    round's frames, named by the shots' indices.  Returns the story folder written."""
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
    lang = lang or man.get("vistorybench", {}).get("lang", "en")
    _, indices = read_story(story_dir, lang)
    cfg = man["config"]
    last = cfg["rounds"]
    n = cfg["frames"]
    frames = [frame_path(run_dir, last, i) for i in range(n)]
    return export_frames(frames, indices[:n], to[len(PREFIX):] if to.startswith(PREFIX) else to,
                         method, story_dir.name, lang, mode, timestamp)
