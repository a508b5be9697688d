"""The studio's ASGI application: ``create_app(root)``.

Routers: :mod:`runs` (runs list, contact sheet, frame viewer), :mod:`labels` (candidate
sets, marks, export).  Here: the pages' shell (:mod:`pages`), image and thumbnail routes (through :meth:`Root.resolve` only), and one handler
that turns every refusal into a plain 404.
"""
from __future__ import annotations

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from pipelines.studio import labels, runs
from pipelines.studio.files import IMAGE_EXTS, NotUnderRoot, Root
from pipelines.studio.pages import STATIC, page

__all__ = ["create_app"]

THUMB_SIZES = (96, 160, 256, 512)


def create_app(root, cache_dir=None) -> FastAPI:
    app = FastAPI(title="storyattn studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.root = Root(root, cache_dir)

    @app.exception_handler(NotUnderRoot)
    async def _not_found(request: Request, exc: NotUnderRoot):
        return JSONResponse({"detail": "not found"}, status_code=404)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(runs.router)
    app.include_router(labels.router)

    @app.get("/")
    def index():
        return page("index.html")

    @app.get("/file/{rel:path}")
    def file(rel: str):
        path = app.state.root.resolve(rel)
        if path.suffix.lower() not in IMAGE_EXTS:
            raise NotUnderRoot(rel)  # only images leave the server this way
        return FileResponse(path, headers={"Cache-Control": "max-age=3600"})

    @app.get("/thumb/{rel:path}")
    def thumb(rel: str, size: int = Query(160)):
        size = min(THUMB_SIZES, key=lambda s: abs(s - size))  # a few sizes: a bounded cache
        return FileResponse(app.state.root.thumbnail(rel, size), media_type="image/jpeg",
                            headers={"Cache-Control": "max-age=86400"})

    return app
