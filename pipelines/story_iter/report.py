"""Outputs of a Story-Iter run: atomic files, manifest, HTML contact sheet, memory peaks.

Layout of an output folder::

    out/manifest.json            config, versions, seeds, per-round stats, status
    out/index.html               contact sheet: one row per round, one column per frame
    out/round_00/frame_000.png   every frame of every round, written atomically
    out/round_00/_stats_rank0.json   per-process stats of that round (merged into the manifest)
"""
from __future__ import annotations

import html
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = [
    "atomic_write_bytes", "atomic_write_json", "save_png_atomic", "frame_path", "round_dir",
    "PeakMemory", "versions", "write_index_html", "read_json", "world_metrics_html",
]


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


def world_metrics_html(out: Path, manifest: Dict[str, Any]) -> str:
    """Consistency metrics per finished round (a table), when the run's story is a story-world
    story (prompts in the world's grammar, file on disk); else the empty string."""
    try:
        from pipelines.world.metrics import round_metrics
    except ImportError:
        return ""
    scores = round_metrics(out, manifest)
    if not scores:
        return ""

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    rows = "".join(
        f"<tr><th>round {r}</th><td>{f(s['identity_cross'])}</td>"
        f"<td>{f(s['identity_cross_all'])}</td><td>{f(s['identity_self'])}</td>"
        f"<td>{f(s['prompt_adherence'])}</td><td>{f(s['copy_paste'])}</td></tr>"
        for r, s in sorted(scores.items()))
    return ("<h2>Consistency (story-world reader)</h2><table><tr><th></th><th>identity-cross</th>"
            "<th>all 4 attributes</th><th>identity-self</th><th>prompt adherence</th>"
            f"<th>copy-paste</th></tr>{rows}</table>"
            "<p><small>identity-cross: attributes equal to the character's reference (chance "
            "0.26); identity-self: agreement of a character with itself across frames; "
            "adherence: scene, count, slot and size as prompted.</small></p>")


def write_index_html(out: Path, manifest: Dict[str, Any]) -> None:
    """Contact sheet: one row per round, one column per frame; missing frames are blank."""
    out = Path(out)
    cfg = manifest["config"]
    n_frames = cfg["frames"]
    n_rounds = cfg["rounds"] + 1
    prompts: List[str] = manifest.get("prompts", [""] * n_frames)
    rounds = {int(k): v for k, v in manifest.get("rounds", {}).items()}
    thumb = 96
    rows = []
    head = "".join(f'<th title="{html.escape(prompts[i])}">{i}</th>' for i in range(n_frames))
    rows.append(f"<tr><th>round</th>{head}</tr>")
    for r in range(n_rounds):
        st = rounds.get(r, {})
        label = f"round {r}"
        if st.get("scale") is not None:
            label += f"<br><small>scale {st['scale']:.3f}</small>"
        if "wall_s" in st:
            label += f"<br><small>{st['wall_s']:.1f} s</small>"
        cells = []
        for i in range(n_frames):
            rel = f"round_{r:02d}/frame_{i:03d}.png"
            if (out / rel).is_file():
                cells.append(f'<td><a href="{rel}"><img src="{rel}" width="{thumb}" '
                             f'height="{thumb}" loading="lazy" title="{html.escape(prompts[i])}">'
                             "</a></td>")
            else:
                cells.append("<td class=missing></td>")
        rows.append(f"<tr><th>{label}</th>{''.join(cells)}</tr>")
    title = html.escape(manifest.get("story", {}).get("title", "Story-Iter"))
    status = html.escape(str(manifest.get("status", "")))
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: 2px; border: 1px solid #ddd; text-align: center; font-size: 11px; }}
th:first-child {{ position: sticky; left: 0; background: #fff; min-width: 6em; }}
td.missing {{ background: #f4f4f4; width: {thumb}px; height: {thumb}px; }}
img {{ display: block; image-rendering: auto; }}
</style></head><body>
<h1>{title}</h1>
<p>{n_frames} frames x {n_rounds} rounds ({html.escape(cfg['backbone'])}, {cfg['steps']} steps,
guidance {cfg['guidance']}, seed {cfg['seed']}). Status: {status}.
Hover a thumbnail for its prompt; <a href="manifest.json">manifest.json</a>.</p>
{world_metrics_html(out, manifest)}
<div style="overflow-x: auto"><table>
{chr(10).join(rows)}
</table></div>
<p><small>written {time.strftime('%Y-%m-%d %H:%M:%S')}</small></p>
</body></html>
"""
    atomic_write_bytes(out / "index.html", doc.encode())
