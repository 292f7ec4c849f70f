"""Results: a job's cohort of subnets, and the checkpoint that suits a device."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from pruning.selection import pareto_front
from service.deps import MAX_ID, JobId, KeyDep, SessionDep, StateDep, not_found
from service.errors import COMMON, WITH_ID, error_responses
from service.jsonbody import StrictRoute
from service.models import Artifact, Device, Job, Subnet
from service.routes_jobs import tenant_job
from service.schemas import ArtifactFormat, ArtifactOut, LatencyOut, SubnetOut

router = APIRouter(prefix="/v1/jobs", tags=["results"], route_class=StrictRoute, responses=COMMON)
MEDIA_TYPES = {"onnx": "application/octet-stream", "safetensors": "application/octet-stream",
               "arch": "application/json"}
FILE_NAMES = {"onnx": "model.onnx", "safetensors": "model.safetensors", "arch": "arch.json"}


def subnet_latency_ms(subnet: Subnet, device_id: int) -> float | None:
    """Measured latency on the device if known, else predicted, else None."""
    entry = (subnet.latency or {}).get(str(device_id)) or {}
    measured = entry.get("measured_ms")
    return measured if measured is not None else entry.get("predicted_ms")


OverBudget = Literal["refuse", "fastest"]


def pick_subnet(subnets: list[Subnet], device_id: int, budget_ms: float | None, tolerance: float,
                over_budget: OverBudget = "refuse") -> tuple[Subnet | None, str]:
    """The most accurate subnet whose latency on the device fits the budget (plus tolerance), and "" or, when
    none fits, None (or the fastest subnet if `over_budget` is "fastest") and the reason."""
    if not subnets:
        return None, "the job produced no subnets"
    if budget_ms is None:
        fitting = list(subnets)
    else:
        timed = [(s, subnet_latency_ms(s, device_id)) for s in subnets]
        known = [(s, ms) for s, ms in timed if ms is not None]
        if not known:
            return None, (f"no subnet has a measured or predicted latency on device {device_id}; "
                          "profile the device for this architecture first")
        limit = budget_ms * (1 + tolerance)
        fitting = [s for s, ms in known if ms <= limit]
        if not fitting:
            fastest, fastest_ms = min(known, key=lambda row: (row[1], row[0].member))
            reason = (f"no subnet fits {budget_ms:g} ms on device {device_id}: the fastest takes "
                      f"{fastest_ms:.3g} ms; submit a job with a tighter budget for this device")
            return (fastest if over_budget == "fastest" else None), reason
    best = max(fitting, key=lambda s: (s.accuracy if s.accuracy is not None else float("-inf"), -s.macs))
    return best, ""


def _subnet_out(subnet: Subnet, artifacts: list[Artifact], pareto: list[str]) -> SubnetOut:
    return SubnetOut(
        id=subnet.id, member=subnet.member, resolution=subnet.resolution, macs=subnet.macs, params=subnet.params,
        accuracy=subnet.accuracy, widths=subnet.widths,
        latency={k: LatencyOut(**v) for k, v in (subnet.latency or {}).items()},
        artifacts=[ArtifactOut(format=a.format, sha256=a.sha256, size_bytes=a.size_bytes) for a in artifacts],
        pareto_front=pareto,
    )


MACS = "macs"


def as_member(subnet: Subnet) -> dict:
    """A subnet row in pruning.selection's member form."""
    return {"id": subnet.member, "accuracy": subnet.accuracy, "macs": subnet.macs, "resolution": subnet.resolution,
            "latency_ms": subnet.latency or {}}


def front_keys(subnets: list[Subnet]) -> dict[int, list[str]]:
    """For every subnet: the fronts it lies on ("macs" and the ids of devices with a latency for the cohort)."""
    members = [as_member(s) for s in subnets]
    keys = [MACS] + sorted({k for s in subnets for k in (s.latency or {})}, key=lambda k: (len(k), k))
    on_front: dict[int, list[str]] = {s.member: [] for s in subnets}
    for key in keys:
        for member in pareto_front(members, None if key == MACS else key):
            on_front[member["id"]].append(key)
    return on_front


def _job_subnets(session: Session, job: Job) -> list[Subnet]:
    return list(session.scalars(select(Subnet).where(Subnet.job_id == job.id).order_by(Subnet.member)))


