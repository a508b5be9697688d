"""One run per output folder: ``OUT/.lock`` holds the pid and host of the run that owns it.

The lock file is written whole to a temporary name and hard-linked into place (``link``
fails when the name exists), so a reader never sees a half-written lock.  A lock whose
process is gone (same host, pid not running: the run was killed) is taken over, with a
message; a live holder makes the new run stop with the holder's pid.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional

__all__ = ["LockHeld", "OutputLock", "LOCK_NAME"]

LOCK_NAME = ".lock"


class LockHeld(RuntimeError):
    """Another live run owns the folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class OutputLock:
    def __init__(self, out: Path, say: Callable[[str], None] = print):
        self.path = Path(out) / LOCK_NAME
        self.say = say
        self.held = False

    def _holder(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> "OutputLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(me) + "\n")
        try:
            for _attempt in range(2):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    pass
                h = self._holder()
                if h is None:   # vanished between link and read, or unreadable: retry once
                    if self.path.exists():
                        self.path.unlink(missing_ok=True)
                    continue
                if h.get("host") != me["host"] or _alive(int(h.get("pid", -1))):
                    where = "" if h.get("host") == me["host"] else f" on {h.get('host')}"
                    raise LockHeld(
                        f"--out {self.path.parent}: another run (pid {h.get('pid')}{where}, "
                        f"started {h.get('started')}) is writing this folder; wait for it, "
                        f"stop it, or pass another --out")
                self.say(f"taking over the lock of {self.path.parent}: its holder (pid "
                         f"{h.get('pid')}) is no longer running")
                self.path.unlink(missing_ok=True)
            raise LockHeld(f"--out {self.path.parent}: could not take the lock {self.path}")
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            h = self._holder()
            if h is not None and h.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
