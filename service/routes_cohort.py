"""Cohorts: a job's subnets with their accuracy/latency Pareto front per device, the plot, and predictions for a
device registered after the job (no retraining)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from pruning.selection import pareto_front
from service.deps import JobId, KeyDep, SessionDep, StateDep
from service.engine_info import predict_member_latency
from service.errors import COMMON, WITH_ID, error_responses
from service.jsonbody import StrictRoute
from service.models import Device, Job, Subnet, ready_predictor
from service.routes_jobs import tenant_job
from service.routes_results import MACS, _tenant_device, as_member
from service.schemas import LatencyOut

router = APIRouter(prefix="/v1/jobs", tags=["cohort"], route_class=StrictRoute, responses=COMMON)


class CohortMemberOut(BaseModel):
    member: int
    subnet_id: int
    resolution: int
    macs: int
    params: int
    accuracy: float | None
    latency: dict[str, LatencyOut] = Field(description="per device id: measured wins over predicted")


class FrontOut(BaseModel):
    key: str = Field(description="device id, or 'macs' for the accuracy/MACs front")
    device_name: str | None
    members: list[int] = Field(description="member numbers on the front, cheapest first")


class CohortOut(BaseModel):
    job_id: int
    state: str
    members: list[CohortMemberOut]
    pareto: list[FrontOut]


class PredictOut(CohortOut):
    device_id: int
    predicted: list[int] = Field(description="members that got a prediction on the device")
    missing_resolutions: list[int] = Field(description="resolutions the device has no ready predictor for")


def _subnets(session: Session, job: Job) -> list[Subnet]:
    return list(session.scalars(select(Subnet).where(Subnet.job_id == job.id).order_by(Subnet.member)))


def _devices(session: Session, tenant_id: int) -> dict[str, Device]:
    return {str(d.id): d for d in session.scalars(select(Device).where(Device.tenant_id == tenant_id))}


def cohort_out(session: Session, job: Job) -> CohortOut:
    """The job's members and the Pareto front on MACs and on every tenant device with a latency for them."""
    subnets = _subnets(session, job)
    members = [as_member(s) for s in subnets]
    devices = _devices(session, job.tenant_id)
    keys = sorted({k for s in subnets for k in (s.latency or {}) if k in devices}, key=int)
    fronts = [FrontOut(key=MACS, device_name=None, members=[m["id"] for m in pareto_front(members, None)])]
    fronts += [FrontOut(key=k, device_name=devices[k].name, members=[m["id"] for m in pareto_front(members, k)])
               for k in keys]
    return CohortOut(
        job_id=job.id, state=job.state, pareto=fronts,
        members=[CohortMemberOut(member=s.member, subnet_id=s.id, resolution=s.resolution, macs=s.macs,
                                 params=s.params, accuracy=s.accuracy,
                                 latency={k: LatencyOut(**{f: v.get(f) for f in ("predicted_ms", "measured_ms")})
                                          for k, v in (s.latency or {}).items()})
                 for s in subnets])


@router.get("/{job_id}/cohort", response_model=CohortOut, responses=WITH_ID)
def get_cohort(job_id: JobId, key: KeyDep, session: SessionDep) -> CohortOut:
    """The job's cohort: every member's resolution, MACs, params, accuracy and latency per device, and the
    accuracy/latency Pareto front per device (plus the accuracy/MACs front)."""
    return cohort_out(session, tenant_job(session, key.tenant_id, job_id))


@router.get("/{job_id}/pareto.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "one panel per device"},
                       **WITH_ID, **error_responses(409, s409="the job has no evaluated subnets yet")})
