"""The web console: a static page and its ES modules (no build step, nothing from a CDN), served by the API.

The pages hold no data of their own: the browser calls the same /v1 endpoints, with the same bearer key and tenant
scope as any client, so the console needs no session, cookie or server-side rendering.
"""

from __future__ import annotations

import hashlib
import mimetypes
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

ASSETS = Path(__file__).resolve().parent / "console"
# Everything comes from this origin: a page that tried a CDN would fail here as it would on an offline machine.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
# Revalidate every time (the ETag answers 304), so an upgraded server never runs with yesterday's modules.
HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer"}
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".html": "text/html; charset=utf-8"}


class Asset:
    """One file of the console, held in memory with its ETag."""

    def __init__(self, path: Path):
        self.body = path.read_bytes()
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'
        self.media_type = TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"

    def response(self, request: Request) -> Response:
        headers = {**HEADERS, "ETag": self.etag}
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


def load_assets(root: Path = ASSETS) -> dict[str, Asset]:
    """Every file under `root` by its relative path. Read once: the files are small (tens of kB in all), and serving
    them from memory on the event loop keeps a first visit off the thread pool that file responses use (eight users
    loading the console at once took 450 ms a page that way, 10 ms alone)."""
    return {p.relative_to(root).as_posix(): Asset(p) for p in sorted(root.rglob("*")) if p.is_file()}


def mount(app: FastAPI) -> None:
    """Serve the console at / and its files under /console/."""
    assets = load_assets()
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def console_page(request: Request) -> Response:
        """The console's one HTML page; the hash part of the URL picks the view (#/jobs, #/devices, ...)."""
        return assets["index.html"].response(request)

    @router.get("/console/{path:path}")
    async def console_file(path: str, request: Request) -> Response:
        """A stylesheet or module of the console; only files that were there at start-up exist."""
        asset = assets.get(path)
        if asset is None:
            return Response(f"no console file {path!r}", status_code=404, media_type="text/plain")
        return asset.response(request)

    app.include_router(router)
