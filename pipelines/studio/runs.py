"""Story-Iter runs under ROOT: list, contact sheet (rounds x frames), frame viewer.

A run is a folder holding a ``manifest.json`` of format ``storyattn.story_iter/*``
(layout: pipelines/run_folder.py).  The contact sheet's API answers a window of
frames (``offset``/``limit``) so a 100-frame x 11-round run loads in pieces.

Consistency metrics per round come from ``pipelines.world.metrics.round_metrics(run_dir,
manifest)`` when that module imports: it returns ``{round: {name: value}}`` or None when
the run is not one it can read (then nothing is shown).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from fastapi import APIRouter, Query, Request

from pipelines.studio.files import RUN_MANIFEST, NotUnderRoot, window
from pipelines.studio.pages import page

router = APIRouter()

_FIGURES = ("scale", "wall_s", "frames_drawn", "encoder_images", "cache_bytes", "num_refs",
            "cache_scope", "peak_memory_bytes")


def _manifest(request: Request, run_id: str):
    root = request.app.state.root
    prefix = root.run_dir(run_id)
    return root, prefix, root.read_json(prefix + RUN_MANIFEST)


def round_metrics(run_dir, manifest) -> Optional[Dict[str, Any]]:
    """The world's per-round metrics for this run, or None (module absent or not applicable)."""
    try:
        from pipelines.world import metrics as world_metrics
    except ImportError:
        return None
    fn = getattr(world_metrics, "round_metrics", None)
    if fn is None:
        return None
    try:
        got = fn(run_dir, manifest)
    except Exception as exc:  # a metric bug must not take the contact sheet down
        return {"error": f"{type(exc).__name__}: {exc}"}
    return None if got is None else {str(k): v for k, v in dict(got).items()}


def _shape(m: dict):
    cfg = m.get("config", {})
    return int(cfg.get("frames", len(m.get("prompts", [])))), int(cfg.get("rounds", 0)) + 1


@router.get("/api/runs")
def list_runs(request: Request, offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500)):
    root = request.app.state.root

    def describe(rid, prefix):
        try:
            m = root.read_json(prefix + RUN_MANIFEST)
        except (NotUnderRoot, OSError, ValueError):
            return None
        n, r = _shape(m)
        return {"id": rid, "path": prefix or ".", "title": m.get("story", {}).get("title", ""),
                "frames": n, "rounds": r, "status": m.get("status", ""),
                "backbone": m.get("config", {}).get("backbone", "")}

    return window(root.runs(), offset, limit, describe)


@router.get("/api/runs/{run_id}")
def run_detail(request: Request, run_id: str, offset: int = Query(0, ge=0),
               limit: int = Query(20, ge=1, le=200)):
    root, prefix, m = _manifest(request, run_id)
    n, r = _shape(m)
    prompts = m.get("prompts", [""] * n)
    frames = list(range(offset, min(n, offset + limit)))
    grid = []
    for rr in range(r):
        row = []
        for i in frames:
            rel = f"{prefix}round_{rr:02d}/frame_{i:03d}.png"
            row.append(rel if (root.root / rel).is_file() else None)
        grid.append(row)
    figures = {str(k): {f: v.get(f) for f in _FIGURES if f in v}
               for k, v in m.get("rounds", {}).items()}
    cfg = m.get("config", {})
    return {"id": run_id, "path": prefix or ".", "title": m.get("story", {}).get("title", ""),
            "status": m.get("status", ""), "frames": n, "rounds": r, "offset": offset,
            "frame_ids": frames, "prompts": [prompts[i] if i < len(prompts) else "" for i in frames],
            "grid": grid, "figures": figures,
            "config": {k: cfg.get(k) for k in ("backbone", "steps", "guidance", "seed", "height",
                                               "width", "refs", "loras")},
            "metrics": round_metrics(root.root / prefix if prefix else root.root, m)}


@router.get("/api/runs/{run_id}/frames/{frame}")
def frame_detail(request: Request, run_id: str, frame: int):
    root, prefix, m = _manifest(request, run_id)
    n, r = _shape(m)
    if not 0 <= frame < n:
        raise NotUnderRoot(str(frame))
    prompts = m.get("prompts", [""] * n)
    rounds = []
    for rr in range(r):
        rel = f"{prefix}round_{rr:02d}/frame_{frame:03d}.png"
        rounds.append({"round": rr, "file": rel if (root.root / rel).is_file() else None,
                       "scale": m.get("rounds", {}).get(str(rr), {}).get("scale")})
    return {"id": run_id, "title": m.get("story", {}).get("title", ""), "frame": frame,
            "frames": n, "prompt": prompts[frame] if frame < len(prompts) else "",
            "seed": (m.get("seeds") or [None] * n)[frame] if frame < len(m.get("seeds") or []) else None,
            "rounds": rounds}


@router.get("/runs/{run_id}")
def sheet_page(request: Request, run_id: str):
    request.app.state.root.run_dir(run_id)  # unknown id -> 404
    return page("sheet.html")


@router.get("/runs/{run_id}/frames/{frame}")
def frame_page(request: Request, run_id: str, frame: int):
    request.app.state.root.run_dir(run_id)
    return page("frame.html")
