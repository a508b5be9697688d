"""The studio's static pages (HTML/JS/CSS shipped in ``static/``, no CDN).

A module of its own below the app and its routers: the app mounts ``STATIC`` and the
routers answer with :func:`page`, so neither needs to import the other.
"""
from __future__ import annotations

from pathlib import Path

from fastapi.responses import FileResponse

__all__ = ["STATIC", "page"]

STATIC = Path(__file__).resolve().parent / "static"


def page(name: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type="text/html")
