"""ViStoryBench's story splits: ``full`` (every story of a dataset root) and ``lite``
(the 20 ids ViStoryBench's own code selects; carried as data in ``lite.json``, whose
``about`` says where the list was read)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

SPLITS = ("full", "lite")
_LITE = Path(__file__).with_name("lite.json")


def lite_ids() -> List[str]:
    return list(json.loads(_LITE.read_text(encoding="utf-8"))["ids"])


def split_ids(split: str, have: List[str]) -> List[str]:
    """The ids of ``split`` among a root's stories ``have`` (numeric order).  ``lite``
    needs all 20 of its stories: a missing one is a ValueError naming it, since a Lite
    score over fewer stories is not comparable with published Lite scores."""
    if split == "full":
        return list(have)
    if split != "lite":
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    want = lite_ids()
    missing = [s for s in want if s not in have]
    if missing:
        raise ValueError(f"--split lite needs stories {', '.join(missing)}, not in the dataset "
                         "root (give the folder holding all of ViStory's 01/ ... 80/)")
    return want
