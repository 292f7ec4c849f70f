"""Runtime backends: how a device's runtime turns a model into one timed inference.

A backend knows whether it times an exported ONNX file or the torch module itself, checks that this machine can
run it, and builds the runner (a callable doing one inference) the timing code measures. Adding a runtime (say
TensorRT or OpenVINO) is one subclass registered in BACKENDS plus its name in DeviceSpec.runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from latency.device import DeviceError, DeviceSpec, check_runnable
from latency.timing import OnnxRuntimeRunner, Run, TorchRunner


class RuntimeBackend:
    """One runtime. `uses_onnx`: its runs time an exported ONNX file (else the torch module)."""

    name: str = ""
    uses_onnx: bool = True

    def check(self, spec: DeviceSpec) -> None:
        """Raise DeviceError unless this machine can run `spec` on this runtime."""
        check_runnable(spec)

    def runner(self, spec: DeviceSpec, onnx_path: Path | None, model, shape: Sequence[int]) -> Run:  # noqa: ANN001
        """One inference of the model (`onnx_path` for ONNX runtimes, `model` for module runtimes) per call."""
        raise NotImplementedError


class OnnxRuntimeBackend(RuntimeBackend):
    name, uses_onnx = "onnxruntime", True

    def runner(self, spec: DeviceSpec, onnx_path: Path | None, model, shape: Sequence[int]) -> Run:  # noqa: ANN001
        if onnx_path is None or not Path(onnx_path).is_file():
            raise ValueError(f"no ONNX file {onnx_path}")
        return OnnxRuntimeRunner(onnx_path, spec)


class TorchBackend(RuntimeBackend):
    name, uses_onnx = "torch", False

    def runner(self, spec: DeviceSpec, onnx_path: Path | None, model, shape: Sequence[int]) -> Run:  # noqa: ANN001
        if model is None:
            raise ValueError(f"device {spec.name!r} runs torch: it needs the model, not only {onnx_path}")
        return TorchRunner(model, spec, shape)


BACKENDS: dict[str, RuntimeBackend] = {b.name: b for b in (OnnxRuntimeBackend(), TorchBackend())}


def backend_for(spec: DeviceSpec) -> RuntimeBackend:
    """The backend of the device's runtime."""
    try:
        return BACKENDS[spec.runtime]
    except KeyError:
        raise DeviceError(f"no backend for runtime {spec.runtime!r}; known: {', '.join(sorted(BACKENDS))}") from None
