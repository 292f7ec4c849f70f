"""Devices: register, list, profile (queued on the device's own queue), predictors."""

from __future__ import annotations

from service.db import session_scope
from service.models import Predictor


def test_register_and_list(env):
    headers = env.key()
    r = env.client.post("/v1/devices", headers=headers, json={"name": "edge-1", "threads": 2,
                                                               "latency_budget_ms": 3.5})
    assert r.status_code == 201, r.text
    device = r.json()
    assert device["queue"] == f"profile.device-{device['id']}" and device["spec"]["threads"] == 2
    assert device["latency_budget_ms"] == 3.5 and device["fingerprint"] is None
    assert [d["name"] for d in env.client.get("/v1/devices", headers=headers).json()] == ["edge-1"]
    assert env.client.get(f"/v1/devices/{device['id']}", headers=headers).json()["name"] == "edge-1"
    dup = env.client.post("/v1/devices", headers=headers, json={"name": "edge-1"})
    assert dup.status_code == 409 and "already exists" in dup.json()["detail"]


def test_bad_device_specs(env):
    headers = env.key()
    for body, needle in [({"name": "Bad Name"}, "name"), ({"name": "x", "provider": "warp"}, "provider"),
                         ({"name": "x", "precision": "fp16"}, "fp16"), ({"name": "x", "threads": 0}, "threads"),
                         ({"name": "x", "resolutions": [2]}, "resolutions")]:
        r = env.client.post("/v1/devices", headers=headers, json=body)
        assert r.status_code == 422 and needle in r.text, body
    assert env.client.get("/v1/devices", headers=headers).json() == []


def test_profile_queues_on_device_queue(env):
    headers = env.key()
    device = env.client.post("/v1/devices", headers=headers, json={"name": "cpu1"}).json()
    r = env.client.post(f"/v1/devices/{device['id']}/profile", headers=headers,
                        json={"arch": "resnet20", "samples": 40})
    assert r.status_code == 202, r.text
    predictor = r.json()
    assert predictor["state"] == "queued" and predictor["resolution"] == 32
    assert env.recorder.sent[-1] == ("profile.run", [predictor["id"]], device["queue"])
    with session_scope(env.database_url) as s:
        row = s.get(Predictor, predictor["id"])
        row.state, row.metrics = "ready", {"mape": 0.04}
    listed = env.client.get(f"/v1/devices/{device['id']}/predictors", headers=headers).json()
    assert [(p["id"], p["state"], p["metrics"]) for p in listed] == [(predictor["id"], "ready", {"mape": 0.04})]
    bad = env.client.post(f"/v1/devices/{device['id']}/profile", headers=headers, json={"arch": "nope"})
    assert bad.status_code == 422 and "unknown architecture" in bad.json()["detail"]
    few = env.client.post(f"/v1/devices/{device['id']}/profile", headers=headers,
                          json={"arch": "resnet20", "samples": 1})
    assert few.status_code == 422 and "samples" in few.text
