"""The candidate-set format: what ``python -m pipelines.candidates`` writes and the studio and
the story world's build read (docs/candidates.md).

A set is a folder: ``candidates.json`` (format, config, and per scenario its prompt,
characters, references and candidates with their seeds) next to the images.  Readers go
through this module, never through the program that writes sets.
"""
from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Any, Dict, Sequence

__all__ = ["FORMAT", "MANIFEST", "candidate_seed", "new_manifest", "read_manifest"]

FORMAT = "storyattn.candidates/1"
MANIFEST = "candidates.json"


def candidate_seed(base: int, scenario_id: str, k: int) -> int:
    """Seed of candidate ``k`` of a scenario: a pure function of (base, id, k)."""
    import numpy as np

    rng = np.random.default_rng([int(base), zlib.crc32(scenario_id.encode()), int(k)])
    return int(rng.integers(0, 2**31 - 1))


def new_manifest(cfg: dict, scenarios: Sequence) -> dict:
    """The manifest of a new set; each scenario has ``id``, ``references`` and ``as_dict()``
    (a :class:`pipelines.candidates.Scenario`), and every candidate gets its own seed."""
    entries = []
    for s in scenarios:
        entries.append({
            **s.as_dict(),
            "references": [f"{s.id}/ref_{j:02d}.png" for j in range(len(s.references))],
            "candidates": [{"file": f"{s.id}/cand_{k:02d}.png",
                            "seed": candidate_seed(cfg["seed"], s.id, k)}
                           for k in range(cfg["candidates"])],
        })
    return {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": cfg,
            "scenarios": entries, "status": "running"}


def read_manifest(set_dir) -> Dict[str, Any]:
    """The manifest of the set in ``set_dir`` (``OSError`` / ``ValueError`` when unreadable)."""
    return json.loads((Path(set_dir) / MANIFEST).read_text())
