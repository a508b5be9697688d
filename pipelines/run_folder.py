"""A run folder, as every program writes and reads it: paths, atomic writes, manifest
I/O, peak memory and the versions a run records.

Layout of a Story-Iter output folder::

    out/manifest.json            config, versions, seeds, per-round stats, status
    out/index.html               contact sheet (pipelines/contact_sheet.py)
    out/round_00/frame_000.png   every frame of every round, written atomically
    out/round_00/_stats_rank0.json   per-process stats of that round (merged into the manifest)

Candidate sets, studio exports, the story world's build and the benchmarks write through the
same atomic functions, so a reader (or a resumed run) never sees half a file.  This module
sits at the bottom of ``pipelines/`` and imports no other part of it.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, Optional

__all__ = [
    "atomic_write_bytes", "atomic_write_json", "save_png_atomic", "frame_path", "round_dir",
    "PeakMemory", "versions", "read_json", "MANIFEST",
]

# the manifest of a run folder (config, versions, seeds, per-round stats, status)
MANIFEST = "manifest.json"


def round_dir(out: Path, r: int) -> Path:
    return Path(out) / f"round_{r:02d}"


def frame_path(out: Path, r: int, i: int) -> Path:
    return round_dir(out, r) / f"frame_{i:03d}.png"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename: readers (and a resumed
    run) see either the old file or the complete new one, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_png_atomic(image, path: Path) -> None:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import psutil

        return psutil.Process().memory_info().rss


class PeakMemory:
    """Peak memory over a ``with`` block.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (exact, tensors only).
    CPU: the process RSS sampled every ``interval`` seconds by a thread (includes
    everything the process holds; a short spike between samples can be missed).
    ``peak_bytes`` is the peak; ``kind`` says which of the two it is.
    """

    def __init__(self, device: str = "cpu", interval: float = 0.005):
        self.device = str(device)
        self.interval = interval
        self.peak_bytes = 0
        self.kind = "cuda_max_allocated" if self.device.startswith("cuda") else "cpu_rss_sampled"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _poll(self):
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.kind == "cuda_max_allocated":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = _rss_bytes()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.kind == "cuda_max_allocated":
            import torch

            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())
        return False


def versions() -> Dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for mod in ("torch", "diffusers", "transformers", "accelerate", "peft", "storyattn"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except ImportError:
            out[mod] = "not installed"
    try:
        import torch

        out["cuda"] = str(torch.version.cuda) if torch.cuda.is_available() else "none"
    except ImportError:
        pass
    return out
