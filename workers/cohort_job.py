"""Cohort jobs in the worker: run_cohort with the tenant's device predictors, one subnet row + artifacts per member.

Each member is stored as soon as it is on disk (rows upserted on (job, member), artifacts at fixed paths), so a
job whose worker dies keeps the members it finished and a redelivery neither redoes nor duplicates them. Job
state, events, cancellation and errors stay with the caller (workers.prune_job).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pruning.oracle import DeviceOracle
from service.models import Artifact, Device, Predictor, Subnet, ready_predictor
from service.storage import ArtifactStore

log = logging.getLogger(__name__)
ARTIFACT_FILES = {"onnx": "model.onnx", "safetensors": "model.safetensors", "arch": "arch.json"}


def subnet_store_path(tenant_id: int, job_id: int, member: int) -> str:
    """Store-relative folder of one subnet's files (the same layout single-subnet jobs use)."""
    return f"tenants/{tenant_id}/jobs/{job_id}/subnets/{member}"


class PredictOnly(DeviceOracle):
    """A device's LPNet at one resolution as the engine's device oracle, without measuring (not on the device)."""

    def __init__(self, model: Any):  # latency.latency_model.LatencyModel
        self.model = model

    @property
    def reference_ms(self) -> float:  # type: ignore[override]
        """The dense latency the predictor's ratios are scaled by (the profile's median dense reference)."""
        return self.model.reference_ms

    @property
    def group_sizes(self) -> list[int]:
        return self.model.group_sizes

    @property
    def spec(self):  # noqa: ANN201 - latency.device.DeviceSpec, imported lazily
        return self.model.spec

    @property
    def channel_multiple(self) -> int:  # type: ignore[override]
        """The device's block size (wgates' finisher rounding)."""
        return int(self.model.spec.channel_multiple or 1)

    @property
    def batch(self) -> int:  # type: ignore[override]
        return int(self.model.spec.batch or 1)

    def predict_ms(self, keep_ratios):  # noqa: ANN001, ANN201 - torch tensors
        return self.model.predict_ms(keep_ratios)


def load_latency_model(store: ArtifactStore, device: Device, predictor: Predictor, resolution: int) -> PredictOnly:
    """The device's stored predictor at `resolution` (ValueError if it does not cover it)."""
    from latency.device import DeviceSpec
    from latency.latency_model import LatencyModel
    from latency.lpnet_io import load_predictor

    if not predictor.path:
        raise ValueError(f"predictor {predictor.id} of device {device.name!r} has no stored file")
    net, meta = load_predictor(store.resolve(predictor.path))
    return PredictOnly(LatencyModel(net, meta, DeviceSpec(**device.spec), resolution))


class DevicePredictors:
    """The tenant's devices and their predictors for one architecture, loaded per resolution on first use."""

    def __init__(self, sessions: sessionmaker[Session], store: ArtifactStore, tenant_id: int, arch: str):
        self.sessions, self.store, self.arch = sessions, store, arch
        with sessions() as session:
            self.devices = {d.name: d for d in session.scalars(select(Device).where(Device.tenant_id == tenant_id))}
        self._loaded: dict[tuple[str, int], PredictOnly] = {}

    @property
    def device_ids(self) -> dict[str, int]:
        return {name: d.id for name, d in self.devices.items()}

    def model(self, device_name: str, resolution: int) -> PredictOnly:
        """The device's latency model at `resolution`; ValueError naming what is missing."""
        key = (device_name, int(resolution))
        if key not in self._loaded:
            device = self.devices[device_name]
            with self.sessions() as session:
                predictor = ready_predictor(session, device.id, self.arch, resolution)
            if predictor is None:
                raise ValueError(f"device {device_name!r} has no ready predictor for {self.arch} at {resolution} px")
            self._loaded[key] = load_latency_model(self.store, device, predictor, resolution)
        return self._loaded[key]

    def factories(self) -> dict[str, Callable[[int], PredictOnly]]:
        """run_cohort's latency_models: device name -> resolution -> latency model."""
        return {name: (lambda r, name=name: self.model(name, r)) for name in self.devices}


def latency_by_device_id(member_latency: dict[str, dict], device_ids: dict[str, int]) -> dict[str, dict]:
    """A member's {device name: entry} as the subnet table keeps it: {device id: {predicted_ms, measured_ms}}."""
    out = {}
    for name, entry in member_latency.items():
        if name in device_ids and (entry.get("predicted_ms") is not None or entry.get("measured_ms") is not None):
            out[str(device_ids[name])] = {"predicted_ms": entry.get("predicted_ms"),
                                          "measured_ms": entry.get("measured_ms")}
    return out


def store_member(sessions: sessionmaker[Session], store: ArtifactStore, tenant_id: int, job_id: int, member: dict,
                 folder: Path, device_ids: dict[str, int]) -> int:
    """Upsert the member's subnet row and its three artifacts; returns the subnet id."""
    base = subnet_store_path(tenant_id, job_id, member["id"])
    stored = {fmt: store.put_file(folder / name, f"{base}/{name}") for fmt, name in ARTIFACT_FILES.items()}
    arch_json = json.loads((folder / ARTIFACT_FILES["arch"]).read_text())
    with sessions.begin() as session:
        subnet = session.scalar(select(Subnet).where(Subnet.job_id == job_id, Subnet.member == member["id"]))
        if subnet is None:
            subnet = Subnet(job_id=job_id, member=member["id"])
            session.add(subnet)
        subnet.arch_json, subnet.widths = arch_json, member["widths"]
        subnet.resolution, subnet.macs, subnet.params = member["resolution"], member["macs"], member["params"]
        subnet.accuracy = member["accuracy"]
        # Keep what others added since (measurements from the device's queue, later predictions).
        subnet.latency = {**(subnet.latency or {}), **latency_by_device_id(member.get("latency_ms") or {},
                                                                           device_ids)}
        session.flush()
        for fmt, file in stored.items():
            row = session.scalar(select(Artifact).where(Artifact.subnet_id == subnet.id, Artifact.format == fmt))
            if row is None:
                row = Artifact(subnet_id=subnet.id, format=fmt)
                session.add(row)
            row.path, row.sha256, row.size_bytes = file.path, file.sha256, file.size_bytes
        return subnet.id


def run_cohort_job(sessions: sessionmaker[Session], store: ArtifactStore, tenant_id: int, job_id: int,
                   request: Any, work_dir: Path, progress: Callable[[dict], None] | None = None,
                   should_cancel: Callable[[], bool] | None = None) -> dict:
    """Run the cohort of `request` (a pipeline.PruneRequest) under `work_dir`, storing every member as it is done;
    returns the cohort report (its members' latency keyed by device id, as stored)."""
    from pruning.cohort import run_cohort

    predictors = DevicePredictors(sessions, store, tenant_id, request.arch)
    device_ids = predictors.device_ids

    def on_member(member: dict, folder: Path) -> None:
        store_member(sessions, store, tenant_id, job_id, member, folder, device_ids)

    report = run_cohort(request, work_dir / "out", progress=progress, should_cancel=should_cancel,
                        checkpoint_dir=work_dir / "checkpoints", latency_models=predictors.factories(),
                        on_member=on_member)
    for member in report["members"]:
        member["latency_ms"] = latency_by_device_id(member.get("latency_ms") or {}, device_ids)
        member.pop("masks", None)  # rebuilt from arch.json when needed; keeps the job row small
    report["pareto"] = {(str(device_ids[k]) if k in device_ids else k): v for k, v in report["pareto"].items()}
    return report
