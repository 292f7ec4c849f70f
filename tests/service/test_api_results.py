"""Subnets and checkpoint selection: the most accurate member within the device's budget, else 409."""

from __future__ import annotations

import hashlib

from service.db import session_scope
from service.models import Artifact, Job, Subnet
from service.routes_results import pick_subnet
from service.storage import ArtifactStore

JOB = {"method": "l1", "arch": "resnet20", "dataset": "builtin:digits", "budget": {"kind": "flops", "value": 0.5}}


def _cohort(env, headers, members, state="succeeded", budget=None):  # noqa: ANN001
    """A job whose cohort has `members` as (accuracy, {device id: (predicted, measured)}) plus files."""
    job = env.client.post("/v1/jobs", headers=headers, json={**JOB, **({"budget": budget} if budget else {})})
    job_id = job.json()["id"]
    store = ArtifactStore(env.settings.artifact_dir)
    with session_scope(env.database_url) as s:
        s.get(Job, job_id).state = state
        for i, (accuracy, latency) in enumerate(members):
            subnet = Subnet(job_id=job_id, member=i, arch_json={"arch": "resnet20"}, widths={"conv1": 16 - i},
                            resolution=32, macs=1000 - i, params=100 - i, accuracy=accuracy,
                            latency={str(d): {"predicted_ms": p, "measured_ms": m} for d, (p, m) in latency.items()})
            s.add(subnet)
            s.flush()
            src = env.settings.home / f"src-{job_id}-{i}.onnx"
            src.write_bytes(f"onnx {job_id} {i}".encode())
            stored = store.put_file(src, f"test/jobs/{job_id}/{i}/model.onnx")
            s.add(Artifact(subnet_id=subnet.id, format="onnx", path=stored.path, sha256=stored.sha256,
                           size_bytes=stored.size_bytes))
    return job_id


def test_checkpoint_picks_most_accurate_fitting_member(env):
    headers = env.key()
    fast = env.client.post("/v1/devices", headers=headers, json={"name": "fast", "latency_budget_ms": 2.0}).json()
    slow = env.client.post("/v1/devices", headers=headers, json={"name": "slow", "latency_budget_ms": 2.0}).json()
    f, sl = fast["id"], slow["id"]
    job = _cohort(env, headers, [
        (0.90, {f: (1.0, 1.1), sl: (3.0, 3.2)}),
        (0.80, {f: (0.5, None), sl: (1.5, 1.9)}),
        (0.95, {f: (2.5, 2.6), sl: (5.0, 5.5)}),
    ])
    subnets = env.client.get(f"/v1/jobs/{job}/subnets", headers=headers).json()
    assert [s["member"] for s in subnets] == [0, 1, 2]
    assert subnets[1]["latency"][str(f)] == {"predicted_ms": 0.5, "measured_ms": None}
    assert subnets[0]["artifacts"][0]["format"] == "onnx"

    r = env.client.get(f"/v1/jobs/{job}/checkpoint?device=fast", headers=headers)
    assert r.status_code == 200, r.text
    assert r.content == f"onnx {job} 0".encode()
    assert r.headers["x-checkpoint-sha256"] == hashlib.sha256(r.content).hexdigest()
    assert r.headers["x-subnet-member"] == "0"
    # On the slow device only member 1 (1.9 ms measured) fits 2 ms.
    r = env.client.get(f"/v1/jobs/{job}/checkpoint?device={sl}", headers=headers)
    assert r.headers["x-subnet-member"] == "1"
    # A looser budget in the query admits the most accurate member.
    r = env.client.get(f"/v1/jobs/{job}/checkpoint?device=fast&latency_ms=3", headers=headers)
    assert r.headers["x-subnet-member"] == "2"
    r = env.client.get(f"/v1/jobs/{job}/checkpoint?device=slow&latency_ms=0.5", headers=headers)
    assert r.status_code == 409 and "fastest takes 1.9 ms" in r.json()["detail"]
    # Asked for, the fastest member comes instead, flagged; a fitting one carries no flag.
    r = env.client.get(f"/v1/jobs/{job}/checkpoint?device=slow&latency_ms=0.5&over_budget=fastest", headers=headers)
    assert r.status_code == 200 and r.headers["x-subnet-member"] == "1"
    assert "fastest takes 1.9 ms" in r.headers["x-over-budget"]
    r = env.client.get(f"/v1/jobs/{job}/checkpoint?device=fast&over_budget=fastest", headers=headers)
    assert r.headers["x-subnet-member"] == "0" and "x-over-budget" not in r.headers
    bad = env.client.get(f"/v1/jobs/{job}/checkpoint?device=fast&over_budget=closest", headers=headers)
    assert bad.status_code == 422 and "refuse" in bad.text
    missing = env.client.get(f"/v1/jobs/{job}/checkpoint?device=fast&format=safetensors", headers=headers)
    assert missing.status_code == 409 and "no safetensors file" in missing.json()["detail"]
    assert env.client.get(f"/v1/jobs/{job}/checkpoint?device=nope", headers=headers).status_code == 404


