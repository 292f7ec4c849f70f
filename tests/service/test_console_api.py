"""The console's server side: its page and assets, the per-member download route, the bearer scheme in OpenAPI."""

from __future__ import annotations

import hashlib
import re

from sqlalchemy import select

from service.db import session_scope
from service.models import Artifact, Subnet
from service.routes_console import ASSETS
from service.storage import ArtifactStore
from tests.service.test_api_cohort import device, make_cohort


def test_page_and_assets_come_from_the_api(env):
    r = env.client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    linked = re.findall(r'(?:src|href)="(/console/[^"]+)"', r.text)
    modules = [f"/console/js/{p.name}" for p in (ASSETS / "js").glob("*.js")]
    assert "/console/js/app.js" in linked and len(modules) >= 7
    for path in linked + modules:
        asset = env.client.get(path)
        assert asset.status_code == 200, path
        assert asset.headers["cache-control"] == "no-cache" and asset.headers.get("etag"), path
        # Nothing is fetched from elsewhere at run time: no absolute URL but the SVG namespace.
        assert not re.findall(r"https?://(?!www\.w3\.org/2000/svg)", asset.text), path
        imports = re.findall(r"from '\./([a-z]+\.js)'", asset.text)
        assert all((ASSETS / "js" / name).exists() for name in imports), (path, imports)
    again = env.client.get("/console/js/app.js", headers={"If-None-Match": asset_etag(env, "/console/js/app.js")})
    assert again.status_code == 304 and not again.content
    assert env.client.get("/console/../service/app.py").status_code == 404
    assert env.client.get("/console/js/nope.js").status_code == 404


def asset_etag(env, path: str) -> str:  # noqa: ANN001
    return env.client.get(path).headers["etag"]


def test_openapi_declares_the_bearer_scheme(env):
    spec = env.client.get("/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer") and "create-key" in scheme["description"]
    assert spec["paths"]["/v1/jobs"]["get"]["security"] == [{"apiKey": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    assert "/" not in spec["paths"]  # the console is not part of the API
    r = env.client.get("/v1/jobs", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401 and "malformed Authorization header" in r.json()["detail"]
    assert env.client.get("/v1/jobs").json()["detail"].startswith("missing Authorization header")


def _store_onnx(env, job_id: int, members: list[int]) -> dict[int, str]:  # noqa: ANN001
    store, hashes = ArtifactStore(env.settings.artifact_dir), {}
    with session_scope(env.database_url) as s:
        for subnet in s.scalars(select(Subnet).where(Subnet.job_id == job_id, Subnet.member.in_(members))):
            src = env.settings.home / f"member-{job_id}-{subnet.member}.onnx"
            src.write_bytes(f"job {job_id} member {subnet.member}".encode())
            stored = store.put_file(src, f"test/members/{job_id}/{subnet.member}/model.onnx")
            s.add(Artifact(subnet_id=subnet.id, format="onnx", path=stored.path, sha256=stored.sha256,
                           size_bytes=stored.size_bytes))
            hashes[subnet.member] = stored.sha256
    return hashes


def test_member_download(env):
    headers = env.key()
    a = device(env, headers, "watch", budget=1.0)
    job = make_cohort(env, headers, [(16, 0.95, 900, {a: (10.0, None)}), (12, 0.80, 300, {a: (0.9, None)}),
                                     (12, 0.70, 200, {a: (0.5, None)})])
    hashes = _store_onnx(env, job, [0, 1])
    for member in (0, 1):  # member 0 is over the device's budget: the checkpoint route would never send it
        r = env.client.get(f"/v1/jobs/{job}/subnets/{member}/checkpoint?format=onnx", headers=headers)
        assert r.status_code == 200, r.text
        assert r.content == f"job {job} member {member}".encode()
        assert r.headers["x-checkpoint-sha256"] == hashes[member] == hashlib.sha256(r.content).hexdigest()
        assert r.headers["x-subnet-member"] == str(member)
        assert f'filename="job{job}-subnet{member}-model.onnx"' in r.headers["content-disposition"]
    assert env.client.get(f"/v1/jobs/{job}/subnets/0/checkpoint", headers=headers).status_code == 200
    r = env.client.get(f"/v1/jobs/{job}/subnets/2/checkpoint", headers=headers)
    assert r.status_code == 409 and r.json()["detail"] == f"member 2 of job {job} has no onnx file"
    r = env.client.get(f"/v1/jobs/{job}/subnets/0/checkpoint?format=safetensors", headers=headers)
    assert r.status_code == 409 and "no safetensors file" in r.json()["detail"]
    r = env.client.get(f"/v1/jobs/{job}/subnets/7/checkpoint", headers=headers)
    assert r.status_code == 404 and r.json()["detail"] == f"job {job} has no member 7"
    assert env.client.get(f"/v1/jobs/{job}/subnets/0/checkpoint?format=pickle", headers=headers).status_code == 422
    assert env.client.get(f"/v1/jobs/{job}/subnets/-1/checkpoint", headers=headers).status_code == 422
    other = env.client.get(f"/v1/jobs/{job}/subnets/0/checkpoint", headers=env.key())
    assert other.status_code == 404 and other.json()["detail"] == f"job {job} not found"
    assert env.client.get(f"/v1/jobs/{job}/subnets/0/checkpoint").status_code == 401

    running = make_cohort(env, headers, [(16, 0.9, 900, {})], state="running")
    _store_onnx(env, running, [0])
    r = env.client.get(f"/v1/jobs/{running}/subnets/0/checkpoint", headers=headers)
    assert r.status_code == 409 and r.json()["detail"].endswith("checkpoints exist once it has succeeded")
