"""Cohort endpoints: members with Pareto fronts per device, the plot, predictions for a later device, selection."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from service.db import session_scope
from service.models import Artifact, Job, Predictor, Subnet
from service.storage import ArtifactStore
from tests.workers.test_cohort_job import save_random_predictor

JOB = {"method": "ofa", "arch": "resnet20", "dataset": "synthetic:4x16", "budget": {"kind": "flops", "value": 0.5},
       "params": {"budgets": [0.6, 0.3], "resolutions": [16, 12]}}
GROUPS = 12  # resnet20's channel groups


def make_cohort(env, headers, members, state="succeeded"):  # noqa: ANN001
    """A job whose subnets are `members`: (resolution, accuracy, macs, {device id: (predicted, measured)})."""
    r = env.client.post("/v1/jobs", headers=headers, json=JOB)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    with session_scope(env.database_url) as s:
        job = s.get(Job, job_id)
        job.state = state
        job.report = {"members": [{"id": i, "keep_counts": [8 - i % 4] * GROUPS} for i in range(len(members))]}
        for i, (resolution, accuracy, macs, latency) in enumerate(members):
            s.add(Subnet(job_id=job_id, member=i, arch_json={"arch": "resnet20"}, widths={}, resolution=resolution,
                         macs=macs, params=1000 - i, accuracy=accuracy,
                         latency={str(d): {"predicted_ms": p, "measured_ms": m} for d, (p, m) in latency.items()}))
    return job_id


def device(env, headers, name, budget=None):  # noqa: ANN001
    body = {"name": name, **({"latency_budget_ms": budget} if budget else {})}
    r = env.client.post("/v1/devices", headers=headers, json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_cohort_lists_members_and_the_front_per_device(env):
    headers = env.key()
    a, b = device(env, headers, "phone"), device(env, headers, "laptop")
    job = make_cohort(env, headers, [
        (16, 0.95, 900, {a: (10.0, None), b: (2.0, 2.5)}),
        (12, 0.93, 500, {a: (6.0, None), b: (1.0, None)}),
        (16, 0.90, 600, {a: (7.0, None)}),  # dominated on MACs and on the phone
        (12, 0.85, 300, {a: (3.0, None), b: (1.2, None)}),  # slower than member 1 on the laptop
    ])
    r = env.client.get(f"/v1/jobs/{job}/cohort", headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [m["member"] for m in body["members"]] == [0, 1, 2, 3]
    assert body["members"][0]["latency"][str(b)] == {"predicted_ms": 2.0, "measured_ms": 2.5}
    fronts = {f["key"]: (f["device_name"], f["members"]) for f in body["pareto"]}
    assert fronts == {"macs": (None, [3, 1, 0]), str(a): ("phone", [3, 1, 0]), str(b): ("laptop", [1, 0])}
    assert env.client.get(f"/v1/jobs/{job}/cohort", headers=env.key()).status_code == 404


def test_checkpoint_goes_to_each_devices_best_member_or_409(env):
    headers = env.key()
    roomy, tight, tiny = (device(env, headers, n, budget) for n, budget in (("roomy", 20.0), ("tight", 6.5),
                                                                            ("tiny", 0.5)))
    members = []
    for resolution, accuracy, macs, ms in ((16, 0.95, 900, 10.0), (12, 0.93, 500, 6.0), (12, 0.85, 300, 3.0)):
        latency = {d: (ms, None) for d in (roomy, tight, tiny)}
        members.append((resolution, accuracy, macs, latency))
    job = make_cohort(env, headers, members)
    store = ArtifactStore(env.settings.artifact_dir)
    with session_scope(env.database_url) as s:
        for subnet in s.scalars(select(Subnet).where(Subnet.job_id == job)):
            src = env.settings.home / f"cohort-{job}-{subnet.member}.onnx"
            src.write_bytes(f"member {subnet.member}".encode())
            stored = store.put_file(src, f"test/cohort/{job}/{subnet.member}/model.onnx")
            s.add(Artifact(subnet_id=subnet.id, format="onnx", path=stored.path, sha256=stored.sha256,
                           size_bytes=stored.size_bytes))
    picks = {}
    for name in ("roomy", "tight", "tiny"):
        r = env.client.get(f"/v1/jobs/{job}/checkpoint?device={name}", headers=headers)
        picks[name] = r.headers.get("x-subnet-member") if r.status_code == 200 else r.status_code
    assert picks == {"roomy": "0", "tight": "1", "tiny": 409}
    r = env.client.get(f"/v1/jobs/{job}/checkpoint?device=tiny&latency_ms=3.5", headers=headers)
    assert r.headers["x-subnet-member"] == "2" and r.content == b"member 2"


def test_pareto_png(env):
    headers = env.key()
    a = device(env, headers, "board")
    job = make_cohort(env, headers, [(16, 0.9, 900, {a: (5.0, None)}), (12, 0.8, 400, {a: (2.0, 2.2)})])
    for query in ("", "?device=board", f"?device={a}"):
        r = env.client.get(f"/v1/jobs/{job}/pareto.png{query}", headers=headers)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert env.client.get(f"/v1/jobs/{job}/pareto.png?device=nope", headers=headers).status_code == 404
    empty = make_cohort(env, headers, [], state="running")
    r = env.client.get(f"/v1/jobs/{empty}/pareto.png", headers=headers)
    assert r.status_code == 409 and "no evaluated subnets" in r.json()["detail"]


@pytest.mark.slow
def test_predictions_for_a_device_registered_after_the_job(env):
    headers = env.key()
    old = device(env, headers, "old")
    job = make_cohort(env, headers, [(16, 0.9, 900, {old: (5.0, 5.5)}), (12, 0.8, 400, {old: (2.0, None)}),
                                     (16, 0.7, 300, {old: (1.5, None)})])
    late = device(env, headers, "late")
    r = env.client.post(f"/v1/jobs/{job}/subnets/predict?device=late", headers=headers)
    assert r.status_code == 409 and "profile it first" in r.json()["detail"]

    store = ArtifactStore(env.settings.artifact_dir)
    save_random_predictor(store, f"predictors/late-{late}-16", "late", [16])
    with session_scope(env.database_url) as s:
        s.add(Predictor(device_id=late, arch="resnet20", resolution=16, samples_requested=10, state="ready",
                        path=f"predictors/late-{late}-16"))
    r = env.client.post(f"/v1/jobs/{job}/subnets/predict?device={late}", headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["predicted"] == [0, 2] and body["missing_resolutions"] == [12]
    by_member = {m["member"]: m["latency"] for m in body["members"]}
    assert by_member[0][str(old)] == {"predicted_ms": 5.0, "measured_ms": 5.5}  # other devices untouched
    assert by_member[0][str(late)]["predicted_ms"] > 0 and str(late) not in by_member[1]
    assert {f["key"] for f in body["pareto"]} == {"macs", str(old), str(late)}
    running = make_cohort(env, headers, [(16, 0.9, 900, {})], state="running")
    r = env.client.post(f"/v1/jobs/{running}/subnets/predict?device=late", headers=headers)
    assert r.status_code == 409 and "running" in r.json()["detail"]
