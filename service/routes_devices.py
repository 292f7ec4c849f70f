"""Devices: register deployment targets, profile them, list their latency predictors."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.contracts import PROFILE_TASK, profile_queue
from service.deps import DeviceId, KeyDep, SessionDep, StateDep, owned
from service.engine_info import EngineInputError, check_arch
from service.errors import COMMON, WITH_ID, error_responses
from service.jsonbody import StrictRoute
from service.models import Device, Predictor
from service.schemas import DeviceCreate, DeviceOut, PredictorOut, ProfileRequest

router = APIRouter(prefix="/v1/devices", tags=["devices"], route_class=StrictRoute, responses=COMMON)


def tenant_device(session: Session, tenant_id: int, device_id: int) -> Device:
    """The tenant's device, or 404 (also for another tenant's id)."""
    return owned(session, Device, tenant_id, device_id, "device")


@router.post("", status_code=201, response_model=DeviceOut,
             responses=error_responses(409, s409="a device of that name exists"))
async def create_device(body: DeviceCreate, key: KeyDep, session: SessionDep) -> Device:
    """Register a device; its profiling runs on its own queue, `queue` in the answer (profile.device-<id>)."""
    device = Device(tenant_id=key.tenant_id, name=body.name, spec=body.spec(), queue="",
                    latency_budget_ms=body.latency_budget_ms)
    session.add(device)
    try:
        session.flush()
        device.queue = profile_queue(device.id)
        session.commit()
    except IntegrityError:
        session.rollback()
        raise HTTPException(409, f"a device named {body.name!r} already exists; pick another name") from None
    return device


@router.get("", response_model=list[DeviceOut])
async def list_devices(key: KeyDep, session: SessionDep) -> list[Device]:
    """The tenant's devices."""
    return list(session.scalars(select(Device).where(Device.tenant_id == key.tenant_id).order_by(Device.id)))


@router.get("/{device_id}", response_model=DeviceOut, responses=WITH_ID)
async def get_device(device_id: DeviceId, key: KeyDep, session: SessionDep) -> Device:
    """One device."""
    return tenant_device(session, key.tenant_id, device_id)


@router.post("/{device_id}/profile", status_code=202, response_model=PredictorOut,
             responses={**WITH_ID, **error_responses(503)})
async def profile_device(device_id: DeviceId, body: ProfileRequest, key: KeyDep, session: SessionDep,
                   state: StateDep) -> Predictor:
    """Time sampled width configurations on the device and fit its LPNet (runs on the device's queue)."""
    device = tenant_device(session, key.tenant_id, device_id)
    try:
        facts = check_arch(body.arch)
    except EngineInputError as exc:
        raise HTTPException(422, str(exc)) from None
    predictor = Predictor(device_id=device.id, arch=body.arch,
                          resolution=body.resolution or facts["default_resolution"],
                          samples_requested=body.samples, state="queued")
    session.add(predictor)
    session.commit()
    try:
        state.dispatch(PROFILE_TASK, [predictor.id], device.queue)
    except Exception as exc:  # noqa: BLE001 - any broker failure means the run cannot start
        predictor.state, predictor.error = "failed", f"could not queue the profiling run: {exc}"
        session.commit()
        raise HTTPException(503, f"the task broker is unavailable ({exc}); try again") from None
    return predictor


@router.get("/{device_id}/predictors", response_model=list[PredictorOut], responses=WITH_ID)
async def list_predictors(device_id: DeviceId, key: KeyDep, session: SessionDep) -> list[Predictor]:
    """Latency predictors (and profiling runs) of a device, with their metrics."""
    device = tenant_device(session, key.tenant_id, device_id)
    return list(session.scalars(select(Predictor).where(Predictor.device_id == device.id)
                                .order_by(Predictor.id)))
