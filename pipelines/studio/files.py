"""Everything the studio reads from disk goes through :meth:`Root.resolve`.

``resolve`` takes a path relative to ROOT as a URL gives it and returns the real file,
or raises :class:`NotUnderRoot` (served as 404) without opening anything when the path
is absolute, has a ``..``/``.``/empty or hidden (``.name``) part, contains a NUL or a
backslash, leads through a symlink to outside ROOT, or is not an existing file.

Runs and candidate sets are found by walking ROOT (symlinked folders are not
followed); each gets an opaque id (a hash of its path) so a URL never carries a
path to a folder the walk did not find.  Thumbnails are made once per (file, mtime,
size) and kept under the cache folder (default ROOT/.studio/thumbs).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Dict, List, Tuple

__all__ = ["Root", "NotUnderRoot", "IMAGE_EXTS", "window"]

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp"}
RUN_MANIFEST = "manifest.json"
SET_MANIFEST = "candidates.json"
_RESCAN_S = 2.0


class NotUnderRoot(LookupError):
    """A path the studio refuses to read (answered with 404)."""


def _id(rel: str) -> str:
    return hashlib.sha1(rel.encode()).hexdigest()[:12]


def window(found: List[Tuple[str, str]], offset: int, limit: int, describe) -> dict:
    """One page of a listing: ``describe(id, prefix)`` -> dict, or None to leave an entry
    out (its manifest vanished or became unreadable since the walk)."""
    items = [d for d in (describe(i, p) for i, p in found[offset:offset + limit]) if d is not None]
    return {"total": len(found), "offset": offset, "items": items}


class Root:
    def __init__(self, root, cache_dir=None):
        self.root = Path(os.path.realpath(root))
        if not self.root.is_dir():
            raise NotADirectoryError(f"{root} is not a folder")
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / ".studio" / "thumbs"
        self._lock = threading.Lock()
        self._scan_t = -1e9
        self._runs: Dict[str, str] = {}
        self._sets: Dict[str, str] = {}

    # -- the one gate ---------------------------------------------------------------------
    def resolve(self, rel: str, *, want_dir: bool = False) -> Path:
        """The real path of ``rel`` (relative to ROOT) or NotUnderRoot; reads nothing."""
        if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
            raise NotUnderRoot(rel)
        pure = PurePosixPath(rel)
        if pure.is_absolute() or rel.startswith("/"):
            raise NotUnderRoot(rel)
        parts = rel.split("/")
        if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise NotUnderRoot(rel)
        real = os.path.realpath(self.root / pure)
        if os.path.commonpath([real, str(self.root)]) != str(self.root):
            raise NotUnderRoot(rel)  # a symlink on the way leads out of ROOT
        real = Path(real)
        if not (real.is_dir() if want_dir else real.is_file()):
            raise NotUnderRoot(rel)
        return real

    def rel(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def read_json(self, rel: str):
        with open(self.resolve(rel), "r", encoding="utf-8") as f:
            return json.load(f)

    # -- runs and candidate sets ----------------------------------------------------------
    def _scan(self, force: bool = False) -> None:
        with self._lock:
            if not force and time.monotonic() - self._scan_t < _RESCAN_S:
                return
            runs, sets = {}, {}
            for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                rel = Path(dirpath).relative_to(self.root).as_posix()
                prefix = "" if rel == "." else rel + "/"
                if SET_MANIFEST in filenames:
                    sets[_id(prefix or ".")] = prefix
                    dirnames[:] = []      # a set's scenario folders hold only images
                elif RUN_MANIFEST in filenames and self._is_run(prefix + RUN_MANIFEST):
                    runs[_id(prefix or ".")] = prefix
                    dirnames[:] = []      # round_XX folders: nothing more to find
            self._runs, self._sets, self._scan_t = runs, sets, time.monotonic()

    def _is_run(self, rel: str) -> bool:
        try:
            m = self.read_json(rel)
        except (NotUnderRoot, OSError, ValueError):
            return False
        return isinstance(m, dict) and str(m.get("format", "")).startswith("storyattn.story_iter")

    def _list(self, table: str) -> List[Tuple[str, str]]:
        self._scan()
        return sorted(getattr(self, table).items(), key=lambda kv: kv[1])

    def runs(self) -> List[Tuple[str, str]]:
        """[(id, folder relative to ROOT with a trailing '/', or '' for ROOT itself)]"""
        return self._list("_runs")

    def sets(self) -> List[Tuple[str, str]]:
        return self._list("_sets")

    def _lookup(self, table: str, key: str) -> str:
        self._scan()
        if key not in getattr(self, table):
            self._scan(force=True)   # made since the last walk?
        try:
            return getattr(self, table)[key]
        except KeyError:
            raise NotUnderRoot(key) from None

    def run_dir(self, run_id: str) -> str:
        return self._lookup("_runs", run_id)

    def set_dir(self, set_id: str) -> str:
        return self._lookup("_sets", set_id)

    # -- thumbnails -----------------------------------------------------------------------
    def thumbnail(self, rel: str, size: int) -> Path:
        """A JPEG at most ``size`` px on its longer side, made once and cached."""
        from PIL import Image

        from pipelines.run_folder import atomic_write_bytes

        src = self.resolve(rel)
        if src.suffix.lower() not in IMAGE_EXTS:
            raise NotUnderRoot(rel)
        st = src.stat()
        key = hashlib.sha1(f"{self.rel(src)}|{st.st_mtime_ns}|{st.st_size}|{size}".encode()).hexdigest()
        dst = self.cache_dir / key[:2] / f"{key}.jpg"
        if not dst.is_file():
            with Image.open(src) as im:
                im = im.convert("RGB")
                im.thumbnail((size, size), Image.BICUBIC)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=85)
            atomic_write_bytes(dst, buf.getvalue())
        return dst
