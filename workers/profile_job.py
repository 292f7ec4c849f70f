"""Tasks that run on a device's own queue: profile + fit its LPNet, and re-measure a job's subnets there.

Profiling is resumable: samples are appended to the latency package's JSONL files under the artifact
store (latency/device-<id>/), so a redelivered run measures only what is missing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.contracts import PRUNE_TASK
from service.db import session_factory
from service.deps import Dispatcher
from service.models import Artifact, Device, Job, JobEvent, LatencySample, Predictor, Subnet, ready_predictor, utcnow
from service.settings import Settings
from service.storage import ArtifactStore, sha256_file
from workers.cohort_job import load_latency_model
from workers.dbretry import retry_db
from workers.prune_job import MEASURING, finish, job_work_dir, waiting_jobs

if TYPE_CHECKING:
    from latency.latency_model import LatencyModel

log = logging.getLogger(__name__)


def latency_home_dir(device_id: int) -> str:
    """Store-relative root of the latency package's files for one device."""
    return f"latency/device-{device_id}"


def run_profile(settings: Settings, predictor_id: int, dispatch: Dispatcher) -> str:
    """Profile the predictor's (device, arch, resolution), fit LPNet, store it; returns the predictor's state."""
    sessions = session_factory(settings.database_url)
    store = ArtifactStore(settings.artifact_dir)
    with sessions.begin() as session:
        predictor = session.get(Predictor, predictor_id, with_for_update=True)
        if predictor is None or predictor.state in ("ready", "failed"):
            return predictor.state if predictor else "missing"
        if predictor.attempts >= settings.max_attempts:
            return _fail(session, predictor, f"the worker profiling this device was lost "
                                             f"{predictor.attempts} times; giving up", dispatch)
        predictor.attempts += 1
        predictor.state = "running"
        device = session.get(Device, predictor.device_id)
        arch, resolution, n_samples = predictor.arch, predictor.resolution, predictor.samples_requested
    try:
        result, stem, meta, samples = _profile_and_fit(store, device, arch, resolution, n_samples)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the predictor row
        if not isinstance(exc, ValueError):
            log.exception("profiling predictor %s failed", predictor_id)
        message = str(exc) if isinstance(exc, ValueError) else f"internal error: {type(exc).__name__}: {exc}"
        with sessions.begin() as session:
            return _fail(session, session.get(Predictor, predictor_id), message, dispatch)
    try:
        return retry_db(f"storing predictor {predictor_id}", lambda: _store_predictor(
            settings, sessions, store, predictor_id, device, arch, (result, stem, meta, samples), dispatch))
    except Exception as exc:
        log.exception("storing predictor %s failed", predictor_id)
        with sessions.begin() as session:
            return _fail(session, session.get(Predictor, predictor_id),
                         f"internal error while storing the predictor: {type(exc).__name__}: {exc}", dispatch)


def _store_predictor(settings: Settings, sessions, store: ArtifactStore, predictor_id: int, device: Device,  # noqa: ANN001
                     arch: str, fitted: tuple, dispatch: Dispatcher) -> str:
    result, stem, meta, samples = fitted
    rel_stem = stem.relative_to(store.root).as_posix()
    with sessions.begin() as session:
        predictor = session.get(Predictor, predictor_id)
        predictor.state, predictor.path, predictor.finished_at = "ready", rel_stem, utcnow()
        predictor.sha256 = sha256_file(store.resolve(rel_stem + ".safetensors"))
        predictor.reference_ms = float(meta.reference_ms[0])
        predictor.metrics = {"test": meta.metrics, "repeatability": result.repeatability,
                             "training_samples": meta.training_samples, "profiled": result.total_samples,
                             "noisy": result.noisy, "profile_seconds": round(result.elapsed_s, 2),
                             "held_out": meta.fit_info.get("held_out")}
        session.get(Device, device.id).fingerprint = result.fingerprint.model_dump()
        _store_samples(session, predictor, samples)
        jobs = waiting_jobs(session, device.id, arch)
    for job in jobs:
        dispatch(PRUNE_TASK, [job.id], settings.prune_queue)
    return "ready"


def _profile_and_fit(store: ArtifactStore, device: Device, arch: str, resolution: int, n_samples: int):  # noqa: ANN202
    from latency.device import DeviceSpec
    from latency.predictors import fit_predictor
    from latency.profiler import ProfileTarget, profile
    from latency.samples import SampleStore
    from latency.store import LatencyHome

    spec = DeviceSpec(**device.spec)
    home = LatencyHome(store.resolve(latency_home_dir(device.id)))
    home.add_device(spec, replace=True)
    target = ProfileTarget.build(arch, resolution)
    samples = SampleStore(home.profile_path(spec.name, arch, resolution))
    result = profile(spec, target, samples, n_samples)
    stem, meta = fit_predictor(home, spec.name, arch, [resolution])
    mine = [s for s in samples.load() if s.fingerprint == result.fingerprint and target.matches(s)]
    return result, stem, meta, [(s, target.group_sizes) for s in mine]


