"""The device oracle: what the engine asks of a target device, without knowing how the device answers.

The engine predicts (a differentiable latency of keep ratios, for methods and allocation) and, where the job runs
on the device itself, measures (for the finisher and the final reading). latency.latency_model.LatencyModel is the
real oracle (LPNet + a robust timer); the workers wrap it to predict only when they are not on the device. Every
capability is declared here, so that nothing inspects a latency object to find out what it can do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free at import: the API process wraps predictors in oracles without the engine
    import torch
    from torch import nn


class MeasurementUnavailable(RuntimeError):
    """The oracle cannot time models here (this worker is not the device)."""


@dataclass(frozen=True)
class RelativeReading:
    """One model timed alongside a reference model: the median ratio of their latencies over the rounds, the
    model's own median in ms, and how many rounds were retried because they fell in a slow spell."""

    ratio: float
    raw_ms: float
    slow_retries: int = 0


class DeviceOracle:
    """A device as the engine sees it. Subclasses override `predict_ms` and, where they can time models here,
    set `can_measure` and override `measure_ms` (and `measure_relative` where they time alternated runs)."""

    can_measure: bool = False
    # Whether measure_relative times a model alternated run by run with a reference (drift-free ratios); False:
    # the engine brackets a model with reference readings taken one after another.
    times_relative: bool = False
    # The dense latency predictions are scaled by (None: unknown; a meter then times the dense model itself).
    reference_ms: float | None = None
    # The channel multiple the device runs fastest at (its block size; 1: no preference).
    channel_multiple: int = 1
    # The batch size the device runs models at.
    batch: int = 1

    def predict_ms(self, keep_ratios: torch.Tensor) -> torch.Tensor:
        """Predicted latency in ms of keep ratios ([1, G] -> [1]); differentiable."""
        raise NotImplementedError(f"{type(self).__name__} predicts nothing")

    def measure_ms(self, onnx_path: str, model: nn.Module | None = None) -> float:
        """Latency (ms) of the exported model timed on the device (`model`: the same network, for runtimes that
        run torch modules)."""
        raise MeasurementUnavailable(f"{type(self).__name__} cannot time models on this machine")

    def measure_relative(self, onnx_path: str, reference_path: str, model: nn.Module | None = None,
                         reference_model: nn.Module | None = None) -> RelativeReading:
        """The model timed alternated run by run with a reference model (only where `times_relative`)."""
        raise MeasurementUnavailable(f"{type(self).__name__} does not time models alternated with a reference")
