"""The API process stays free of torch: start-up, the methods list, a device registration, job submission."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