def test_checkpoint_uses_the_jobs_own_latency_budget(env):
    headers = env.key()
    d = env.client.post("/v1/devices", headers=headers, json={"name": "dev"}).json()["id"]
    job = _cohort(env, headers, [(0.9, {d: (1.0, 1.5)}), (0.7, {d: (0.8, 0.9)})],
                  budget={"kind": "latency_ms", "value": 1.0, "device_id": d})
    r = env.client.get(f"/v1/jobs/{job}/checkpoint?device={d}", headers=headers)
    assert r.headers["x-subnet-member"] == "1"


def test_checkpoint_needs_a_finished_job(env):
    headers = env.key()
    d = env.client.post("/v1/devices", headers=headers, json={"name": "dev"}).json()["id"]
    job = _cohort(env, headers, [(0.9, {})], state="running")
    r = env.client.get(f"/v1/jobs/{job}/checkpoint?device={d}", headers=headers)
    assert r.status_code == 409 and "is running" in r.json()["detail"]


def test_pick_subnet_rules():
    def subnet(acc, ms, macs=10):  # noqa: ANN001, ANN202
        return Subnet(member=0, accuracy=acc, macs=macs, latency={"1": {"predicted_ms": ms, "measured_ms": None}})

    a, b = subnet(0.9, 2.0), subnet(0.8, 1.0)
    assert pick_subnet([a, b], 1, None, 0.1)[0] is a
    assert pick_subnet([a, b], 1, 1.5, 0.1)[0] is b
    # Within the measurement tolerance a member still fits.
    assert pick_subnet([a, b], 1, 1.9, 0.1)[0] is a
    assert pick_subnet([a, b], 2, 1.0, 0.1)[1].startswith("no subnet has a measured or predicted latency")
    assert pick_subnet([], 1, 1.0, 0.1)[1] == "the job produced no subnets"


def test_subnets_carry_their_pareto_fronts_per_device(env):
    headers = env.key()
    f = env.client.post("/v1/devices", headers=headers, json={"name": "pf-fast"}).json()["id"]
    s = env.client.post("/v1/devices", headers=headers, json={"name": "pf-slow"}).json()["id"]
    job = _cohort(env, headers, [
        (0.90, {f: (1.0, 1.1), s: (3.0, 3.2)}),
        (0.80, {f: (0.5, None), s: (1.5, 1.9)}),
        (0.95, {f: (2.5, 2.6), s: (5.0, 5.5)}),
        (0.85, {f: (3.0, 3.0), s: (6.0, 6.0)}),  # slower and less accurate than member 0 everywhere
    ])
    subnets = env.client.get(f"/v1/jobs/{job}/subnets", headers=headers).json()
    fronts = {sub["member"]: sub["pareto_front"] for sub in subnets}
    assert fronts == {0: [str(f), str(s)], 1: [str(f), str(s)], 2: ["macs", str(f), str(s)], 3: ["macs"]}
