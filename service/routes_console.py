"""The web console: a static page and its ES modules (no build step, nothing from a CDN), served by the API.

The pages hold no data of their own: the browser calls the same /v1 endpoints, with the same bearer key and tenant
scope as any client, so the console needs no session, cookie or server-side rendering.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

ASSETS = Path(__file__).resolve().parent / "console"
# Everything comes from this origin: a page that tried a CDN would fail here as it would on an offline machine.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
# Revalidate every time (ETag / Last-Modified answer 304), so an upgraded server never runs with yesterday's modules.
HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer"}

router = APIRouter(include_in_schema=False)


class ConsoleAssets(StaticFiles):
    """The console's files with the headers above."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *((k.lower().encode(), v.encode())
                                                             for k, v in HEADERS.items())]
            await send(message)

        await super().__call__(scope, receive, with_headers)


@router.get("/")
async def console_page() -> FileResponse:
    """The console's one HTML page; the hash part of the URL picks the view (#/jobs, #/devices, ...)."""
    return FileResponse(ASSETS / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


def mount(app: FastAPI) -> None:
    """Serve the console at / and its assets under /console/."""
    app.include_router(router)
    app.mount("/console", ConsoleAssets(directory=ASSETS), name="console")
