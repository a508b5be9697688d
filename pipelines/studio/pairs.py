"""Export a labelled candidate set as ``pairs.jsonl`` in the trainer's scenario-pool form.

One line per scenario that has at least one winner and one loser::

    {"scenario": "s1", "prompt": "...", "references": ["s1/ref_00.png"],
     "winners": ["s1/cand_02.png"], "losers": ["s1/cand_00.png", "s1/cand_03.png"]}

Paths are relative to the file (it is written into the set's folder), which is how
``pipelines.train.data.load_preference_pairs`` reads them: every winner is paired with
every loser of its scenario.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

from pipelines.studio.journal import JOURNAL_NAME, Journal

__all__ = ["export_pairs", "copy_pairs", "ExportError", "PAIRS_NAME"]

PAIRS_NAME = "pairs.jsonl"


class ExportError(ValueError):
    pass


def export_pairs(set_dir, out=None) -> Dict:
    """Write the pool file; return {"path", "scenarios", "pairs", "skipped"}."""
    from pipelines.candidates.cli import MANIFEST
    from pipelines.story_iter.report import atomic_write_bytes

    set_dir = Path(set_dir)
    if not (set_dir / MANIFEST).is_file():
        raise ExportError(f"{set_dir} holds no {MANIFEST}; pass a folder written by "
                          "python -m pipelines.candidates")
    manifest = json.loads((set_dir / MANIFEST).read_text())
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
                      "winners": [rel(w) for w in winners], "losers": [rel(l) for l in losers]})
    if not lines:
        raise ExportError(f"no scenario in {set_dir} has both a winner and a loser yet; label "
                          "some first")
    atomic_write_bytes(out, "".join(json.dumps(l) + "\n" for l in lines).encode())
    return {"path": str(out), "scenarios": len(lines), "pairs": n_pairs, "skipped": skipped}


def copy_pairs(pairs_file, dst) -> Dict:
    """Copy ``pairs_file`` and every image it names into folder ``dst``, paths kept as written
    (relative ones only: the copy must stand alone).  Return {"files", "bytes"}."""
    import shutil

    pairs_file = Path(pairs_file)
    src, dst = pairs_file.parent.resolve(), Path(dst)
    names = set()
    for line in pairs_file.read_text().splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        for key in ("references", "winners", "losers"):
            names.update(obj.get(key, []))
        names.update(obj[k] for k in ("winner", "loser") if k in obj)
    dst.mkdir(parents=True, exist_ok=True)
    total = 0
    for rel in sorted(names):
        p = (src / rel).resolve()
        if Path(rel).is_absolute() or not p.is_relative_to(src):
            raise ExportError(f"{pairs_file}: {rel!r} is not under the file's folder; only a "
                              "pool with relative paths inside it can be copied")
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst / rel)
        total += p.stat().st_size
    shutil.copyfile(pairs_file, dst / PAIRS_NAME)
    return {"files": len(names) + 1, "bytes": total + pairs_file.stat().st_size}
