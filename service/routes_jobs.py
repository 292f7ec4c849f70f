"""Jobs: submit (validated, idempotent), list, read, follow progress (server-sent events), cancel."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.contracts import PRUNE_TASK
from service.datasets import check_dataset, dataset_shape
from service.deps import MAX_ID, JobId, KeyDep, SessionDep, StateDep, app_state, owned
from service.engine_info import EngineInputError, check_arch, validate_params
from service.errors import COMMON, WITH_ID, error_responses
from service.jsonbody import StrictRoute
from service.models import TERMINAL_STATES, Device, Job, JobEvent, utcnow
from service.routes_models import tenant_model
from service.schemas import Budget, JobCreate, JobOut, JobPage, JobState

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=StrictRoute, responses=COMMON)
SSE_POLL_S = 0.5
SSE_HEARTBEAT_S = 15.0


def tenant_job(session: Session, tenant_id: int, job_id: int) -> Job:
    """The tenant's job, or 404 (also for another tenant's id)."""
    return owned(session, Job, tenant_id, job_id, "job")


def job_out(job: Job, with_report: bool = False) -> JobOut:
    """The API view of a job row."""
    return JobOut(
        id=job.id, state=job.state, method=job.method, arch=job.arch, model_id=job.model_id,
        dataset=job.dataset,
        budget=Budget(kind=job.budget_kind, value=job.budget_value, device_id=job.budget_device_id),
        epochs=job.epochs, params=job.params, progress=job.progress, stage=job.stage, epoch=job.epoch,
        loss=job.loss, cost=job.cost, error=job.error, cancel_requested=job.cancel_requested,
        attempts=job.attempts, report=job.report if with_report else None, created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at,
    )


def _request_hash(body: JobCreate) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _params_error(exc: ValidationError) -> HTTPException:
    # Same shape as FastAPI's own 422s, located inside body.params so the wrong field is named.
    detail = [{"loc": ["body", "params", *err["loc"]], "msg": err["msg"], "type": err["type"]}
              for err in exc.errors(include_url=False, include_context=False)]
    return HTTPException(422, detail)


def _validated_request(body: JobCreate, tenant_id: int, session: Session, state) -> dict:  # noqa: ANN001
    """The request with canonical dataset and defaulted params; HTTPException for any bad field."""
    try:
        params = validate_params(body.method, body.params)
    except EngineInputError as exc:
        raise HTTPException(422, str(exc)) from None
    except ValidationError as exc:
        raise _params_error(exc) from None
    try:
        check_arch(body.arch)
        dataset = check_dataset(body.dataset, state.settings.data_root)
        if body.model_id is not None:
            _check_model_fits(tenant_model(session, tenant_id, body.model_id), body.arch,
                              dataset_shape(dataset, state.settings.data_root), dataset)
    except EngineInputError as exc:
        raise HTTPException(422, str(exc)) from None
    if body.budget.device_id is not None:
        owned(session, Device, tenant_id, body.budget.device_id, "device")
    return {**body.model_dump(mode="json"), "dataset": str(dataset), "params": params}


def _check_model_fits(model, arch: str, shape: tuple[int, int], dataset: object) -> None:  # noqa: ANN001
    """EngineInputError unless the uploaded weights are of `arch` with the dataset's classes and input channels:
    the worker builds the model from the dataset and would fail loading them."""
    if model.arch != arch:
        raise EngineInputError(f"model {model.id} is a {model.arch}, but the job asks for {arch}")
    classes, channels = shape
    if model.num_classes != classes:
        raise EngineInputError(f"model {model.id} has {model.num_classes} classes but {dataset} has {classes}; "
                               f"upload weights with a {classes}-class classifier or pick a matching dataset")
    if model.in_channels != channels:
        raise EngineInputError(f"model {model.id} takes {model.in_channels} input channels but {dataset} has "
                               f"{channels}; upload weights for {channels}-channel input or pick a matching dataset")


@router.post("", status_code=201, response_model=JobOut,
             responses={200: {"description": "an earlier job with the same Idempotency-Key"},
                        **error_responses(404, 409, 503, s404="model_id or budget.device_id does not exist",
                                          s409="Idempotency-Key reused with a different request")})
async def submit_job(
    body: JobCreate, key: KeyDep, session: SessionDep, state: StateDep, response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=128, description="same key, same job")] = None,
) -> JobOut:
    """Queue a pruning job."""
    digest = _request_hash(body)
    if idempotency_key:
        earlier = _by_idempotency_key(session, key.tenant_id, idempotency_key, digest)
        if earlier is not None:
            response.status_code = 200
            return job_out(earlier)
    request = _validated_request(body, key.tenant_id, session, state)
    job = Job(tenant_id=key.tenant_id, state="queued", method=body.method, arch=body.arch,
              model_id=body.model_id, dataset=request["dataset"], budget_kind=body.budget.kind,
              budget_value=body.budget.value, budget_device_id=body.budget.device_id, epochs=body.epochs,
              params=request["params"], request=request, idempotency_key=idempotency_key or None,
              request_hash=digest)
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the race: answer with its job.
        session.rollback()
        earlier = _by_idempotency_key(session, key.tenant_id, idempotency_key or "", digest)
        if earlier is None:
            raise
        response.status_code = 200
        return job_out(earlier)
    try:
        state.dispatch(PRUNE_TASK, [job.id], state.settings.prune_queue)
    except Exception as exc:  # noqa: BLE001 - any broker failure means the job cannot start
        job.state, job.error, job.finished_at = "failed", f"could not queue the job: {exc}", utcnow()
        session.commit()
        raise HTTPException(503, f"the task broker is unavailable ({exc}); try again") from None
    return job_out(job)


def _by_idempotency_key(session: Session, tenant_id: int, idem_key: str, digest: str) -> Job | None:
    job = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idem_key))
    if job is not None and job.request_hash != digest:
        raise HTTPException(409, f"Idempotency-Key {idem_key!r} was used for a different request "
                                 f"(job {job.id}); use a new key for a new job")
    return job


@router.get("", response_model=JobPage)
async def list_jobs(key: KeyDep, session: SessionDep, state: JobState | None = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 50,
              offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0) -> JobPage:
    """The tenant's jobs, newest first."""
    where = [Job.tenant_id == key.tenant_id]
    if state:
        where.append(Job.state == state)
    total = session.scalar(select(func.count()).select_from(Job).where(*where)) or 0
    rows = session.scalars(select(Job).where(*where).order_by(Job.id.desc()).limit(limit).offset(offset))
    return JobPage(items=[job_out(j) for j in rows], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut, responses=WITH_ID)
