"""Labels as an append-only journal of events; the marks are their fold.

One JSON object per line in ``<set>/labels.jsonl``::

    {"id": "...", "t": 1700000000.0, "tab": "...", "scenario": "s1", "candidate": 2,
     "label": "winner"}                        # or "loser", or "none" (clear)
    {"id": "...", "t": ..., "tab": "...", "undo": "<id of an earlier event>"}

Every event is written and fsync'd before the request that sent it is answered, so a
killed server or a closed tab loses no acknowledged mark.  Two tabs append their own
events; neither overwrites the other's, and the state both see is the fold of all of
them (per candidate, the last mark that was not undone).  An event id seen before is
not written again (a tab may resend after a lost answer).  A line torn by a crash
mid-write is skipped when read, and the next write starts on a fresh line.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["Journal", "fold", "LABELS", "JOURNAL_NAME"]

LABELS = ("winner", "loser", "none")
JOURNAL_NAME = "labels.jsonl"


def fold(events: List[dict]) -> Dict[str, Dict[int, str]]:
    """{scenario: {candidate: "winner"|"loser"}} from events in journal order."""
    undone = {e["undo"] for e in events if "undo" in e}
    state: Dict[str, Dict[int, str]] = {}
    for e in events:
        if "undo" in e or e["id"] in undone:
            continue
        marks = state.setdefault(e["scenario"], {})
        if e["label"] == "none":
            marks.pop(int(e["candidate"]), None)
        else:
            marks[int(e["candidate"])] = e["label"]
    return {s: m for s, m in state.items() if m}


class Journal:
    _locks: Dict[str, threading.Lock] = {}
    _guard = threading.Lock()

    def __init__(self, path: Path):
        self.path = Path(path)
        with Journal._guard:
            self._lock = Journal._locks.setdefault(str(self.path), threading.Lock())

    def events(self) -> List[dict]:
        if not self.path.is_file():
            return []
        out = []
        with open(self.path, "r", encoding="utf-8") as f:
            for line in f:
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue  # torn by a crash mid-write
                if isinstance(e, dict) and "id" in e:
                    out.append(e)
        return out

    def append(self, event: dict) -> bool:
        """Write ``event`` durably; False when its id is already in the journal."""
        with self._lock:
            if any(e["id"] == event["id"] for e in self.events()):
                return False
            event = {**event, "t": time.time()}
            line = json.dumps(event, sort_keys=True) + "\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and not self._ends_with_newline(size):
                    line = "\n" + line
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            if size == 0:  # a new file: make its directory entry durable too
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            return True

    def _ends_with_newline(self, size: int) -> bool:
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            return f.read(1) == b"\n"

    def marks(self) -> Dict[str, Dict[int, str]]:
        return fold(self.events())

    def find(self, event_id: str) -> Optional[dict]:
        return next((e for e in self.events() if e["id"] == event_id), None)
