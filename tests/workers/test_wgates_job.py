"""wgates through the service: POST /v1/jobs with a latency budget on a profiled device, run by a real worker."""

from __future__ import annotations

import pytest

# Every test here runs real workers or jobs: seconds to minutes each.
pytestmark = pytest.mark.slow


def test_wgates_latency_budget_job_through_the_service(redis_stack):
    c, h = redis_stack.client, redis_stack.headers
    device, fitted = redis_stack.profiled_device("e2e")

    bad = redis_stack.client.post("/v1/jobs", headers=h, json={
        "method": "wgates", "arch": "resnet20", "dataset": "synthetic:4x16", "params": {"gate_lr": -1},
        "budget": {"kind": "latency_ms", "value": fitted["reference_ms"], "device_id": device["id"]}})
    assert bad.status_code == 422 and "gate_lr" in bad.text

    # At 16x16 most of resnet20's latency is per-layer overhead: 90% of dense is reachable, and below it.
    budget_ms = 0.9 * fitted["reference_ms"]
    job = redis_stack.submit(method="wgates", params={"hidden": 8},
                             budget={"kind": "latency_ms", "value": budget_ms, "device_id": device["id"]})
    done = redis_stack.wait_state(job["id"], ("succeeded", "failed", "cancelled"), timeout_s=240)
    assert done["state"] == "succeeded", done["error"]
    report = done["report"]
    assert report["method"] == "wgates" and report["params"]["hidden"] == 8
    assert report["method_info"]["steps"] > 0 and report["method_info"]["score_scale"] == "global"
    section = report["latency_ms"]
    # The worker is the device here, so the pipeline re-measured the pruned model on it.
    assert section["target"] == budget_ms and section["measurements"][0]["action"] == "initial"
    assert report["keep_counts"] == section["measurements"][-1]["keep_counts"]
    (subnet,) = c.get(f"/v1/jobs/{job['id']}/subnets", headers=h).json()
    assert subnet["latency"][str(device["id"])]["measured_ms"] > 0
