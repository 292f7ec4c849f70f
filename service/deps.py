"""Per-app state and the request dependencies: database session, authenticated key, tenant scope."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Select, bindparam, select
from sqlalchemy.orm import Session, sessionmaker

from service.auth import AuthError, KeyCache, Principal, authenticate
from service.schemas import MAX_ID
from service.settings import Settings
from service.storage import ArtifactStore

JobId = Annotated[int, Path(ge=1, le=MAX_ID, description="job id")]
DeviceId = Annotated[int, Path(ge=1, le=MAX_ID, description="device id")]
ModelId = Annotated[int, Path(ge=1, le=MAX_ID, description="model id")]

# (task name, args, queue) -> None; raises when the broker cannot take the task.
Dispatcher = Callable[[str, list[Any], str], None]


@dataclass
class AppState:
    """What every request handler of one app instance shares."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: ArtifactStore
    dispatch: Dispatcher
    keys: KeyCache


def app_state(request: Request) -> AppState:
    return request.app.state.latprune


async def _state_dependency(request: Request) -> AppState:
    # Async on purpose: FastAPI runs sync dependencies on the threadpool, and the wait for a thread would happen
    # while the request holds a pooled connection.
    return app_state(request)


# The dependencies are async, so they run on the event loop, and the session is closed as soon as the handler
# returns (scope="function"), before the response is sent. Otherwise requests waiting for a threadpool slot or
# for their client to read the response hold pooled connections, and under load the pool runs dry while the
# requests that would give connections back cannot run.
async def get_session(request: Request) -> AsyncIterator[Session]:
    session = app_state(request).sessions()
    try:
        yield session
    finally:
        session.close()


# Declared as the OpenAPI security scheme, so /docs has an Authorize button. It never answers by itself
# (auto_error=False): get_key reads the raw header so that a missing or malformed one gets our 401 and message.
bearer_scheme = HTTPBearer(auto_error=False, scheme_name="apiKey",
                           description="an API key (`latprune admin create-key`): `Authorization: Bearer <key>`")


async def get_key(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)] = None,
) -> Principal:
    state = app_state(request)
    try:
        key = authenticate(state.keys, state.sessions, request.headers.get("authorization"))
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
    request.state.tenant_id = key.tenant_id
    return key


async def get_admin_key(key: Annotated[Principal, Depends(get_key)]) -> Principal:
    if not key.is_admin:
        raise HTTPException(403, "this endpoint needs an admin key (latprune admin create-key --admin)")
    return key


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
KeyDep = Annotated[Principal, Depends(get_key)]
StateDep = Annotated[AppState, Depends(_state_dependency)]


def not_found(kind: str, ident: object) -> HTTPException:
    """The one answer for ids that do not exist and ids of another tenant."""
    return HTTPException(404, f"{kind} {ident} not found")


@cache
def _owned_statement(entity: type) -> Select:
    # Built once: Session.get builds its query anew on every call, which costs more than running it.
    return select(entity).where(entity.id == bindparam("ident"), entity.tenant_id == bindparam("tenant_id"))


def owned(session: Session, entity: type, tenant_id: int, ident: int, kind: str):  # noqa: ANN201
    """The row of `entity` with id `ident` if it belongs to the tenant, else 404 (also for another tenant's id)."""
    row = session.execute(_owned_statement(entity), {"ident": ident, "tenant_id": tenant_id}).scalar_one_or_none()
    if row is None:
        raise not_found(kind, ident)
    return row
