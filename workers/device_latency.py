"""A device's stored LPNet as the engine's `latency` object, measuring only where the worker is that device."""

from __future__ import annotations

from pathlib import Path

from service.models import Device, Predictor
from service.storage import ArtifactStore


class PredictedLatency:
    """predict_ms from the device's LPNet: usable on any machine."""

    def __init__(self, model):  # noqa: ANN001 - latency.latency_model.LatencyModel
        self.model = model

    @property
    def group_sizes(self) -> list[int]:
        return self.model.group_sizes

    def predict_ms(self, keep_ratios):  # noqa: ANN001, ANN201 - torch tensors
        return self.model.predict_ms(keep_ratios)


class DeviceLatency(PredictedLatency):
    """predict_ms plus measure_ms: only where this worker runs on the device itself.

    Elsewhere the engine gets a PredictedLatency (no measure_ms), and the job's subnets are re-measured
    afterwards by a task on the device's own queue (profile.measure).
    """

    def measure_ms(self, onnx_path: str | Path) -> float:
        return self.model.measure_ms(onnx_path)


def load_device_latency(store: ArtifactStore, device: Device, predictor: Predictor) -> PredictedLatency:
    """The device's latency model from the artifact store; it measures only if this machine is the device."""
    from latency.device import DeviceSpec, current_fingerprint
    from latency.latency_model import LatencyModel
    from latency.lpnet import load_predictor

    spec = DeviceSpec(**device.spec)
    net, meta = load_predictor(store.resolve(predictor.path))
    model = LatencyModel(net, meta, spec, predictor.resolution)
    local = not meta.fingerprint.mismatches(current_fingerprint(spec))
    return DeviceLatency(model) if local else PredictedLatency(model)


def predict_counts_ms(latency: PredictedLatency, keep_counts: list[int]) -> float | None:
    """Predicted latency of a configuration given as kept channels per group (None if groups differ)."""
    import torch

    sizes = latency.group_sizes
    if len(sizes) != len(keep_counts):
        return None
    ratios = torch.tensor([c / s for c, s in zip(keep_counts, sizes, strict=True)], dtype=torch.float32)
    with torch.no_grad():
        return float(latency.predict_ms(ratios))
