"""A device's stored LPNet as the engine's `latency` object, measuring only where the worker is that device."""

from __future__ import annotations

from pathlib import Path

from service.models import Device, Predictor
from service.storage import ArtifactStore
from workers.cohort_job import PredictOnly, load_latency_model


class DeviceLatency(PredictOnly):
    """predict_ms plus measuring: only where this worker runs on the device itself.

    Elsewhere the engine gets a PredictOnly (can_measure False), and the job's subnets are re-measured
    afterwards by a task on the device's own queue (profile.measure).
    """

    can_measure = True
    times_relative = True

    def measure_ms(self, onnx_path: str | Path, model=None, resolution: int | None = None) -> float:  # noqa: ANN001
        """Latency of the exported model here; `resolution` feeds a torch runtime (see LatencyModel.measure_ms)."""
        return self.model.measure_ms(onnx_path, model=model, resolution=resolution)

    def measure_relative(self, onnx_path: str | Path, reference_path: str | Path, model=None,  # noqa: ANN001
                         reference_model=None):  # noqa: ANN001, ANN201 - nn.Modules, pruning.oracle.RelativeReading
        """The model timed alternated with a reference model here (see LatencyModel.measure_relative)."""
        return self.model.measure_relative(onnx_path, reference_path, model, reference_model)


def load_device_latency(store: ArtifactStore, device: Device, predictor: Predictor) -> PredictOnly:
    """The device's latency model from the artifact store; it measures only if this machine is the device."""
    from latency.device import current_fingerprint

    predicted = load_latency_model(store, device, predictor, predictor.resolution)
    model = predicted.model
    local = not model.meta.fingerprint.mismatches(current_fingerprint(model.spec))
    return DeviceLatency(model) if local else predicted


def predict_counts_ms(latency: PredictOnly, keep_counts: list[int]) -> float | None:
    """Predicted latency of a configuration given as kept channels per group (None if groups differ)."""
    import torch

    sizes = latency.group_sizes
    if len(sizes) != len(keep_counts):
        return None
    ratios = torch.tensor([c / s for c, s in zip(keep_counts, sizes, strict=True)], dtype=torch.float32)
    with torch.no_grad():
        return float(latency.predict_ms(ratios))
