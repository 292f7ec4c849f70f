"""Device specs (runtime, provider, threads, batch, resolutions, precision) and environment fingerprints."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEVICE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# Instruction-set extensions that change which kernels onnxruntime/torch pick (so they change latency).
RELEVANT_ISA = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni", "asimd", "sve")


class DeviceError(ValueError):
    """A device spec that is invalid, missing, or not usable on this machine."""


class DeviceSpec(BaseModel):
    """Where and how a model runs: the thing latency is measured and predicted for."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="lower-case id: letters, digits, '_', '.', '-'")
    runtime: Literal["onnxruntime", "torch"] = "onnxruntime"
    provider: str = Field("cpu", description="execution provider: cpu, cuda, or another onnxruntime provider")
    threads: int = Field(1, ge=1, le=256, description="intra-op threads")
    batch: int = Field(1, ge=1, le=4096, description="batch size of every timed inference")
    resolutions: list[int] = Field(default_factory=list, description="input resolutions deployed on it")
    precision: Literal["fp32", "fp16"] = "fp32"
    channel_multiple: int = Field(1, ge=1, le=128, description="preferred multiple for kept channel counts")

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not DEVICE_NAME.match(name):
            raise ValueError(f"device name {name!r} must be 1-63 lower-case letters, digits, '_', '.' or '-', "
                             "starting with a letter or digit")
        return name

    @field_validator("provider")
    @classmethod
    def _check_provider(cls, provider: str) -> str:
        provider = provider.strip().lower().removesuffix("executionprovider")
        if not provider or not provider.isalnum():
            raise ValueError(f"provider {provider!r} must be a name like cpu or cuda")
        return provider

    @field_validator("resolutions")
    @classmethod
    def _check_resolutions(cls, resolutions: list[int]) -> list[int]:
        if any(r < 8 or r > 4096 for r in resolutions):
            raise ValueError(f"resolutions must lie in [8, 4096], got {resolutions}")
        return sorted(set(resolutions))

    @model_validator(mode="after")
    def _check_combination(self) -> DeviceSpec:
        if self.runtime == "torch" and self.provider not in ("cpu", "cuda"):
            raise ValueError(f"runtime torch supports providers cpu and cuda, not {self.provider!r}")
        if self.precision == "fp16" and self.provider == "cpu":
            raise ValueError("precision fp16 needs a GPU provider (e.g. cuda); use fp32 on cpu")
        if self.runtime == "onnxruntime":
            known = onnxruntime_provider_names()
            if self.provider not in known:
                raise ValueError(f"unknown onnxruntime provider {self.provider!r}; known: {', '.join(sorted(known))}")
        return self


def onnxruntime_provider_names() -> dict[str, str]:
    """Short provider name (cpu, cuda, ...) -> onnxruntime's full provider name, for every provider it knows."""
    import onnxruntime as ort

    return {p.removesuffix("ExecutionProvider").lower(): p for p in ort.get_all_providers()}


def check_runnable(spec: DeviceSpec) -> None:
    """Raise DeviceError unless this machine can run the device's runtime and provider."""
    if spec.runtime == "onnxruntime":
        import onnxruntime as ort

        full = onnxruntime_provider_names()[spec.provider]
        if full not in ort.get_available_providers():
            raise DeviceError(f"device {spec.name!r} needs {full}, which this machine's onnxruntime lacks "
                              f"(available: {', '.join(ort.get_available_providers())})")
    if spec.provider == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec.name!r} needs CUDA, which this machine lacks")


class EnvironmentFingerprint(BaseModel):
    """What, besides the model, decides a latency: hardware, library versions, runtime settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_model: str
    isa: list[str]
    logical_cores: int
    gpu_name: str | None
    machine: str
    onnxruntime_version: str
    torch_version: str
    runtime: str
    provider: str
    threads: int
    inter_op_threads: int
    batch: int
    precision: str

    def mismatches(self, other: EnvironmentFingerprint) -> list[str]:
        """Human-readable differences 'field: ours != theirs' (empty when the environments match)."""
        mine, theirs = self.model_dump(), other.model_dump()
        return [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


def cpu_info() -> tuple[str, list[str]]:
    """(CPU model name, the latency-relevant instruction-set extensions it has)."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "Hardware") and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: fall back to what the platform module knows
        pass
    return model or platform.processor() or platform.machine(), sorted(f for f in RELEVANT_ISA if f in flags)


def current_fingerprint(spec: DeviceSpec) -> EnvironmentFingerprint:
    """The fingerprint of this machine running `spec`."""
    import onnxruntime as ort
    import torch

    cpu_model, isa = cpu_info()
    gpu_name = None
    if spec.provider == "cuda" and torch.cuda.is_available():
        gpu_name = torch.cuda.get_device_name(0)
    return EnvironmentFingerprint(
        cpu_model=cpu_model, isa=isa, logical_cores=os.cpu_count() or 1, gpu_name=gpu_name,
        machine=platform.machine(), onnxruntime_version=ort.__version__, torch_version=torch.__version__,
        runtime=spec.runtime, provider=spec.provider, threads=spec.threads, inter_op_threads=1,
        batch=spec.batch, precision=spec.precision)


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "spec"
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"


def make_device(**fields) -> DeviceSpec:
    """Build a DeviceSpec, turning pydantic's validation error into a one-line DeviceError."""
    try:
        return DeviceSpec(**fields)
    except ValidationError as exc:
        raise DeviceError(_validation_message(exc)) from None


def save_device(spec: DeviceSpec, path: str | Path) -> Path:
    """Write the device spec as JSON (atomically: write a temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(spec.model_dump_json(indent=1))
    tmp.replace(path)
    return path


def load_device(path: str | Path) -> DeviceSpec:
    """Read a device spec written by save_device."""
    path = Path(path)
    try:
        return DeviceSpec.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise DeviceError(f"no device file {path}") from None
    except json.JSONDecodeError as exc:
        raise DeviceError(f"{path} is not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise DeviceError(f"{path}: {_validation_message(exc)}") from None
