"""Task and queue names live in service.contracts: devices of the same name in two tenants get their own queues,
and the API sends tasks without importing the workers' Celery app, tasks or torch."""

from __future__ import annotations

import subprocess
import sys

from fastapi.testclient import TestClient
from sqlalchemy import text

from service.app import create_app
from service.auth import create_key
from service.contracts import PROFILE_TASK, profile_queue
from service.db import dispose_engines, session_scope
from service.migrate import upgrade
from service.settings import Settings
from tests.workers.conftest import ROOT


def test_same_device_name_in_two_tenants_gets_two_queues(tmp_path):
    settings = Settings(home=tmp_path, broker_url="memory://")
    upgrade(settings.database_url)
    sent: list = []
    with session_scope(settings.database_url) as session:
        keys = [create_key(session, tenant)[0] for tenant in ("tenant-a", "tenant-b")]
    try:
        with TestClient(create_app(settings, dispatch=lambda *task: sent.append(task))) as client:
            devices = []
            for key in keys:
                headers = {"Authorization": f"Bearer {key}"}
                r = client.post("/v1/devices", headers=headers, json={"name": "cpu"})
                assert r.status_code == 201, r.text
                device = r.json()
                assert device["queue"] == profile_queue(device["id"])
                assert client.get(f"/v1/devices/{device['id']}", headers=headers).json()["queue"] == device["queue"]
                r = client.post(f"/v1/devices/{device['id']}/profile", headers=headers,
                                json={"arch": "resnet20", "samples": 40})
                assert r.status_code == 202, r.text
                devices.append(device)
    finally:
        dispose_engines()
    queues = [d["queue"] for d in devices]
    assert len(set(queues)) == 2  # tenant B's profiling never reaches the worker of tenant A's "cpu"
    assert [(task, queue) for task, _, queue in sent] == [(PROFILE_TASK, q) for q in queues]


def test_migration_moves_existing_devices_to_their_id_queue(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url, "0001")
    with session_scope(url) as session:
        session.execute(text("INSERT INTO tenant (id, name, created_at) VALUES (1, 'a', '2026-01-01'), "
                             "(2, 'b', '2026-01-01')"))
        session.execute(text("INSERT INTO device (id, tenant_id, name, spec, queue, created_at) VALUES "
                             "(5, 1, 'cpu', '{}', 'profile.cpu', '2026-01-01'), "
                             "(9, 2, 'cpu', '{}', 'profile.cpu', '2026-01-01')"))
    upgrade(url)
    with session_scope(url) as session:
        rows = session.execute(text("SELECT id, queue FROM device ORDER BY id")).all()
    dispose_engines()
    assert [tuple(r) for r in rows] == [(5, "profile.device-5"), (9, "profile.device-9")]


def test_api_sends_tasks_without_the_workers_celery_modules(tmp_path):
    code = f"""
import sys
from service.app import create_app
from service.settings import Settings
from service.migrate import upgrade
settings = Settings(home={str(tmp_path)!r})
upgrade(settings.database_url)
app = create_app(settings)
app.state.latprune.dispatch("prune.run", [1], "prune")  # through the embedded broker, as POST /v1/jobs does
loaded = [m for m in ("torch", "workers.celery_app", "workers.tasks", "workers.prune_job") if m in sys.modules]
print("LOADED", loaded)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED []" in done.stdout, done.stdout