async def get_job(job_id: JobId, key: KeyDep, session: SessionDep) -> JobOut:
    """State, progress 0..1, current epoch, loss, cost, error, and the final report."""
    return job_out(tenant_job(session, key.tenant_id, job_id), with_report=True)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut,
             responses={**WITH_ID, **error_responses(409, s409="the job has already finished")})
async def cancel_job(job_id: JobId, key: KeyDep, session: SessionDep) -> JobOut:
    """Cancel: a queued job stops at once; a running job stops at its worker's next step."""
    job = tenant_job(session, key.tenant_id, job_id)
    if job.state in TERMINAL_STATES:
        raise HTTPException(409, f"job {job.id} already {job.state}; nothing to cancel")
    job.cancel_requested = True
    if job.state == "queued":
        job.state, job.finished_at = "cancelled", utcnow()
        session.add(JobEvent(job_id=job.id, kind="state", data={"state": "cancelled"}))
    session.commit()
    return job_out(job)


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "`id`, `event` (progress | state | end) and JSON `data` lines"},
                       **WITH_ID})
async def job_events(
    job_id: JobId, key: KeyDep, session: SessionDep, request: Request,
    after: Annotated[int, Query(ge=0, le=MAX_ID, description="only events with a larger id")] = 0,
    follow: Annotated[bool, Query(description="keep the stream open until the job ends")] = True,
    last_event_id: Annotated[int | None, Header(ge=0, le=MAX_ID)] = None,
) -> StreamingResponse:
    """Server-sent events of the job's progress; resumable with Last-Event-ID."""
    tenant_job(session, key.tenant_id, job_id)
    sessions = app_state(request).sessions
    start = max(after, last_event_id or 0)
    return StreamingResponse(_event_stream(sessions, job_id, start, follow), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event_stream(sessions, job_id: int, last_id: int, follow: bool) -> Iterator[str]:  # noqa: ANN001
    quiet_since = time.monotonic()
    while True:
        with sessions() as session:
            # State first: events committed with (or before) a terminal state are then never missed.
            job_state = session.scalar(select(Job.state).where(Job.id == job_id))
            session.commit()
            events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > last_id)
                                     .order_by(JobEvent.id).limit(500)).all()
        for event in events:
            last_id = event.id
            yield f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(event.data)}\n\n"
        if events:
            quiet_since = time.monotonic()
            continue
        if job_state in TERMINAL_STATES or job_state is None or not follow:
            yield f"event: end\ndata: {json.dumps({'state': job_state})}\n\n"
            return
        if time.monotonic() - quiet_since > SSE_HEARTBEAT_S:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        time.sleep(SSE_POLL_S)
