"""POST/GET /v1/jobs: validation with messages that name the field, idempotency, paging, cancel, events."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from service.db import session_scope
from service.models import Job, JobEvent

JOB = {"method": "l1", "arch": "resnet20", "dataset": "synthetic:4x16", "budget": {"kind": "flops", "value": 0.5},
       "epochs": 1}


def submit(env, headers, **changes):  # noqa: ANN001
    return env.client.post("/v1/jobs", headers=headers, json={**JOB, **changes})


def job_rows(env) -> int:  # noqa: ANN001
    with session_scope(env.database_url) as s:
        return s.scalar(select(func.count()).select_from(Job))


def test_submit_queues_the_job(env):
    headers = env.key()
    r = submit(env, headers, params={"allocation": "uniform"})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "queued" and job["progress"] == 0
    assert job["params"] == {"allocation": "uniform", "round_to": 1}
    assert env.recorder.sent[-1] == ("prune.run", [job["id"]], "prune")
    got = env.client.get(f"/v1/jobs/{job['id']}", headers=headers).json()
    assert got["budget"] == {"kind": "flops", "value": 0.5, "device_id": None}
    assert got["dataset"] == "synthetic:4x16"


@pytest.mark.parametrize(("changes", "needle"), [
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"arch": "resnet21"}, "unknown architecture 'resnet21'"),
    ({"budget": {"kind": "flops", "value": 1.5}}, "fraction of the dense model"),
    ({"budget": {"kind": "watts", "value": 3}}, "budget"),
    ({"budget": {"kind": "latency_ms", "value": 3}}, "needs device_id"),
    ({"budget": {"kind": "macs", "value": -1}}, "greater than 0"),
    ({"dataset": "imagefolder:../../etc"}, "'..'"),
    ({"dataset": "synthetic:abc"}, "synthetic:<classes>x<resolution>"),
    ({"dataset": "ftp:x"}, "unknown dataset scheme"),
    ({"epochs": -1}, "epochs"),
    ({"surprise": 1}, "surprise"),
])
def test_bad_job_rejected_without_a_row(env, changes, needle):
    before, sent = job_rows(env), len(env.recorder.sent)
    r = submit(env, env.key(), **changes)
    assert r.status_code == 422, r.text
    assert needle in json.dumps(r.json())
    assert job_rows(env) == before and len(env.recorder.sent) == sent


def test_bad_param_names_the_field(env):
    r = submit(env, env.key(), params={"allocation": "random"})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail[0]["loc"] == ["body", "params", "allocation"]
    r = submit(env, env.key(), params={"round_too": 8})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "params", "round_too"]


def test_latency_budget_needs_own_device(env):
    mine, other = env.key(), env.key()
    theirs = env.client.post("/v1/devices", headers=other, json={"name": "cpu"}).json()
    r = submit(env, mine, budget={"kind": "latency_ms", "value": 2.0, "device_id": theirs["id"]})
    assert r.status_code == 404
    own = env.client.post("/v1/devices", headers=mine, json={"name": "cpu"}).json()
    r = submit(env, mine, budget={"kind": "latency_ms", "value": 2.0, "device_id": own["id"]})
    assert r.status_code == 201 and r.json()["budget"]["device_id"] == own["id"]


def test_model_must_match_arch(env, weights_dir):
    headers = env.key()
    with open(weights_dir / "good.safetensors", "rb") as f:
        model = env.client.post("/v1/models", headers=headers, data={"arch": "resnet20"},
                                files={"weights": ("w.safetensors", f)}).json()
    r = submit(env, headers, arch="resnet32", model_id=model["id"])
    assert r.status_code == 422 and "is a resnet20" in r.json()["detail"]
    assert submit(env, headers, model_id=model["id"], dataset="synthetic:10x32").status_code == 201


def test_idempotency_key(env):
    headers = env.key()
    first = submit(env, {**headers, "Idempotency-Key": "abc"})
    again = submit(env, {**headers, "Idempotency-Key": "abc"})
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    assert [t for t in env.recorder.sent if t[1] == [first.json()["id"]]] == [("prune.run", [first.json()["id"]],
                                                                               "prune")]
    changed = submit(env, {**headers, "Idempotency-Key": "abc"}, epochs=3)
    assert changed.status_code == 409 and "different request" in changed.json()["detail"]
    # Keys are per tenant: another tenant's "abc" is a new job.
    other = submit(env, {**env.key(), "Idempotency-Key": "abc"})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]


def test_list_pages_and_filters(env):
    headers = env.key()
    ids = [submit(env, headers).json()["id"] for _ in range(3)]
    env.client.post(f"/v1/jobs/{ids[0]}/cancel", headers=headers)
    page = env.client.get("/v1/jobs?limit=2", headers=headers).json()
    assert page["total"] == 3 and [j["id"] for j in page["items"]] == [ids[2], ids[1]]
    page2 = env.client.get("/v1/jobs?limit=2&offset=2", headers=headers).json()
    assert [j["id"] for j in page2["items"]] == [ids[0]]
    cancelled = env.client.get("/v1/jobs?state=cancelled", headers=headers).json()
    assert [j["id"] for j in cancelled["items"]] == [ids[0]]
    assert env.client.get("/v1/jobs?state=bogus", headers=headers).status_code == 422


def test_cancel(env):
    headers = env.key()
    queued = submit(env, headers).json()
    r = env.client.post(f"/v1/jobs/{queued['id']}/cancel", headers=headers)
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    again = env.client.post(f"/v1/jobs/{queued['id']}/cancel", headers=headers)
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    running = submit(env, headers).json()
    with session_scope(env.database_url) as s:
        s.get(Job, running["id"]).state = "running"
    r = env.client.post(f"/v1/jobs/{running['id']}/cancel", headers=headers)
    # A running job stops when its worker next checks the flag.
    assert r.json()["state"] == "running" and r.json()["cancel_requested"] is True


def test_events_stream(env):
    headers = env.key()
    job = submit(env, headers).json()
    with session_scope(env.database_url) as s:
        s.add_all([JobEvent(job_id=job["id"], kind="progress", data={"fraction": 0.5}),
                   JobEvent(job_id=job["id"], kind="state", data={"state": "succeeded"})])
        s.get(Job, job["id"]).state = "succeeded"
    with env.client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=headers) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    blocks = [b for b in text.split("\n\n") if b.strip()]
    events = [next(line for line in b.splitlines() if line.startswith("event: ")) for b in blocks]
    assert events == ["event: progress", "event: state", "event: end"]
    assert json.loads(blocks[0].splitlines()[2].removeprefix("data: ")) == {"fraction": 0.5}
    first_id = int(blocks[0].splitlines()[0].removeprefix("id: "))
    resumed = env.client.get(f"/v1/jobs/{job['id']}/events", headers={**headers, "Last-Event-ID": str(first_id)})
    assert "event: progress" not in resumed.text and "event: state" in resumed.text


def test_broker_down_gives_503_and_a_failed_job(env):
    headers = env.key()
    env.recorder.fail = True
    try:
        r = submit(env, headers)
    finally:
        env.recorder.fail = False
    assert r.status_code == 503 and "broker" in r.json()["detail"]
    jobs = env.client.get("/v1/jobs", headers=headers).json()["items"]
    assert jobs[0]["state"] == "failed" and "could not queue" in jobs[0]["error"]


def test_oversized_json_body(env):
    headers = {**env.key(), "Content-Type": "application/json"}
    big = env.settings.max_body_bytes + 10
    r = env.client.post("/v1/jobs", headers=headers, content=b" " * big)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    streamed = env.client.post("/v1/jobs", headers=headers, content=iter([b" " * 65536] * (big // 65536 + 1)))
    assert streamed.status_code == 413 and "limit" in streamed.json()["detail"]
