"""The FastAPI application: routers, auth, body-size limits, health and Prometheus metrics.

Start with `uvicorn --factory service.app:create_app` (or `latprune up`). Nothing here imports torch:
engine facts come through service.engine_info.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select, text

from service import (
    routes_cohort,
    routes_console,
    routes_devices,
    routes_jobs,
    routes_member,
    routes_models,
    routes_results,
)
from service.auth import KeyCache, Principal
from service.db import session_factory
from service.deps import AppState, Dispatcher, KeyDep, get_admin_key
from service.engine_info import known_archs, list_methods
from service.errors import COMMON, error_responses, validation_error_handler
from service.models import JOB_STATES, Job
from service.schemas import MethodOut
from service.settings import Settings, get_settings
from service.storage import ArtifactStore

# Multipart framing around the weights file: boundaries, part headers and the small form fields.
MULTIPART_SLACK_BYTES = 64 * 1024
UPLOAD_PATH = "/v1/models"


class BodySizeLimit:
    """ASGI middleware: 413 with a JSON message once a request body is over its route's limit.

    A declared Content-Length is checked up front; a streamed body is counted as it arrives, and the
    HTTPException raised from `receive` reaches FastAPI's exception handling like any other.
    """

    def __init__(self, app, body_limit: int, upload_limit: int):  # noqa: ANN001
        self.app, self.body_limit, self.upload_limit = app, body_limit, upload_limit

    async def __call__(self, scope, receive, send):  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope["path"] == UPLOAD_PATH else self.body_limit
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            response = JSONResponse({"detail": _too_large(limit)}, 413)
            return await response(scope, receive, send)
        received = 0

        async def counted_receive():  # noqa: ANN202
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, _too_large(limit))
            return message

        return await self.app(scope, counted_receive, send)


class RequestMetrics:
    """ASGI middleware: count requests per route template and status, and time them."""

    def __init__(self, app, requests: Counter, seconds: Histogram):  # noqa: ANN001
        self.app, self.requests, self.seconds = app, requests, seconds

    async def __call__(self, scope, receive, send):  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message):  # noqa: ANN001, ANN202
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope["method"], route, str(status)).inc()
            self.seconds.labels(scope["method"], route).observe(time.perf_counter() - start)


def _too_large(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes"


class JobStateCollector:
    """Job counts per state, read from the database at scrape time."""

    def __init__(self, sessions):  # noqa: ANN001
        self.sessions = sessions

    def collect(self):  # noqa: ANN201
        gauge = GaugeMetricFamily("latprune_jobs", "jobs per state", labels=["state"])
        with self.sessions() as session:
            counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        for state in JOB_STATES:
            gauge.add_metric([state], counts.get(state, 0))
        yield gauge


def celery_dispatcher(settings: Settings) -> Dispatcher:
    """Send tasks by name through the configured broker."""
    from service.contracts import make_producer

    celery = make_producer(settings)

    def dispatch(task: str, args: list, queue: str) -> None:
        celery.send_task(task, args=args, queue=queue)

    return dispatch


def _warm_arch_cache() -> None:
    try:
        known_archs()
    except Exception:  # noqa: BLE001 - the first request that needs it will report the failure
        logging.getLogger(__name__).warning("cannot list architectures yet", exc_info=True)


def create_app(settings: Settings | None = None, dispatch: Dispatcher | None = None) -> FastAPI:
    """A configured app instance (settings default to the environment; tasks go to the broker)."""
    settings = settings or get_settings()
    settings.ensure_dirs()
    sessions = session_factory(settings.database_url)
    state = AppState(settings=settings, sessions=sessions, store=ArtifactStore(settings.artifact_dir),
                     dispatch=dispatch or celery_dispatcher(settings), keys=KeyCache(settings.auth_cache_s))
    @asynccontextmanager
    async def lifespan(_: FastAPI):  # noqa: ANN202
        # Ask the zoo for its architectures in the background now, not inside the first request.
        threading.Thread(target=_warm_arch_cache, daemon=True).start()
        yield

    app = FastAPI(title="latprune", version="0.1.0", lifespan=lifespan,
                  description="Latency-constrained, hardware-aware pruning of CNNs. Every endpoint but /healthz "
                              "needs `Authorization: Bearer <api key>`; other tenants' ids answer 404. The web console "
                              "is at /.")
    app.state.latprune = state
    app.add_exception_handler(RequestValidationError, validation_error_handler)

    registry = CollectorRegistry()
    requests = Counter("latprune_http_requests", "HTTP requests", ["method", "route", "status"],
                       registry=registry)
    seconds = Histogram("latprune_http_request_seconds", "HTTP request latency", ["method", "route"],
                        registry=registry)
    registry.register(JobStateCollector(sessions))

    upload_limit = settings.max_upload_bytes + MULTIPART_SLACK_BYTES
    app.add_middleware(BodySizeLimit, body_limit=settings.max_body_bytes, upload_limit=upload_limit)
    app.add_middleware(RequestMetrics, requests=requests, seconds=seconds)

    @app.get("/healthz", tags=["meta"], responses=error_responses(503, s503="the database is unreachable"))
    async def healthz() -> dict:
        """Liveness and database reachability (no key needed)."""
        try:
            with sessions() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
            raise HTTPException(503, f"database unreachable: {type(exc).__name__}") from None
        return {"status": "ok", "database": "ok"}

    @app.get("/metrics", tags=["meta"], response_class=Response, responses={**COMMON, **error_responses(403)})
    async def metrics(_: Annotated[Principal, Depends(get_admin_key)]) -> Response:
        """Prometheus metrics (admin key: the job counts span all tenants)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/methods", tags=["meta"], response_model=list[MethodOut], responses=COMMON)
    async def methods(_: KeyDep) -> list[dict]:
        """Pruning methods: name, description and the JSON schema of their params."""
        return list_methods()

    for module in (routes_devices, routes_models, routes_jobs, routes_results, routes_member, routes_cohort):
        app.include_router(module.router)
    routes_console.mount(app)
    return app
