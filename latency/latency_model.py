"""A device's latency model as the engine uses it: differentiable prediction plus real measurement."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from latency.backends import backend_for
from latency.device import DeviceSpec
from latency.lpnet import LPNet
from latency.lpnet_io import PredictorMeta
from latency.timing import (
    Measurement,
    QuietReference,
    TimingPlan,
    input_shape,
    measure,
    relative_reading,
    torch_threads,
)
from pruning.oracle import DeviceOracle, RelativeReading


class LatencyModel(DeviceOracle):
    """LPNet of (device, arch, resolution) + a robust timer on that device: the engine's device oracle.

    predict_ms = LPNet's latency relative to the dense reference x `reference_ms`; `calibrate()` re-times
    the dense model now, so predictions follow the machine's current speed. Alternated readings
    (`measure_relative`) share one quiet level of the reference for this model's lifetime (a job's), so a reading
    taken in one of the machine's slow spells is retried.
    """

    can_measure = True
    times_relative = True

    def __init__(self, net: LPNet, meta: PredictorMeta, spec: DeviceSpec, resolution: int,
                 plan: TimingPlan | None = None):
        self.net = net.eval()
        self.meta = meta
        self.spec = spec
        self.resolution = int(resolution)
        self.plan = plan or TimingPlan()
        index = net.resolution_index(self.resolution, 1)
        self.reference_ms = float(net.reference_ms[index][0])
        self.quiet = QuietReference()
        for p in self.net.parameters():
            p.requires_grad_(False)

    @property
    def channel_multiple(self) -> int:  # type: ignore[override]
        return int(self.spec.channel_multiple or 1)

    @property
    def batch(self) -> int:  # type: ignore[override]
        return int(self.spec.batch or 1)

    @property
    def arch(self) -> str:
        return self.meta.arch

    @property
    def group_sizes(self) -> list[int]:
        return list(self.meta.group_sizes)

    def predict_ratio(self, keep_ratios: torch.Tensor) -> torch.Tensor:
        """Latency relative to the dense model; [G] -> scalar, [B, G] -> [B]; differentiable."""
        return self.net.predict_ratio(keep_ratios, self.resolution)

    def predict_ms(self, keep_ratios: torch.Tensor) -> torch.Tensor:
        """Predicted latency in ms; [G] -> scalar, [B, G] -> [B]; gradients flow to the keep ratios."""
        return self.predict_ratio(keep_ratios) * self.reference_ms

    def _torch_model(self, onnx_path: Path, model):  # noqa: ANN001, ANN202 - nn.Module in, (nn.Module, int) out
        """The model to time and, when it is rebuilt from arch.json, the resolution that was exported at."""
        if model is not None:
            return model, None
        from pruning import zoo

        arch_path = onnx_path.with_name("arch.json")
        if not arch_path.exists():
            raise ValueError(f"device {self.spec.name!r} runs torch: pass the model, or put arch.json next to "
                             f"{onnx_path.name}")
        arch = zoo.load_arch(arch_path)
        return zoo.rebuild(arch), (int(arch["resolution"]) if arch.get("resolution") else None)

    def _runner(self, onnx_path: Path, model, resolution: int | None):  # noqa: ANN001, ANN202 - a timing Run
        backend = backend_for(self.spec)
        if backend.uses_onnx:
            return backend.runner(self.spec, onnx_path, None, ())
        net, saved = self._torch_model(onnx_path, model)
        in_channels = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
        size = int(resolution or saved or self.resolution)
        return backend.runner(self.spec, None, net, input_shape(self.spec, in_channels, size))

    def measure_ms(self, onnx_path: str | Path, model=None, resolution: int | None = None) -> float:
        """Median latency (ms) of the model on this device, timed robustly (warm-up, blocks, re-measure).

        onnxruntime times the ONNX file at its own input shape. The torch runtime feeds `resolution` px inputs:
        given, else that of the arch.json next to the file when the model is rebuilt from it, else this
        predictor's (a cohort's members each run at their own resolution, whatever the predictor's).
        """
        with torch_threads(self.spec.threads):
            return measure(self._runner(Path(onnx_path), model, resolution), self.plan).sample.median_ms

    def measure_relative(self, onnx_path: str | Path, reference_path: str | Path, model=None,  # noqa: ANN001
                         reference_model=None) -> RelativeReading:  # noqa: ANN001 - nn.Modules
        """The oracle's reading: time_relative with this model's quiet level."""
        reading = self.time_relative(onnx_path, reference_path, model, reference_model, self.quiet)
        return RelativeReading(float(reading.ratio), reading.sample.median_ms, int(reading.slow_retries))

    def time_relative(self, onnx_path: str | Path, reference_path: str | Path, model=None,
                      reference_model=None, quiet: QuietReference | None = None) -> Measurement:
        """The model timed alternated run by run with a reference model (as the profile times its samples against
        the dense one); `.ratio` is their ratio of 10th percentiles, the statistic LPNet was fitted on. With
        `quiet`, readings taken while the reference runs slower than its quiet level are retried."""
        with torch_threads(self.spec.threads):
            run = self._runner(Path(onnx_path), model, None)
            reference = self._runner(Path(reference_path), reference_model, None)
            return measure(run, self.plan, reference=reference, quiet=quiet)

    def measure_against_dense(self, onnx_path: str | Path, num_classes: int = 10, in_channels: int = 3,
                              model=None, quiet: QuietReference | None = None,  # noqa: ANN001 - an nn.Module
                              repeats: int = 3) -> dict[str, float]:
        """{'ms', 'ratio', 'raw_ms', 'slow_retries'}: the model timed alternated with the dense architecture (fresh
        weights) at this predictor's resolution, ms = the median of `repeats` ratios x `reference_ms`, the
        number LPNet's labels and a job's finisher go by; raw_ms is the model's own median."""
        from latency.profiler import ProfileTarget, export_for_device

        target = ProfileTarget.build(self.arch, self.resolution, num_classes, in_channels)
        dense = target.model(target.group_sizes)
        quiet = quiet if quiet is not None else QuietReference()
        with tempfile.TemporaryDirectory(prefix="latprune-dense-") as tmp, torch_threads(self.spec.threads):
            dense_path = Path(tmp) / "dense.onnx"
            if backend_for(self.spec).uses_onnx:
                export_for_device(dense, dense_path, self.spec, input_shape(self.spec, in_channels, self.resolution))
            run = self._runner(Path(onnx_path), model, self.resolution)
            reference = self._runner(dense_path, dense, self.resolution)
            readings = [measure(run, self.plan, reference=reference, quiet=quiet) for _ in range(max(1, repeats))]
        return relative_reading(readings, self.reference_ms)

    def calibrate(self, num_classes: int = 10, in_channels: int = 3) -> float:
        """Re-time the dense model now and rescale predictions to it; returns new / old reference ms."""
        from latency.profiler import ProfileTarget, make_runner

        target = ProfileTarget.build(self.arch, self.resolution, num_classes, in_channels)
        with tempfile.TemporaryDirectory(prefix="latprune-calibrate-") as tmp, torch_threads(self.spec.threads):
            run = make_runner(self.spec, target, target.group_sizes, Path(tmp), "reference")
            now = measure(run, self.plan).sample.median_ms
        scale = now / self.reference_ms
        self.reference_ms = now
        return scale
