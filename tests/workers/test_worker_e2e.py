"""Real workers: a tiny job end to end on Redis + PostgreSQL and on the embedded broker, cancellation, a killed
worker, profiling a device and a latency-budget job."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import onnxruntime as ort
import pytest

from tests.workers.conftest import Stack, wait_for

# Every test here runs real workers or jobs: seconds to minutes each.
pytestmark = pytest.mark.slow


def _events(stack: Stack, job_id: int) -> list[tuple[str, dict]]:
    text = stack.client.get(f"/v1/jobs/{job_id}/events?follow=false", headers=stack.headers).text
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def _check_tiny_job(stack: Stack, tmp_path) -> None:  # noqa: ANN001
    job = stack.submit()
    done = stack.wait_state(job["id"], ("succeeded", "failed", "cancelled"))
    assert done["state"] == "succeeded", done["error"]
    assert done["progress"] == 1.0 and done["attempts"] == 1 and done["report"]["pruned"]["macs"] > 0
    events = _events(stack, job["id"])
    states = [data["state"] for kind, data in events if kind == "state"]
    assert states == ["running", "succeeded"]
    stages = [data["stage"] for kind, data in events if kind == "progress"]
    assert {"dense", "prune", "finetune"} <= set(stages)
    assert any(data["loss"] is not None for kind, data in events if kind == "progress")

    device = stack.client.post("/v1/devices", headers=stack.headers, json={"name": "any"}).json()
    r = stack.client.get(f"/v1/jobs/{job['id']}/checkpoint?device={device['id']}&format=onnx",
                         headers=stack.headers)
    assert r.status_code == 200, r.text
    path = tmp_path / "model.onnx"
    path.write_bytes(r.content)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, 16, 16), np.float32)})
    assert logits.shape == (1, 4)
    subnets = stack.client.get(f"/v1/jobs/{job['id']}/subnets", headers=stack.headers).json()
    assert len(subnets) == 1 and {a["format"] for a in subnets[0]["artifacts"]} == {"onnx", "safetensors", "arch"}
    # The job's checkpoints are cleaned up once its artifacts are stored.
    assert not (stack.settings.artifact_dir / "work" / "jobs" / str(job["id"])).exists()


def test_tiny_job_on_redis_and_postgres(redis_stack, tmp_path):
    _check_tiny_job(redis_stack, tmp_path)


def test_tiny_job_on_embedded_broker(embedded_stack, tmp_path):
    _check_tiny_job(embedded_stack, tmp_path)


def test_cancel_running_job(redis_stack):
    job = redis_stack.submit(epochs=200)
    wait_for(lambda: redis_stack.job(job["id"])["progress"] > 0.01, 90, "the job to make progress")
    r = redis_stack.client.post(f"/v1/jobs/{job['id']}/cancel", headers=redis_stack.headers)
    assert r.status_code == 202
    done = redis_stack.wait_state(job["id"], ("succeeded", "failed", "cancelled"), timeout_s=60)
    assert done["state"] == "cancelled" and done["progress"] < 0.5
    assert redis_stack.client.get(f"/v1/jobs/{job['id']}/subnets", headers=redis_stack.headers).json() == []


def test_killed_worker_resumes_job(redis_stack):
    job = redis_stack.submit(epochs=12)
    wait_for(lambda: redis_stack.job(job["id"])["progress"] > 0.2, 90, "the job to pass its first epochs")
    children = redis_stack.worker_children()
    assert len(children) == 1
    os.kill(children[0], signal.SIGKILL)
    done = redis_stack.wait_state(job["id"], ("succeeded", "failed", "cancelled"), timeout_s=120)
    assert done["state"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    subnets = redis_stack.client.get(f"/v1/jobs/{job['id']}/subnets", headers=redis_stack.headers).json()
    assert len(subnets) == 1 and len(subnets[0]["artifacts"]) == 3


def test_profile_then_latency_budget_job(redis_stack, tmp_path):
    c, h = redis_stack.client, redis_stack.headers
    device, fitted = redis_stack.profiled_device("e2e", timeout_s=120)
    assert fitted["reference_ms"] > 0 and "test" in fitted["metrics"]
    held = fitted["metrics"]["held_out"]  # the console's predicted-vs-measured plot
    assert len(held["predicted_ms"]) == len(held["measured_ms"]) == fitted["metrics"]["test"]["absolute_ms"]["n"] > 0
    assert c.get(f"/v1/devices/{device['id']}", headers=h).json()["fingerprint"]["threads"] == 1

    # Above the dense model's measured latency: reachable whatever the noise of this shared machine; the job still
    # goes through LPNet, the finisher and the re-measurement.
    budget_ms = 1.25 * fitted["reference_ms"]
    job = redis_stack.submit(budget={"kind": "latency_ms", "value": budget_ms, "device_id": device["id"]})
    done = redis_stack.wait_state(job["id"], ("succeeded", "failed", "cancelled"))
    assert done["state"] == "succeeded", done["error"]
    (subnet,) = c.get(f"/v1/jobs/{job['id']}/subnets", headers=h).json()
    latency = subnet["latency"][str(device["id"])]
    assert latency["predicted_ms"] is not None and latency["measured_ms"] > 0
    # The subnet keeps the number the job was judged by, not the absolute median timed alone.
    assert done["report"]["latency_ms"]["pruned"]["drift_corrected"] == latency["measured_ms"]
    r = c.get(f"/v1/jobs/{job['id']}/checkpoint?device=e2e&latency_ms={latency['measured_ms'] * 2}", headers=h)
    assert r.status_code == 200 and r.headers["x-subnet-member"] == "0"
