"""Export a labelled candidate set as ``pairs.jsonl`` in the trainer's scenario-pool form.

One line per scenario that has at least one winner and one loser::

    {"scenario": "s1", "prompt": "...", "references": ["s1/ref_00.png"],
     "winners": ["s1/cand_02.png"], "losers": ["s1/cand_00.png", "s1/cand_03.png"]}

Paths are relative to the file (it is written into the set's folder), which is how
``pipelines.train.data.load_preference_pairs`` reads them: every winner is paired with
every loser of its scenario.  A scenario drawn with ``regions`` (one box or null per
reference) passes them on, so stage dpo reads each reference where the candidates did.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

from pipelines.candidate_sets import MANIFEST, read_manifest
from pipelines.preference_pools import PAIRS_NAME, ExportError
from pipelines.run_folder import atomic_write_bytes
from pipelines.studio.journal import JOURNAL_NAME, Journal

__all__ = ["export_pairs", "ExportError", "PAIRS_NAME"]


def export_pairs(set_dir, out=None) -> Dict:
    """Write the pool file; return {"path", "scenarios", "pairs", "skipped"}."""
    set_dir = Path(set_dir)
    if not (set_dir / MANIFEST).is_file():
        raise ExportError(f"{set_dir} holds no {MANIFEST}; pass a folder written by "
                          "python -m pipelines.candidates")
    manifest = read_manifest(set_dir)
    marks = Journal(set_dir / JOURNAL_NAME).marks()
    out = Path(out) if out else set_dir / PAIRS_NAME
    base = out.resolve().parent

    def rel(p: str) -> str:
        return Path((set_dir / p).resolve()).relative_to(base).as_posix() \
            if (set_dir / p).resolve().is_relative_to(base) else str((set_dir / p).resolve())

    lines, skipped, n_pairs = [], [], 0
    for s in manifest["scenarios"]:
        m = marks.get(s["id"], {})
        files = [c["file"] for c in s["candidates"]]
        winners = [files[k] for k in sorted(m) if m[k] == "winner" and k < len(files)]
        losers = [files[k] for k in sorted(m) if m[k] == "loser" and k < len(files)]
        if not winners or not losers:
            skipped.append(s["id"])
            continue
        n_pairs += len(winners) * len(losers)
        lines.append({"scenario": s["id"], "prompt": s["prompt"],
                      "references": [rel(r) for r in s["references"]],
                      "winners": [rel(w) for w in winners], "losers": [rel(l) for l in losers],
                      # where each reference was read while drawing: the trainer reads it there
                      **({"regions": s["regions"]} if s.get("regions") else {})})
    if not lines:
        raise ExportError(f"no scenario in {set_dir} has both a winner and a loser yet; label "
                          "some first")
    atomic_write_bytes(out, "".join(json.dumps(l) + "\n" for l in lines).encode())
    return {"path": str(out), "scenarios": len(lines), "pairs": n_pairs, "skipped": skipped}
