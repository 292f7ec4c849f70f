"""Request and response bodies of the HTTP API (pydantic), with examples for the OpenAPI document."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from latency.device import DeviceSpec

# Ids (and event cursors, page offsets) are INTEGER columns: 32-bit on PostgreSQL, which refuses to bind a larger
# value, while SQLite cannot bind past 64 bits. Anything larger answers 422 before it reaches the database.
MAX_ID = 2**31 - 1


def _utc(value: datetime) -> datetime:
    # SQLite stores no offset, so its timestamps read back naive; every stored timestamp is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


UtcDateTime = Annotated[datetime, AfterValidator(_utc)]
BudgetKind = Literal["flops", "macs", "params", "latency_ms"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ArtifactFormat = Literal["onnx", "safetensors", "arch"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceCreate(DeviceSpec):
    """A deployment target: how models run on it (latency.device.DeviceSpec) plus an optional default budget."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "laptop-cpu", "runtime": "onnxruntime", "provider": "cpu", "threads": 1, "batch": 1,
         "resolutions": [32], "precision": "fp32", "latency_budget_ms": 2.5}]})
    latency_budget_ms: float | None = Field(None, gt=0, description="default budget for checkpoint selection")

    def spec(self) -> dict[str, Any]:
        """The stored DeviceSpec (everything but the budget)."""
        return self.model_dump(exclude={"latency_budget_ms"})


class DeviceOut(BaseModel):
    id: int
    name: str
    spec: dict[str, Any]
    queue: str
    fingerprint: dict[str, Any] | None
    latency_budget_ms: float | None
    created_at: UtcDateTime


class ProfileRequest(Strict):
    """Profile a device for one architecture and fit its latency predictor."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"arch": "resnet20", "resolution": 32, "samples": 200}]})
    arch: str = Field(min_length=1, max_length=64)
    resolution: int | None = Field(None, ge=8, le=4096, description="default: the architecture's own")
    samples: int = Field(200, ge=8, le=20000, description="width configurations to time")


class PredictorOut(BaseModel):
    id: int
    device_id: int
    arch: str
    resolution: int
    state: Literal["queued", "running", "ready", "failed"]
    samples_requested: int
    metrics: dict[str, Any] | None
    reference_ms: float | None
    error: str | None
    created_at: UtcDateTime
    finished_at: UtcDateTime | None


class ModelOut(BaseModel):
    id: int
    name: str
    arch: str
    num_classes: int
    in_channels: int
    sha256: str
    size_bytes: int
    created_at: UtcDateTime


class Budget(Strict):
    """What the pruned model must fit: a share of the dense FLOPs or params, MACs, or milliseconds on a device."""

    kind: BudgetKind
    value: float = Field(gt=0, description="flops, params: fraction of the dense model in (0, 1]; "
                         "macs: absolute multiply-accumulates; latency_ms: milliseconds on device_id")
    device_id: int | None = Field(None, ge=1, le=MAX_ID, description="device whose latency counts (required for "
                                  "latency_ms)")

    @model_validator(mode="after")
    def _check(self) -> Budget:
        if self.kind == "latency_ms" and self.device_id is None:
            raise ValueError("a latency_ms budget needs device_id (the device whose latency counts)")
        if self.kind in ("flops", "params") and self.value > 1:
            raise ValueError(f"a {self.kind} budget is a fraction of the dense model in (0, 1]")
        return self


class JobCreate(Strict):
    """A pruning job."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"method": "l1", "arch": "resnet20", "dataset": "builtin:digits",
         "budget": {"kind": "flops", "value": 0.5}, "epochs": 2, "params": {}},
        {"method": "l1", "arch": "resnet20", "model_id": 3, "dataset": "builtin:digits",
         "budget": {"kind": "latency_ms", "value": 1.2, "device_id": 1}, "epochs": 2}]})
    method: str = Field(min_length=1, max_length=32)
    arch: str = Field(min_length=1, max_length=64)
    model_id: int | None = Field(None, ge=1, le=MAX_ID, description="uploaded dense weights; omitted: trained "
                                 "from scratch")
    dataset: str = Field(min_length=1, max_length=512, description="builtin:digits, synthetic:10x32, "
                         "imagefolder:<path under the data root>, torchvision:<Name>")
    budget: Budget
    epochs: int = Field(1, ge=0, le=10000)
    finetune_epochs: int | None = Field(None, ge=0, le=10000)
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters (GET /v1/methods)")
    resolution: int | None = Field(None, ge=8, le=4096)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    batch_size: int | None = Field(None, ge=1, le=4096)
    lr: float | None = Field(None, gt=0, le=10)


class JobOut(BaseModel):
    id: int
    state: JobState
    method: str
    arch: str
    model_id: int | None
    dataset: str
    budget: Budget
    epochs: int
    params: dict[str, Any]
    progress: float = Field(description="0..1")
    stage: str | None
    epoch: int | None
    loss: float | None
    cost: float | None
    error: str | None
    cancel_requested: bool
    attempts: int
    report: dict[str, Any] | None = None
    created_at: UtcDateTime
    started_at: UtcDateTime | None
    finished_at: UtcDateTime | None


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class ArtifactOut(BaseModel):
    format: ArtifactFormat
    sha256: str
    size_bytes: int


class LatencyOut(BaseModel):
    predicted_ms: float | None = None
    measured_ms: float | None = None


class SubnetOut(BaseModel):
    id: int
    member: int
    resolution: int
    macs: int
    params: int
    accuracy: float | None
    widths: dict[str, Any]
    latency: dict[str, LatencyOut] = Field(description="per device id")
    artifacts: list[ArtifactOut]
    pareto_front: list[str] = Field(default_factory=list, description="the accuracy/cost Pareto fronts this member "
                                    "lies on: 'macs' and the ids of devices with a latency for the cohort")


class MethodOut(BaseModel):
    name: str
    description: str
    params_schema: dict[str, Any]
