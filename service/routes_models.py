"""Models: upload dense weights (safetensors only, validated against the architecture)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.deps import KeyDep, ModelId, SessionDep, StateDep, owned
from service.engine_info import EngineInputError, check_arch, check_arch_size
from service.errors import COMMON, WITH_ID, error_responses
from service.jsonbody import StrictRoute
from service.models import Model
from service.schemas import ModelOut
from service.storage import StorageError
from service.weights import WeightsRejected, validate_file

# PostgreSQL text cannot hold NUL; the name column holds 128 characters.
NO_NUL = r"^[^\x00]*$"
NAME_LENGTH = 128
router = APIRouter(prefix="/v1/models", tags=["models"], route_class=StrictRoute, responses=COMMON)


def _file_name(filename: str | None) -> str:
    """The uploaded file's name as a model name: without NUL characters, cut to the column's length."""
    return (filename or "").replace("\x00", "")[:NAME_LENGTH]


def tenant_model(session: Session, tenant_id: int, model_id: int) -> Model:
    """The tenant's model, or 404 (also for another tenant's id)."""
    return owned(session, Model, tenant_id, model_id, "model")


@router.post("", status_code=201, response_model=ModelOut,
             responses=error_responses(400, 413, 422, s413="file over the size limit",
                                       s422="not safetensors, or not weights of this architecture"))
def upload_model(
    key: KeyDep, session: SessionDep, state: StateDep,
    arch: Annotated[str, Form(min_length=1, max_length=64, pattern=NO_NUL, description="zoo architecture name")],
    weights: Annotated[UploadFile, File(description="safetensors file of the model's state dict")],
    num_classes: Annotated[int, Form(ge=1, le=100000)] = 10,
    in_channels: Annotated[int, Form(ge=1, le=64)] = 3,
    name: Annotated[str, Form(max_length=NAME_LENGTH, pattern=NO_NUL,
                              description="default: the file's name")] = "",
) -> Model:
    """Upload dense weights; keys, shapes, dtypes and finiteness are checked before anything is kept."""
    try:
        check_arch(arch)
        check_arch_size(arch, num_classes, in_channels, state.settings.max_arch_params)
    except EngineInputError as exc:
        raise HTTPException(422, str(exc)) from None
    store, limit = state.store, state.settings.max_upload_bytes
    tmp = store.temp_file(".safetensors")
    final_path = None
    try:
        size = 0
        with open(tmp, "wb") as out:
            while chunk := weights.file.read(1024 * 1024):
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"weights file is larger than the limit of {limit} bytes")
                out.write(chunk)
        try:
            validate_file(tmp, arch, num_classes, in_channels)
        except (WeightsRejected, EngineInputError) as exc:
            raise HTTPException(422, f"weights rejected: {exc}") from None
        model = Model(tenant_id=key.tenant_id, name=name or _file_name(weights.filename), arch=arch,
                      num_classes=num_classes, in_channels=in_channels, path="", sha256="", size_bytes=size)
        session.add(model)
        session.flush()
        final_path = f"tenants/{key.tenant_id}/models/{model.id}.safetensors"
        stored = store.adopt(tmp, final_path)
        model.path, model.sha256, model.size_bytes = stored.path, stored.sha256, stored.size_bytes
        session.commit()
        return model
    except BaseException:
        session.rollback()
        if final_path is not None:
            try:
                store.delete(final_path)
            except StorageError:
                pass
        raise
    finally:
        tmp.unlink(missing_ok=True)


@router.get("", response_model=list[ModelOut])
async def list_models(key: KeyDep, session: SessionDep) -> list[Model]:
    """The tenant's uploaded models."""
    return list(session.scalars(select(Model).where(Model.tenant_id == key.tenant_id).order_by(Model.id)))


@router.get("/{model_id}", response_model=ModelOut, responses=WITH_ID)
async def get_model(model_id: ModelId, key: KeyDep, session: SessionDep) -> Model:
    """One uploaded model."""
    return tenant_model(session, key.tenant_id, model_id)
