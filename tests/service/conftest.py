"""Service fixtures: a migrated database per backend (SQLite file, PostgreSQL schema), an app, API keys."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_key
from service.db import dispose_engines, session_scope
from service.migrate import upgrade
from service.settings import Settings

POSTGRES_URL = os.environ.get("LATPRUNE_TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")


def postgres_schema_url(schema: str) -> str:
    """The test database URL with every connection's search_path set to `schema`."""
    return f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"


@pytest.fixture(scope="session")
def postgres_schema() -> Iterator[str]:
    """A fresh schema in the PostgreSQL test database, dropped at the end of the session."""
    schema = f"lp_test_{os.getpid()}_{secrets.token_hex(3)}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    yield schema
    dispose_engines()
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def make_database(backend: str, tmp_dir: Path, request: pytest.FixtureRequest) -> str:
    """A migrated, empty database URL for `backend`."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_dir / 'latprune.db'}"
    else:
        url = postgres_schema_url(request.getfixturevalue("postgres_schema"))
    upgrade(url)
    return url


@dataclass
class Recorder:
    """Stands in for the broker in API tests: remembers every task sent."""

    sent: list[tuple[str, list, str]] = field(default_factory=list)
    fail: bool = False

    def __call__(self, task: str, args: list, queue: str) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append((task, args, queue))


@dataclass
class Env:
    client: TestClient
    settings: Settings
    recorder: Recorder
    database_url: str

    def key(self, tenant: str | None = None, admin: bool = False) -> dict[str, str]:
        """Authorization headers of a new key (a new tenant unless named)."""
        with session_scope(self.database_url) as session:
            key, _ = create_key(session, tenant or f"t-{secrets.token_hex(4)}", is_admin=admin)
        return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """An app on a migrated database of each backend, with a recording dispatcher."""
    home = tmp_path_factory.mktemp(f"home-{request.param}")
    url = make_database(request.param, home, request)
    settings = Settings(home=home, database_url=url, broker_url="memory://", max_upload_bytes=2_000_000)
    recorder = Recorder()
    with TestClient(create_app(settings, dispatch=recorder)) as client:
        yield Env(client, settings, recorder, url)
    dispose_engines()


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet20 weights, good and bad: wrong shapes, NaN, pickle, truncated."""
    import torch

    from pruning import zoo

    out = tmp_path_factory.mktemp("weights")
    model = zoo.build_model("resnet20", num_classes=10)
    zoo.save_weights(model, out / "good.safetensors")
    zoo.save_weights(zoo.build_model("resnet20", num_classes=5), out / "shapes.safetensors")
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    zoo.save_weights(model, out / "nan.safetensors")
    torch.save(model.state_dict(), out / "pickle.safetensors")
    data = (out / "good.safetensors").read_bytes()
    (out / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    return out


@dataclass
class Live:
    url: str
    settings: Settings
    recorder: Recorder


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The app served over real HTTP by uvicorn in a thread (SQLite), for the client and the CLI."""
    import socket
    import threading
    import time

    import uvicorn

    home = tmp_path_factory.mktemp("live")
    url = f"sqlite:///{home / 'latprune.db'}"
    upgrade(url)
    settings = Settings(home=home, database_url=url, broker_url="memory://")
    recorder = Recorder()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings, dispatch=recorder), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield Live(f"http://127.0.0.1:{port}", settings, recorder)
    server.should_exit = True
    thread.join(timeout=10)
