"""Per-app state and the request dependencies: database session, authenticated key, tenant scope."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request
from sqlalchemy.orm import Session, sessionmaker

from service.auth import AuthError, authenticate
from service.models import ApiKey
from service.settings import Settings
from service.storage import ArtifactStore

# (task name, args, queue) -> None; raises when the broker cannot take the task.
Dispatcher = Callable[[str, list[Any], str], None]


@dataclass
class AppState:
    """What every request handler of one app instance shares."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: ArtifactStore
    dispatch: Dispatcher


def app_state(request: Request) -> AppState:
    return request.app.state.latprune


def get_session(request: Request) -> Iterator[Session]:
    session = app_state(request).sessions()
    try:
        yield session
    finally:
        session.close()


def get_key(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    authorization: Annotated[str | None, Header(description="Bearer <api key>")] = None,
) -> ApiKey:
    try:
        key = authenticate(session, authorization)
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
    request.state.tenant_id = key.tenant_id
    return key


def get_admin_key(key: Annotated[ApiKey, Depends(get_key)]) -> ApiKey:
    if not key.is_admin:
        raise HTTPException(403, "this endpoint needs an admin key (latprune admin create-key --admin)")
    return key


SessionDep = Annotated[Session, Depends(get_session)]
KeyDep = Annotated[ApiKey, Depends(get_key)]
StateDep = Annotated[AppState, Depends(app_state)]


def not_found(kind: str, ident: object) -> HTTPException:
    """The one answer for ids that do not exist and ids of another tenant."""
    return HTTPException(404, f"{kind} {ident} not found")
