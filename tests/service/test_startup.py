"""The API process stays free of torch: start-up, the methods list, a device registration, job submission."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_api_process_does_not_import_torch(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from fastapi.testclient import TestClient
        from service.app import create_app
        from service.auth import create_key
        from service.db import session_scope
        from service.migrate import upgrade
        from service.settings import Settings

        settings = Settings(home={str(tmp_path)!r}, broker_url="memory://")
        upgrade(settings.database_url)
        with session_scope(settings.database_url) as s:
            key, _ = create_key(s, "t")
        client = TestClient(create_app(settings, dispatch=lambda *a: None))
        headers = {{"Authorization": "Bearer " + key}}
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/methods", headers=headers).json()[0]["name"]
        assert client.post("/v1/devices", headers=headers, json={{"name": "d"}}).status_code == 201
        job = {{"method": "l1", "arch": "resnet20", "dataset": "builtin:digits",
               "budget": {{"kind": "flops", "value": 0.5}}}}
        assert client.post("/v1/jobs", headers=headers, json=job).status_code == 201
        bad = client.post("/v1/jobs", headers=headers, json={{**job, "dataset": "imagefolder:../etc"}})
        assert bad.status_code == 422, bad.text
        print("TORCH" if "torch" in sys.modules else "NO-TORCH")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "NO-TORCH"


def test_methods_listing(env):
    methods = env.client.get("/v1/methods", headers=env.key()).json()
    l1 = next(m for m in methods if m["name"] == "l1")
    assert "L1" in l1["description"] and "allocation" in l1["params_schema"]["properties"]


def test_openapi_has_examples(env):
    spec = env.client.get("/openapi.json").json()
    assert "/v1/jobs/{job_id}/checkpoint" in spec["paths"]
    assert spec["components"]["schemas"]["JobCreate"]["examples"]


@pytest.mark.slow
def test_cohort_prediction_does_not_import_torch(tmp_path):
    from latency.device import DeviceSpec
    from service.auth import create_key
    from service.db import session_scope
    from service.migrate import upgrade
    from service.models import Device, Job, Predictor, Subnet
    from service.settings import Settings
    from service.storage import ArtifactStore
    from tests.workers.test_cohort_job import save_random_predictor

    # The rows and the predictor file are made here (this process may import torch); the API runs in a fresh one.
    settings = Settings(home=tmp_path, broker_url="memory://")
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as s:
        key, row = create_key(s, "t")
        device = Device(tenant_id=row.tenant_id, name="late", spec=DeviceSpec(name="late").model_dump(),
                        queue="profile.late")
        s.add(device)
        s.flush()
        job = Job(tenant_id=row.tenant_id, state="succeeded", method="ofa", arch="resnet20", dataset="synthetic:4x16",
                  budget_kind="flops", budget_value=0.5, epochs=1, params={}, request={}, request_hash="h",
                  report={"members": [{"id": i, "keep_counts": [8 - i] * 12} for i in range(2)]})
        s.add(job)
        s.flush()
        s.add_all([Subnet(job_id=job.id, member=i, arch_json={}, widths={}, resolution=16, macs=100 - i, params=10,
                          accuracy=0.5, latency={}) for i in range(2)])
        s.add(Predictor(device_id=device.id, arch="resnet20", resolution=16, samples_requested=10, state="ready",
                        path="predictors/late-16"))
        job_id, device_id = job.id, device.id
    save_random_predictor(ArtifactStore(settings.artifact_dir), "predictors/late-16", "late", [16])
    script = textwrap.dedent(f"""
        import sys
        from fastapi.testclient import TestClient
        from service.app import create_app
        from service.settings import Settings

        settings = Settings(home={str(tmp_path)!r}, broker_url="memory://")
        client = TestClient(create_app(settings, dispatch=lambda *a: None))
        r = client.post("/v1/jobs/{job_id}/subnets/predict?device=late", headers={{"Authorization": "Bearer {key}"}})
        assert r.status_code == 200, r.text
        assert r.json()["predicted"] == [0, 1], r.text
        assert all(m["latency"]["{device_id}"]["predicted_ms"] > 0 for m in r.json()["members"]), r.text
        print("TORCH" if "torch" in sys.modules else "NO-TORCH")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "NO-TORCH"
