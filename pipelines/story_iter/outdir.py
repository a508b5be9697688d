"""The output folder of a Story-Iter run: fresh or resumed, what is done, and cleaning up
after a start that failed before drawing anything."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, Optional

__all__ = ["ResumeRefused", "prepare_out", "frames_on_disk", "abandon"]


class ResumeRefused(SystemExit):
    pass


def prepare_out(out: Path, config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Check ``out`` for a resume; returns the existing manifest (or None for a fresh run).

    Refuses a folder made with a different config (naming every differing field), and a
    non-empty folder that is not a Story-Iter output."""
    from pipelines.run_folder import read_json

    man = out / "manifest.json"
    if man.is_file():
        old = read_json(man)
        prev = old.get("config", {})
        diffs = [f"{k}: {prev.get(k)!r} in the folder, {config.get(k)!r} now"
                 for k in sorted(set(prev) | set(config)) if prev.get(k) != config.get(k)]
        if diffs:
            raise ResumeRefused(
                f"refusing to resume into {out}: it was made with a different configuration:\n  "
                + "\n  ".join(diffs)
                + "\nRerun with the folder's settings to continue it, or pass a new --out.")
        # a process killed inside an atomic write leaves its temporary file behind
        for tmp in out.glob("round_*/.*.tmp"):
            tmp.unlink(missing_ok=True)
        return old
    if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise ResumeRefused(f"refusing to write into {out}: it is not empty and has no "
                            "manifest.json (not a story_iter output folder); pass a new --out")
    return None


def frames_on_disk(out: Path, rounds: int, n: int):
    from pipelines.run_folder import frame_path

    done, nxt = 0, None
    for r in range(rounds + 1):
        for i in range(n):
            if frame_path(out, r, i).is_file():
                done += 1
            elif nxt is None:
                nxt = (r, i)
    return done, nxt


def abandon(out: Path, created: bool) -> None:
    """A start that failed before drawing leaves no half-made folder behind."""
    if created and out.is_dir() and not any(out.glob("round_*/frame_*.png")):
        shutil.rmtree(out, ignore_errors=True)