def pareto_plot(
    job_id: JobId, key: KeyDep, session: SessionDep,
    device: Annotated[list[str] | None, Query(description="device id or name (repeatable); default: every "
                                                          "device with a latency, else MACs")] = None,
) -> Response:
    """Accuracy vs latency of every member, per device, with the Pareto front."""
    job = tenant_job(session, key.tenant_id, job_id)
    subnets = _subnets(session, job)
    if not any(s.accuracy is not None for s in subnets):
        raise HTTPException(409, f"job {job.id} has no evaluated subnets yet ({job.state})")
    if device:
        chosen = [_tenant_device(session, key.tenant_id, ref) for ref in device]
        series = [(str(d.id), f"{d.name} (device {d.id})") for d in chosen]
    else:
        out = cohort_out(session, job)
        series = [(f.key, f"{f.device_name} (device {f.key})") for f in out.pareto if f.key != MACS]
        series = series or [(None, "MACs")]
    from service.cohort_plot import pareto_png

    png = pareto_png([as_member(s) for s in subnets], series, title=f"job {job.id}: {job.method} {job.arch}")
    return Response(png, media_type="image/png")


def _keep_counts(job: Job) -> dict[int, list[int]]:
    """Kept channels per group of each member, from the job's report (cohort or single subnet)."""
    report = job.report or {}
    if report.get("members"):
        return {int(m["id"]): list(m["keep_counts"]) for m in report["members"] if "keep_counts" in m}
    if report.get("keep_counts"):
        return {0: list(report["keep_counts"])}
    return {}


@router.post("/{job_id}/subnets/predict", response_model=PredictOut,
             responses={**WITH_ID, **error_responses(409, s409="the job is not finished, or the device has no "
                                                              "predictor for it")})
def predict_subnets(
    job_id: JobId, key: KeyDep, session: SessionDep, state: StateDep,
    device: Annotated[str, Query(min_length=1, max_length=64, description="device id or name")],
) -> PredictOut:
    """Add the device's predicted latency to every member of a finished job (e.g. a device registered after the
    job); uses the device's ready predictor for the job's architecture at each member's resolution (evaluated in a
    subprocess: the API process never loads torch)."""
    job = tenant_job(session, key.tenant_id, job_id)
    target = _tenant_device(session, key.tenant_id, device)
    if job.state != "succeeded":
        raise HTTPException(409, f"job {job.id} is {job.state}; predictions are added once it has succeeded")
    subnets = _subnets(session, job)
    counts = _keep_counts(job)
    if not subnets or not counts:
        raise HTTPException(409, f"job {job.id} has no record of its subnets' channel counts")
    resolutions = sorted({s.resolution for s in subnets})
    predictors = {r: ready_predictor(session, target.id, job.arch, r) for r in resolutions}
    missing = [r for r, p in predictors.items() if p is None]
    if len(missing) == len(resolutions):
        raise HTTPException(409, f"device {target.name!r} has no ready latency predictor for {job.arch} at "
                                 f"{', '.join(map(str, missing))} px; profile it first: POST /v1/devices/"
                                 f"{target.id}/profile with arch {job.arch!r} and each resolution")
    request = {"store": str(state.store.root), "device": {"name": target.name, "spec": target.spec},
               "predictors": {str(r): {"id": p.id, "path": p.path} for r, p in predictors.items() if p is not None},
               "members": [{"member": s.member, "resolution": s.resolution, "keep_counts": counts[s.member]}
                           for s in subnets if s.member in counts and predictors[s.resolution] is not None]}
    session.commit()  # hold no transaction while the subprocess loads torch and the predictors
    try:
        answer = predict_member_latency(request)
    except RuntimeError as exc:
        raise HTTPException(500, str(exc)) from None
    if "error" in answer:
        raise HTTPException(409, f"the predictor of device {target.name!r} at {answer['resolution']} px cannot be "
                                 f"used: {answer['error']}")
    predicted = []
    session.expire_all()  # rows may have changed while the subprocess ran (a re-measurement, say)
    for subnet in _subnets(session, job):
        ms = answer["predicted_ms"].get(str(subnet.member))
        if ms is None:
            continue
        entry = dict((subnet.latency or {}).get(str(target.id)) or {})
        # A new dict: the JSON column only notices reassignment.
        subnet.latency = {**(subnet.latency or {}),
                          str(target.id): {"predicted_ms": ms, "measured_ms": entry.get("measured_ms")}}
        predicted.append(subnet.member)
    session.commit()
    cohort = cohort_out(session, job)
    return PredictOut(**cohort.model_dump(), device_id=target.id, predicted=predicted, missing_resolutions=missing)