def _store_samples(session: Session, predictor: Predictor, samples: list) -> None:
    session.execute(delete(LatencySample).where(LatencySample.predictor_id == predictor.id))
    session.add_all([
        LatencySample(device_id=predictor.device_id, predictor_id=predictor.id, arch=s.arch,
                      resolution=s.resolution, keep_ratios=[c / g for c, g in zip(s.keep_counts, sizes, strict=True)],
                      latency_ms=s.latency_ms, iqr_ms=s.iqr_ratio * s.latency_ms, reference_ms=s.reference_ms,
                      extra={"key": s.key, "kind": s.kind, "ratio": s.ratio, "noisy": s.noisy, "repeat": s.repeat})
        for s, sizes in samples])


def _measure_subnet(subnet: Subnet, onnx_path: Path, model: LatencyModel | None, fallback: LatencyModel) -> dict:
    """{'measured_ms', 'raw_ms'}: timed against the dense model at the subnet's resolution, as a job's finisher
    measures, where the device has a predictor (`model`, so a dense reference) there; else the subnet's median
    alone."""
    if model is None:
        # Each subnet at its own resolution (a cohort's differ from each other and from the predictor's).
        return {"measured_ms": float(fallback.measure_ms(onnx_path, resolution=subnet.resolution)), "raw_ms": None}
    # Timed alone, a small model's median read 0.536 ms in one of a shared VM's slow spells where its ratio to
    # the dense model, timed alternated with it, put it at 0.342 ms (docs/latency.md).
    arch = subnet.arch_json or {}
    reading = model.measure_against_dense(onnx_path, int(arch.get("num_classes", 10)), int(arch.get("in_channels", 3)))
    return {"measured_ms": reading["ms"], "raw_ms": reading["raw_ms"]}


def _fail(session: Session, predictor: Predictor, message: str, dispatch: Dispatcher) -> str:
    predictor.state, predictor.error, predictor.finished_at = "failed", message[:4000], utcnow()
    for job in waiting_jobs(session, predictor.device_id, predictor.arch):
        finish(session, job, "failed", f"profiling its device for {predictor.arch} failed: {message}")
    return "failed"


def run_measure(settings: Settings, job_id: int, device_id: int) -> str:
    """Re-measure every subnet of the job on this device (this worker is it); then the job has succeeded."""
    sessions = session_factory(settings.database_url)
    store = ArtifactStore(settings.artifact_dir)
    with sessions() as session:
        job, device = session.get(Job, job_id), session.get(Device, device_id)
        if job is None or device is None:
            return "missing"
        subnets = session.scalars(select(Subnet).where(Subnet.job_id == job_id)).all()
        onnx = {a.subnet_id: a.path for a in session.scalars(
            select(Artifact).where(Artifact.subnet_id.in_([s.id for s in subnets]), Artifact.format == "onnx"))}
        predictor = session.scalar(select(Predictor).where(
            Predictor.device_id == device_id, Predictor.arch == job.arch, Predictor.state == "ready")
            .order_by(Predictor.id.desc()))
        at_resolution = {res: ready_predictor(session, device_id, job.arch, res)
                         for res in {s.resolution for s in subnets}}
    measured: dict[int, dict] = {}
    error = None
    try:
        if predictor is None:
            raise ValueError(f"device {device.name!r} has no latency predictor for {job.arch}")
        fallback = load_latency_model(store, device, predictor, predictor.resolution).model
        models = {res: load_latency_model(store, device, own, res).model
                  for res, own in at_resolution.items() if own is not None}
        for subnet in subnets:
            if subnet.id in onnx:
                measured[subnet.id] = _measure_subnet(subnet, store.resolve(onnx[subnet.id]),
                                                      models.get(subnet.resolution), fallback)
    except Exception as exc:  # noqa: BLE001 - the job keeps its results; the failure is reported with them
        log.exception("re-measuring job %s on device %s failed", job_id, device_id)
        error = f"re-measuring on device {device.name!r} failed: {exc}"
    with sessions.begin() as session:
        for subnet in session.scalars(select(Subnet).where(Subnet.job_id == job_id)):
            if subnet.id in measured:
                entry = dict((subnet.latency or {}).get(str(device_id)) or {"predicted_ms": None})
                entry.update(measured[subnet.id])
                subnet.latency = {**(subnet.latency or {}), str(device_id): entry}
        job = session.get(Job, job_id)
        if job.state == "running" and job.stage == MEASURING:
            if error:
                job.report = {**(job.report or {}), "measure_error": error}
                session.add(JobEvent(job_id=job.id, kind="log", data={"message": error}))
            finish(session, job, "succeeded")
    store.delete_tree(job_work_dir(job_id))
    return "succeeded"
