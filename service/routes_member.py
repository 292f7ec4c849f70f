"""One cohort member's files, by member number: the console's download for any point of a cohort plot (the checkpoint
route only hands out the member a device's budget picks)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import FileResponse
from sqlalchemy import select

from service.deps import JobId, KeyDep, SessionDep, StateDep
from service.errors import COMMON
from service.jsonbody import StrictRoute
from service.models import Artifact, Subnet
from service.routes_jobs import tenant_job
from service.routes_results import FILE_NAMES, MEDIA_TYPES
from service.schemas import ArtifactFormat

router = APIRouter(prefix="/v1/jobs", tags=["results"], route_class=StrictRoute, responses=COMMON)


@router.get("/{job_id}/subnets/{member}/checkpoint", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": "the file; X-Checkpoint-SHA256 holds its hash"},
                       404: {"description": "no such job (or another tenant's), or no such member"},
                       409: {"description": "the job has not succeeded, or the member has no file of that format"}})
async def download_member(
    job_id: JobId, key: KeyDep, session: SessionDep, state: StateDep,
    member: Annotated[int, Path(ge=0, le=1_000_000, description="the member number (GET /v1/jobs/{id}/subnets)")],
    format: Annotated[ArtifactFormat, Query()] = "onnx",  # noqa: A002 - the API's parameter name
) -> FileResponse:
    """A given member of the job's cohort, whatever its latency on any device."""
    job = tenant_job(session, key.tenant_id, job_id)
    if job.state != "succeeded":
        raise HTTPException(409, f"job {job.id} is {job.state}; checkpoints exist once it has succeeded")
    subnet = session.scalar(select(Subnet).where(Subnet.job_id == job.id, Subnet.member == member))
    if subnet is None:
        raise HTTPException(404, f"job {job.id} has no member {member}")
    artifact = session.scalar(select(Artifact).where(Artifact.subnet_id == subnet.id, Artifact.format == format))
    if artifact is None or not state.store.exists(artifact.path):
        raise HTTPException(409, f"member {member} of job {job.id} has no {format} file")
    headers = {"X-Checkpoint-SHA256": artifact.sha256, "X-Subnet-Id": str(subnet.id),
               "X-Subnet-Member": str(subnet.member)}
    return FileResponse(state.store.resolve(artifact.path), media_type=MEDIA_TYPES[format], headers=headers,
                        filename=f"job{job.id}-subnet{subnet.member}-{FILE_NAMES[format]}")
