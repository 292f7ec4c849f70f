"""Keys and tenants: 401 without a valid key, 404 for every other tenant's id, admin-only metrics."""

from __future__ import annotations

import secrets

import pytest

from service.auth import hash_key, revoke_key
from service.db import session_scope
from service.models import ApiKey, Artifact, Job, Subnet


def test_missing_wrong_and_revoked_keys(env):
    assert env.client.get("/healthz").status_code == 200
    r = env.client.get("/v1/jobs")
    assert r.status_code == 401 and "Authorization" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    assert env.client.get("/v1/jobs", headers={"Authorization": "Bearer lp_wrong"}).status_code == 401
    assert env.client.get("/v1/jobs", headers={"Authorization": "Basic abc"}).status_code == 401
    headers = env.key()
    assert env.client.get("/v1/jobs", headers=headers).status_code == 200
    key = headers["Authorization"].split()[1]
    with session_scope(env.database_url) as s:
        assert revoke_key(s, key[:10]) == 1
    r = env.client.get("/v1/jobs", headers=headers)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_only_the_hash_is_stored(env):
    headers = env.key(tenant=f"hash-{secrets.token_hex(3)}")
    key = headers["Authorization"].split()[1]
    with session_scope(env.database_url) as s:
        rows = s.query(ApiKey).all()
        assert all(key not in (r.key_hash, r.prefix, r.name) for r in rows)
        assert any(r.key_hash == hash_key(key) for r in rows)


def _populate(env, headers, weights_dir) -> dict[str, int]:  # noqa: ANN001
    c = env.client
    device = c.post("/v1/devices", headers=headers, json={"name": "d"}).json()["id"]
    with open(weights_dir / "good.safetensors", "rb") as f:
        model = c.post("/v1/models", headers=headers, data={"arch": "resnet20"},
                       files={"weights": ("w.safetensors", f)}).json()["id"]
    job = c.post("/v1/jobs", headers=headers, json={
        "method": "l1", "arch": "resnet20", "dataset": "builtin:digits", "budget": {"kind": "flops", "value": 0.5},
    }).json()["id"]
    with session_scope(env.database_url) as s:
        s.get(Job, job).state = "succeeded"
        subnet = Subnet(job_id=job, member=0, arch_json={}, widths={}, resolution=32, macs=1, params=1,
                        accuracy=0.9, latency={})
        s.add(subnet)
        s.flush()
        s.add(Artifact(subnet_id=subnet.id, format="onnx", path="x/model.onnx", sha256="0" * 64, size_bytes=1))
    return {"device": device, "model": model, "job": job}


@pytest.mark.slow
def test_tenant_isolation_on_every_endpoint(env, weights_dir):
    alice, bob = env.key(), env.key()
    ids = _populate(env, alice, weights_dir)
    d, m, j = ids["device"], ids["model"], ids["job"]
    c = env.client
    answers = [
        c.get(f"/v1/devices/{d}", headers=bob),
        c.post(f"/v1/devices/{d}/profile", headers=bob, json={"arch": "resnet20"}),
        c.get(f"/v1/devices/{d}/predictors", headers=bob),
        c.get(f"/v1/models/{m}", headers=bob),
        c.get(f"/v1/jobs/{j}", headers=bob),
        c.get(f"/v1/jobs/{j}/events", headers=bob),
        c.post(f"/v1/jobs/{j}/cancel", headers=bob),
        c.get(f"/v1/jobs/{j}/subnets", headers=bob),
        c.get(f"/v1/jobs/{j}/checkpoint?device={d}", headers=bob),
        c.post("/v1/jobs", headers=bob, json={"method": "l1", "arch": "resnet20", "dataset": "builtin:digits",
                                              "model_id": m, "budget": {"kind": "flops", "value": 0.5}}),
        c.post("/v1/jobs", headers=bob, json={"method": "l1", "arch": "resnet20", "dataset": "builtin:digits",
                                              "budget": {"kind": "latency_ms", "value": 1, "device_id": d}}),
    ]
    assert [r.status_code for r in answers] == [404] * len(answers), [r.text for r in answers]
    assert all("not found" in r.json()["detail"] for r in answers)
    for path in ("/v1/devices", "/v1/models"):
        assert c.get(path, headers=bob).json() == []
    assert c.get("/v1/jobs", headers=bob).json()["total"] == 0
    # Bob's own device of the same name is his, and Alice's job still does not exist for it.
    bob_device = c.post("/v1/devices", headers=bob, json={"name": "d"}).json()["id"]
    assert c.get(f"/v1/jobs/{j}/checkpoint?device={bob_device}", headers=bob).status_code == 404
    # The owner still sees everything.
    assert c.get(f"/v1/jobs/{j}/subnets", headers=alice).status_code == 200


def test_metrics_needs_admin(env):
    assert env.client.get("/metrics").status_code == 401
    r = env.client.get("/metrics", headers=env.key())
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    env.client.get("/v1/jobs", headers=env.key())
    text = env.client.get("/metrics", headers=env.key(admin=True)).text
    assert 'latprune_jobs{state="queued"}' in text
    assert 'latprune_http_requests_total{method="GET",route="/v1/jobs",status="200"}' in text


def test_key_cache_expires_and_is_cleared_by_revocation():
    from service.auth import KeyCache, Principal, clear_key_caches

    now = [0.0]
    cache = KeyCache(ttl_s=10, max_keys=2, clock=lambda: now[0])
    alice = Principal(key_id=1, tenant_id=1, is_admin=False)
    cache.put("a", alice)
    assert cache.get("a") == alice
    now[0] = 10.0
    assert cache.get("a") is None
    cache.put("a", alice)
    cache.put("b", alice)
    cache.put("c", alice)  # over max_keys: the oldest goes
    assert cache.get("a") is None and cache.get("c") == alice
    clear_key_caches()
    assert cache.get("c") is None
    off = KeyCache(ttl_s=0)
    off.put("a", alice)
    assert off.get("a") is None


def test_key_revoked_by_another_process_is_refused_once_the_cache_forgets_it(env):
    from sqlalchemy import update

    from service.auth import clear_key_caches
    from service.models import utcnow

    headers = env.key()
    assert env.client.get("/v1/jobs", headers=headers).status_code == 200
    key = headers["Authorization"].split()[1]
    with session_scope(env.database_url) as s:  # as the CLI would, in its own process: no cache here hears of it
        s.execute(update(ApiKey).where(ApiKey.key_hash == hash_key(key)).values(revoked_at=utcnow()))
    assert env.client.get("/v1/jobs", headers=headers).status_code == 200  # cached for up to auth_cache_s
    clear_key_caches()  # what the TTL does
    r = env.client.get("/v1/jobs", headers=headers)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
