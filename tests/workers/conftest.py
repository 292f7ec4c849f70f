"""Worker fixtures: real Celery worker processes on Redis (with PostgreSQL) and on the embedded broker."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_key
from service.db import dispose_engines, session_scope
from service.migrate import upgrade
from service.settings import Settings
from tests.service.conftest import postgres_schema, postgres_schema_url  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[2]
# Runs side by side (several checkouts on one machine) pick different Redis databases.
REDIS_TEST_DB = int(os.environ.get("LATPRUNE_TEST_REDIS_DB", "12"))
TINY_JOB = {"method": "l1", "arch": "resnet20", "dataset": "synthetic:4x16",
            "budget": {"kind": "flops", "value": 0.5}, "epochs": 1, "batch_size": 32}


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.2) -> object:
    """Poll until `predicate()` is truthy; fail the test naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


@dataclass
class Stack:
    """An API client and a live worker sharing one database, broker and artifact store."""

    client: TestClient
    settings: Settings
    headers: dict[str, str]
    worker: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    queues: str = "prune"

    def start_new_worker(self) -> None:
        """A fresh worker process (same environment and queues) in place of the current one, which must be gone."""
        assert self.worker.poll() is not None
        self.worker = start_worker(self.env, self.queues, self.log_path)

    def submit(self, **changes) -> dict:
        r = self.client.post("/v1/jobs", headers=self.headers, json={**TINY_JOB, **changes})
        assert r.status_code == 201, r.text
        return r.json()

    def job(self, job_id: int) -> dict:
        return self.client.get(f"/v1/jobs/{job_id}", headers=self.headers).json()

    def wait_state(self, job_id: int, states: tuple[str, ...], timeout_s: float = 120) -> dict:
        job = wait_for(lambda: (j := self.job(job_id))["state"] in states and j, timeout_s,
                       f"job {job_id} to reach {states}; worker log:\n{self.log_tail()}")
        return job  # type: ignore[return-value]

    def profiled_device(self, name: str, arch: str = "resnet20", resolution: int = 16, samples: int = 12,
                        timeout_s: float = 180) -> tuple[dict, dict]:
        """Register a device, profile it on the worker and wait for its predictor: (device, ready predictor)."""
        c, h = self.client, self.headers
        device = c.post("/v1/devices", headers=h, json={"name": name}).json()
        started = c.post(f"/v1/devices/{device['id']}/profile", headers=h,
                         json={"arch": arch, "resolution": resolution, "samples": samples}).json()

        def settled() -> dict | None:
            rows = c.get(f"/v1/devices/{device['id']}/predictors", headers=h).json()
            return next((p for p in rows if p["id"] == started["id"] and p["state"] in ("ready", "failed")), None)

        fitted = wait_for(settled, timeout_s, f"profiling; worker log:\n{self.log_tail()}")
        assert fitted["state"] == "ready", fitted["error"]
        return device, fitted

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:] if self.log_path.exists() else ""

    def worker_children(self) -> list[int]:
        """Pids of the worker's pool processes."""
        out = subprocess.run(["pgrep", "-P", str(self.worker.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]


def start_worker(env: dict[str, str], queues: str, log_path: Path) -> subprocess.Popen:
    """A `celery worker` process (prefork, one child) consuming `queues`."""
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", queues, "--concurrency", "1",
         "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_stack(home: Path, database_url: str, broker_url: str, queues: str,
               extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    env = {**os.environ, "LATPRUNE_HOME": str(home), "LATPRUNE_DATABASE_URL": database_url,
           "LATPRUNE_BROKER_URL": broker_url, "OMP_NUM_THREADS": "1", "LATPRUNE_PROGRESS_INTERVAL_S": "0.2",
           "LATPRUNE_CANCEL_CHECK_INTERVAL_S": "0.2", **(extra_env or {})}
    upgrade(database_url)
    settings = Settings(home=home, database_url=database_url, broker_url=broker_url)
    with session_scope(database_url) as session:
        key, _ = create_key(session, f"w-{secrets.token_hex(3)}")
    log_path = home / "worker.log"
    try:
        with TestClient(create_app(settings)) as client:
            stack = Stack(client, settings, {"Authorization": f"Bearer {key}"}, start_worker(env, queues, log_path),
                          log_path, env, queues)
            try:
                yield stack
            finally:
                stop_worker(stack.worker)  # the one running now (a test may have started another)
    finally:
        dispose_engines()


@pytest.fixture(scope="module")
def redis_stack(tmp_path_factory, request) -> Iterator[Stack]:
    """PostgreSQL + Redis (the production set-up), worker on queue prune and every device's profile queue."""
    schema = request.getfixturevalue("postgres_schema")
    broker = f"redis://127.0.0.1:6379/{REDIS_TEST_DB}"
    redis.Redis.from_url(broker).flushdb()
    yield from make_stack(tmp_path_factory.mktemp("redis-stack"), postgres_schema_url(schema), broker, "prune",
                          {"LATPRUNE_WORKER_ALL_DEVICE_QUEUES": "1"})


@pytest.fixture(scope="module")
def embedded_stack(tmp_path_factory) -> Iterator[Stack]:
    """SQLite + kombu's SQLAlchemy transport on SQLite (the one-machine default)."""
    home = tmp_path_factory.mktemp("embedded-stack")
    yield from make_stack(home, f"sqlite:///{home / 'latprune.db'}", f"sqla+sqlite:///{home / 'broker.db'}",
                          "prune")
