"""Candidate sets under ROOT: the labelling API the page (and any labeller) uses.

A set is a folder holding ``candidates.json`` (written by ``python -m
pipelines.candidates``).  Marks are events in the set's journal (journal.py)::

    POST /api/sets/{id}/marks  {"id": EVENT_ID, "tab": TAB, "scenario": S, "candidate": K,
                                "label": "winner"|"loser"|"none"}
    POST /api/sets/{id}/marks  {"id": EVENT_ID, "tab": TAB, "undo": EARLIER_EVENT_ID}

Each answer carries the fold of every tab's events, so a page always shows them all.
``POST /api/sets/{id}/export`` writes ``pairs.jsonl`` (pairs.py).
"""
from __future__ import annotations

import re
from typing import Optional

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field

from pipelines.candidate_sets import MANIFEST
from pipelines.studio.files import window
from pipelines.studio.journal import JOURNAL_NAME, LABELS, Journal
from pipelines.studio.pairs import ExportError, export_pairs
from pipelines.studio.pages import page

router = APIRouter()
_EVENT_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


class Mark(BaseModel):
    id: str = Field(..., description="unique per event, made by the client (resend-safe)")
    tab: str = Field("", max_length=64)
    scenario: Optional[str] = None
    candidate: Optional[int] = None
    label: Optional[str] = None
    undo: Optional[str] = None


def _open(request: Request, set_id: str):
    root = request.app.state.root
    prefix = root.set_dir(set_id)
    manifest = root.read_json(prefix + MANIFEST)
    set_dir = root.resolve(prefix[:-1], want_dir=True) if prefix else root.root
    return root, prefix, manifest, Journal(set_dir / JOURNAL_NAME), set_dir


def _progress(manifest, marks):
    n = len(manifest["scenarios"])
    done = sum(1 for s in manifest["scenarios"]
               if {"winner", "loser"} <= set(marks.get(s["id"], {}).values()))
    return {"scenarios": n, "labelled": done}


def _marks_json(marks):
    return {s: {str(k): v for k, v in m.items()} for s, m in marks.items()}


@router.get("/api/sets")
def list_sets(request: Request, offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500)):
    def describe(sid, prefix):
        try:
            _, _, m, journal, _ = _open(request, sid)
        except (LookupError, OSError, ValueError):
            return None
        return {"id": sid, "path": prefix or ".", "status": m.get("status", ""),
                "candidates": m.get("config", {}).get("candidates"),
                **_progress(m, journal.marks())}

    return window(request.app.state.root.sets(), offset, limit, describe)


@router.get("/api/sets/{set_id}")
def set_detail(request: Request, set_id: str):
    root, prefix, m, journal, _ = _open(request, set_id)
    scen = []
    for s in m["scenarios"]:
        scen.append({"id": s["id"], "prompt": s["prompt"], "characters": s.get("characters", []),
                     "references": [prefix + r for r in s["references"]],
                     "candidates": [{"k": k, "file": prefix + c["file"], "seed": c["seed"],
                                     "exists": (root.root / (prefix + c["file"])).is_file()}
                                    for k, c in enumerate(s["candidates"])]})
    marks = journal.marks()
    return {"id": set_id, "path": prefix or ".", "status": m.get("status", ""), "scenarios": scen,
            "marks": _marks_json(marks), "progress": _progress(m, marks)}


@router.get("/api/sets/{set_id}/marks")
def get_marks(request: Request, set_id: str):
    _, _, m, journal, _ = _open(request, set_id)
    marks = journal.marks()
    return {"marks": _marks_json(marks), "progress": _progress(m, marks)}


@router.post("/api/sets/{set_id}/marks")
def post_mark(request: Request, set_id: str, mark: Mark):
    _, _, m, journal, _ = _open(request, set_id)
    if not _EVENT_ID.match(mark.id):
        raise HTTPException(422, "event id: 8-64 letters, digits, '_' or '-'")
    if mark.undo is not None:
        target = journal.find(mark.undo)
        if target is None or "undo" in target:
            raise HTTPException(422, f"undo: no mark event {mark.undo!r} in this set's journal")
        event = {"id": mark.id, "tab": mark.tab, "undo": mark.undo}
    else:
        scen = next((s for s in m["scenarios"] if s["id"] == mark.scenario), None)
        if scen is None:
            raise HTTPException(422, f"unknown scenario {mark.scenario!r} in this set")
        if mark.candidate is None or not 0 <= mark.candidate < len(scen["candidates"]):
            raise HTTPException(422, f"candidate must be 0..{len(scen['candidates']) - 1}")
        if mark.label not in LABELS:
            raise HTTPException(422, f"label must be one of {', '.join(LABELS)}")
        event = {"id": mark.id, "tab": mark.tab, "scenario": mark.scenario,
                 "candidate": mark.candidate, "label": mark.label}
    written = journal.append(event)
    marks = journal.marks()
    return {"event": mark.id, "written": written, "marks": _marks_json(marks),
            "progress": _progress(m, marks)}


@router.post("/api/sets/{set_id}/export")
def export(request: Request, set_id: str):
    root, _, _, _, set_dir = _open(request, set_id)
    try:
        res = export_pairs(set_dir)
    except ExportError as e:
        raise HTTPException(409, str(e))
    res["path"] = root.rel(res["path"])
    return res


@router.get("/sets/{set_id}")
def label_page(request: Request, set_id: str):
    request.app.state.root.set_dir(set_id)
    return page("label.html")