@router.get("/{job_id}/subnets", response_model=list[SubnetOut], responses=WITH_ID)
async def list_subnets(job_id: JobId, key: KeyDep, session: SessionDep) -> list[SubnetOut]:
    """The job's cohort: widths, resolution, MACs, params, accuracy, latency per device, artifacts, and which
    accuracy/cost Pareto fronts (per device id, and "macs") each member lies on."""
    job = tenant_job(session, key.tenant_id, job_id)
    subnets = _job_subnets(session, job)
    artifacts: dict[int, list[Artifact]] = {}
    if subnets:
        for a in session.scalars(select(Artifact).where(Artifact.subnet_id.in_([s.id for s in subnets]))
                                 .order_by(Artifact.format)):
            artifacts.setdefault(a.subnet_id, []).append(a)
    fronts = front_keys(subnets)
    return [_subnet_out(s, artifacts.get(s.id, []), fronts[s.member]) for s in subnets]


def _tenant_device(session: Session, tenant_id: int, ref: str) -> Device:
    """The tenant's device by id (ASCII digits that fit an id) or else by name; 404 if there is none."""
    where = [Device.tenant_id == tenant_id]
    # str.isdigit() also holds for characters such as "²" that int() refuses.
    by_id = ref.isascii() and ref.isdigit() and int(ref) <= MAX_ID
    where.append(Device.id == int(ref) if by_id else Device.name == ref)
    device = session.scalar(select(Device).where(*where))
    if device is None:
        raise not_found("device", ref)
    return device


@router.get("/{job_id}/checkpoint", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": "the file; X-Checkpoint-SHA256 holds its hash"},
                       **WITH_ID, **error_responses(409, s409="the job is not finished, or no subnet fits the "
                                                              "device (and over_budget is refuse)")})
async def download_checkpoint(
    job_id: JobId, key: KeyDep, session: SessionDep, state: StateDep,
    device: Annotated[str, Query(min_length=1, max_length=64, description="device id or name")],
    format: Annotated[ArtifactFormat, Query()] = "onnx",  # noqa: A002 - the API's parameter name
    latency_ms: Annotated[float | None, Query(gt=0, allow_inf_nan=False,
                                              description="override the device's budget")] = None,
    over_budget: Annotated[OverBudget, Query(description="when no subnet fits: refuse (409), or send the fastest "
                                                         "with the reason in X-Over-Budget")] = "refuse",
) -> FileResponse:
    """The most accurate subnet of the job that fits the device's latency budget.

    The budget is `latency_ms` if given, else the job's own budget when it targeted this device,
    else the device's default `latency_budget_ms`; with none, the most accurate subnet is returned.
    When none fits, 409, or with over_budget=fastest the fastest subnet, flagged by the X-Over-Budget header.
    """
    job = tenant_job(session, key.tenant_id, job_id)
    target = _tenant_device(session, key.tenant_id, device)
    if job.state != "succeeded":
        raise HTTPException(409, f"job {job.id} is {job.state}; checkpoints exist once it has succeeded")
    budget_ms = latency_ms
    if budget_ms is None and job.budget_kind == "latency_ms" and job.budget_device_id == target.id:
        budget_ms = job.budget_value
    if budget_ms is None:
        budget_ms = target.latency_budget_ms
    subnet, reason = pick_subnet(_job_subnets(session, job), target.id, budget_ms,
                                 state.settings.latency_tolerance, over_budget)
    if subnet is None:
        raise HTTPException(409, reason)
    artifact = session.scalar(select(Artifact).where(Artifact.subnet_id == subnet.id, Artifact.format == format))
    if artifact is None or not state.store.exists(artifact.path):
        raise HTTPException(409, f"subnet {subnet.member} of job {job.id} has no {format} file")
    headers = {"X-Checkpoint-SHA256": artifact.sha256, "X-Subnet-Id": str(subnet.id),
               "X-Subnet-Member": str(subnet.member)}
    if reason:
        headers["X-Over-Budget"] = reason
    ms = subnet_latency_ms(subnet, target.id)
    if ms is not None:
        headers["X-Latency-Ms"] = f"{ms:.6g}"
    return FileResponse(state.store.resolve(artifact.path), media_type=MEDIA_TYPES[format], headers=headers,
                        filename=f"job{job.id}-subnet{subnet.member}-{FILE_NAMES[format]}")
