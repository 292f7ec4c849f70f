"""The job logic without Celery: attempts, waiting for a predictor, idempotent results, progress throttling."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.auth import create_key
from service.db import dispose_engines, session_factory, session_scope
from service.migrate import upgrade
from service.models import Artifact, Device, Job, JobEvent, Predictor, Subnet
from service.settings import Settings
from service.storage import ArtifactStore
from workers.profile_job import run_profile
from workers.progress import CancelFlag, JobProgress
from workers.prune_job import AWAITING_PREDICTOR, Started, job_work_dir, persist_results, run_job

TINY = {"method": "l1", "arch": "resnet20", "dataset": "synthetic:4x16", "epochs": 1, "batch_size": 32,
        "params": {"allocation": "global", "round_to": 1}, "seed": 0}


@pytest.fixture
def settings(tmp_path) -> Settings:
    s = Settings(home=tmp_path, broker_url="memory://", auto_profile_samples=12, progress_interval_s=0)
    upgrade(s.database_url)
    yield s
    dispose_engines()


def _job(settings: Settings, budget: dict, device_id: int | None = None, **fields) -> int:
    with session_scope(settings.database_url) as s:
        _, key = create_key(s, f"t-{secrets.token_hex(3)}")
        if device_id is None and budget["kind"] == "latency_ms":
            device = Device(tenant_id=key.tenant_id, name="cpu", spec={"name": "cpu"}, queue="profile.cpu")
            s.add(device)
            s.flush()
            device_id = device.id
        request = {**TINY, "budget": {**budget, "device_id": device_id}}
        job = Job(tenant_id=key.tenant_id, method="l1", arch="resnet20", dataset=TINY["dataset"],
                  budget_kind=budget["kind"], budget_value=budget["value"], budget_device_id=device_id, epochs=1,
                  params=TINY["params"], request=request, request_hash="x", **fields)
        s.add(job)
        s.flush()
        return job.id


def _state(settings: Settings, job_id: int) -> Job:
    with session_scope(settings.database_url) as s:
        return s.get(Job, job_id)


def test_job_fails_after_max_attempts(settings):
    job_id = _job(settings, {"kind": "flops", "value": 0.5}, state="running", attempts=3)
    work = ArtifactStore(settings.artifact_dir).resolve(job_work_dir(job_id))
    (work / "checkpoints").mkdir(parents=True)
    (work / "checkpoints" / "dense.pt").write_bytes(b"x")
    sent = []
    assert run_job(settings, job_id, lambda *a: sent.append(a)) == "failed"
    job = _state(settings, job_id)
    # Three starts, three lost workers: the counter says 3, and the dead runs' checkpoints are gone.
    assert "lost 3 times" in job.error and job.attempts == 3 and sent == []
    assert not work.exists()


def test_profiling_fails_after_max_attempts(settings):
    job_id = _job(settings, {"kind": "latency_ms", "value": 10.0})
    sent: list = []
    run_job(settings, job_id, lambda *a: sent.append(a))
    predictor_id = sent[0][1][0]
    with session_scope(settings.database_url) as s:
        s.get(Predictor, predictor_id).attempts = 3
    assert run_profile(settings, predictor_id, lambda *a: sent.append(a)) == "failed"
    with session_scope(settings.database_url) as s:
        predictor = s.get(Predictor, predictor_id)
        assert predictor.attempts == 3 and "lost 3 times" in predictor.error


def test_finished_or_cancelled_jobs_are_not_rerun(settings):
    done = _job(settings, {"kind": "flops", "value": 0.5}, state="succeeded")
    assert run_job(settings, done, lambda *a: None) == "succeeded"
    assert _state(settings, done).attempts == 0
    flagged = _job(settings, {"kind": "flops", "value": 0.5}, cancel_requested=True)
    assert run_job(settings, flagged, lambda *a: None) == "cancelled"


@pytest.mark.slow
def test_latency_job_waits_for_profiling_then_runs(settings):
    job_id = _job(settings, {"kind": "latency_ms", "value": 10.0})
    sent: list = []
    assert run_job(settings, job_id, lambda *a: sent.append(a)) == "queued"
    job = _state(settings, job_id)
    assert job.stage == AWAITING_PREDICTOR and job.attempts == 0
    ((task, (predictor_id,), queue),) = sent
    assert (task, queue) == ("profile.run", "profile.cpu")
    # A second delivery while profiling runs does not start another profile.
    assert run_job(settings, job_id, lambda *a: sent.append(a)) == "queued" and len(sent) == 1

    assert run_profile(settings, predictor_id, lambda *a: sent.append(a)) == "ready"
    assert sent[-1] == ("prune.run", [job_id], "prune")
    with session_scope(settings.database_url) as s:
        predictor = s.get(Predictor, predictor_id)
        assert predictor.resolution == 16 and predictor.samples_requested == 12
        assert s.get(Device, predictor.device_id).fingerprint["threads"] == 1

    assert run_job(settings, job_id, lambda *a: sent.append(a)) == "succeeded", _state(settings, job_id).error
    with session_scope(settings.database_url) as s:
        (subnet,) = s.scalars(select(Subnet).where(Subnet.job_id == job_id)).all()
        entry = subnet.latency[str(predictor.device_id)]
        assert entry["measured_ms"] > 0 and entry["predicted_ms"] > 0


def test_failed_profiling_fails_waiting_jobs(settings):
    job_id = _job(settings, {"kind": "latency_ms", "value": 10.0})
    sent: list = []
    run_job(settings, job_id, lambda *a: sent.append(a))
    predictor_id = sent[0][1][0]
    with session_scope(settings.database_url) as s:
        device = s.get(Device, s.get(Predictor, predictor_id).device_id)
        device.spec = {"name": "cpu", "provider": "cuda"}
    assert run_profile(settings, predictor_id, lambda *a: sent.append(a)) == "failed"
    job = _state(settings, job_id)
    assert job.state == "failed" and "profiling its device" in job.error and "CUDA" in job.error


def test_results_are_stored_once(settings, tmp_path):
    job_id = _job(settings, {"kind": "flops", "value": 0.5})
    out = tmp_path / "out"
    out.mkdir()
    for name, data in (("model.onnx", b"onnx"), ("model.safetensors", b"st"), ("arch.json", b'{"arch": "x"}')):
        (out / name).write_bytes(data)
    report = {"resolution": 16, "pruned": {"macs": 10, "params": 5, "accuracy": 0.5}, "widths": {"conv1": 3},
              "keep_counts": [3]}
    with session_scope(settings.database_url) as s:
        tenant_id = s.get(Job, job_id).tenant_id
    started = Started(job_id, tenant_id, TINY, None, None, None, 16)
    sessions_url = settings.database_url
    store = ArtifactStore(settings.artifact_dir)
    for _ in range(2):
        assert persist_results(session_factory(sessions_url), store, started, report, out) is False
    with session_scope(sessions_url) as s:
        assert s.scalar(select(func.count()).select_from(Subnet)) == 1
        assert s.scalar(select(func.count()).select_from(Artifact)) == 3
    files = sorted(p.name for p in Path(settings.artifact_dir, "tenants").rglob("*") if p.is_file())
    assert files == ["arch.json", "model.onnx", "model.safetensors"]


def test_progress_is_throttled_but_keeps_stage_changes(settings):
    job_id = _job(settings, {"kind": "flops", "value": 0.5})
    now = [0.0]
    progress = JobProgress(session_factory(settings.database_url), job_id, 1.0, clock=lambda: now[0])
    progress({"stage": "dense", "fraction": 0.1, "epoch": 1, "step": 1, "steps": 8, "loss": 2.0})
    progress({"stage": "dense", "fraction": 0.2, "epoch": 1, "step": 2, "steps": 8, "loss": 1.9})  # dropped
    progress({"stage": "dense", "fraction": 0.3, "epoch": 2, "step": 5, "steps": 8, "loss": 1.8})  # new epoch
    progress({"stage": "dense", "fraction": 0.4, "epoch": 2, "step": 8, "steps": 8, "loss": 1.7})  # stage done
    progress({"stage": "prune", "fraction": 0.5, "cost": 5.0})  # a new stage
    now[0] = 2.0
    progress({"stage": "prune", "fraction": 0.6, "loss": float("nan")})  # the interval has passed
    with session_scope(settings.database_url) as s:
        events = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
        job = s.get(Job, job_id)
    assert [e.data["fraction"] for e in events] == [0.1, 0.3, 0.4, 0.5, 0.6]
    assert events[-1].data["loss"] is None
    assert (job.progress, job.stage, job.loss, job.cost) == (0.6, "prune", 1.7, 5.0)


def test_cancel_flag_reads_at_most_once_per_interval(settings):
    job_id = _job(settings, {"kind": "flops", "value": 0.5})
    now = [0.0]
    flag = CancelFlag(session_factory(settings.database_url), job_id, 1.0, clock=lambda: now[0])
    assert flag() is False
    with session_scope(settings.database_url) as s:
        s.get(Job, job_id).cancel_requested = True
    assert flag() is False  # not re-read yet
    now[0] = 1.5
    assert flag() is True


def test_work_dir_is_per_job():
    assert job_work_dir(7) == "work/jobs/7" != job_work_dir(8)


def test_one_latency_tolerance_for_the_finisher_and_the_download(tmp_path):
    from pruning.pipeline import PruneRequest
    from service.settings import Settings

    assert Settings(home=tmp_path).latency_tolerance == PruneRequest.latency_tolerance == 0.05
