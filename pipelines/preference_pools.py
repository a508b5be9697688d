"""Preference pools: ``pairs.jsonl`` and the images it names, the form the DPO trainer reads
(``pipelines.train.data.load_preference_pairs``) and the studio exports.

One line per scenario with at least one winner and one loser; paths relative to the file.
:func:`copy_pairs` makes a pool stand alone somewhere else (the story world's build ships
its pools with the weights).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict

__all__ = ["PAIRS_NAME", "ExportError", "copy_pairs"]

PAIRS_NAME = "pairs.jsonl"


class ExportError(ValueError):
    """A set or pool that cannot be exported or copied as asked (the message says why)."""


def copy_pairs(pairs_file, dst) -> Dict:
    """Copy ``pairs_file`` and every image it names into folder ``dst``, paths kept as written
    (relative ones only: the copy must stand alone).  Return {"files", "bytes"}."""
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
