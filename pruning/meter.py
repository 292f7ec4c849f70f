"""Measuring candidate models on the latency device: the DeviceMeter (drift-corrected readings relative to the
dense model) and the measurement policy the finisher and the final reading share (confirmations, margins)."""

from __future__ import annotations

import copy
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning.groups import ChannelGraph
from pruning.oracle import DeviceOracle
from pruning.surgery import export_onnx, materialize


def measure_model_ms(model: nn.Module, input_shape: Sequence[int], latency: DeviceOracle,
                     describe: Callable[[nn.Module], dict] | None = None) -> float:
    """Measured latency (ms) of `model` on the latency device: exported to ONNX at the device's batch size, with
    arch.json (`describe`: model -> arch.json) next to it for devices that rebuild the model from it."""
    from pruning import zoo

    shape = (int(latency.batch), *tuple(input_shape)[1:])
    with tempfile.TemporaryDirectory(prefix="latprune-measure-") as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", shape)
        if describe is not None:
            zoo.save_arch(describe(model), Path(tmp) / "arch.json")
        return float(latency.measure_ms(str(path), model=model))


class DeviceMeter:
    """Latency of candidate models relative to the dense model timed alongside each of them.

    On a shared machine the absolute speed drifts between measurements; the ratio to the dense model measured
    alongside the candidate does not, so a candidate's ms = its ratio x `reference_ms` (the dense latency the
    predictor was fitted against, else the dense model's first measurement here). Where the oracle can
    (`times_relative`), each round times the two alternated run by run and takes the ratio of 10th percentiles,
    as the profile does for LPNet's labels, retrying a round timed while the dense model ran slower than its
    quiet level (the oracle keeps that level across readings); else a round is dense, candidate, dense timed one
    after another, with the ratio of medians. The ratio is the median of `repeats` rounds, so one round hit by
    another process's burst does not count.
    """

    def __init__(self, latency: DeviceOracle, dense: nn.Module, input_shape: Sequence[int],
                 describe: Callable[[nn.Module], dict] | None = None, reference_ms: float | None = None,
                 repeats: int = 5):
        self.latency = latency
        self.input_shape = tuple(input_shape)
        self.describe = describe
        self.repeats = max(1, int(repeats))
        self.dense = copy.deepcopy(dense).cpu().eval()
        # The dense model never changes: exported once for every reading (a temporary folder removed with the
        # meter).
        self._dense_folder: tempfile.TemporaryDirectory | None = None
        self.reference_ms = float(reference_ms if reference_ms is not None
                                  else latency.reference_ms or self.dense_ms())

    def dense_ms(self) -> float:
        """The dense model's latency right now."""
        return measure_model_ms(self.dense, self.input_shape, self.latency, self.describe)

    def measure(self, model: nn.Module) -> dict[str, float]:
        """{'ms': drift-corrected ms, 'raw_ms': the candidate's own median, 'ratio': to the dense model,
        'slow_retries': readings retried because they fell in a slow spell}."""
        dense_path = self._dense_path()
        with tempfile.TemporaryDirectory(prefix="latprune-meter-") as tmp:
            path = self._export(model, Path(tmp) / "candidate")
            if self.latency.times_relative:
                # Medians timed one after the other differ by 5-30% on a loaded 2-core machine where alternated
                # 10th percentiles differ by 1-4% (latency/timing.py), and a reading in one of the machine's slow
                # spells can read a configuration 20-30% over its quiet latency; the oracle retries those.
                return self._relative(path, dense_path, model)
            ratios, raws = [], []
            before = self._time(dense_path, self.dense)
            for _ in range(self.repeats):
                raw = self._time(path, model)
                after = self._time(dense_path, self.dense)
                ratios.append(raw / max(0.5 * (before + after), 1e-12))
                raws.append(raw)
                before = after
        ratio = statistics.median(ratios)
        return {"ms": ratio * self.reference_ms, "raw_ms": statistics.median(raws), "ratio": ratio,
                "slow_retries": 0}

    def _relative(self, path: Path, dense_path: Path, model: nn.Module) -> dict[str, float]:
        readings = [self.latency.measure_relative(str(path), str(dense_path), model=model, reference_model=self.dense)
                    for _ in range(self.repeats)]
        ratio = statistics.median(r.ratio for r in readings)
        return {"ms": ratio * self.reference_ms, "ratio": ratio,
                "raw_ms": statistics.median(r.raw_ms for r in readings),
                "slow_retries": sum(r.slow_retries for r in readings)}

    def _dense_path(self) -> Path:
        if self._dense_folder is None:
            self._dense_folder = tempfile.TemporaryDirectory(prefix="latprune-meter-dense-")
        path = Path(self._dense_folder.name) / "model.onnx"
        return path if path.exists() else self._export(self.dense, Path(self._dense_folder.name))

    def _export(self, model: nn.Module, folder: Path) -> Path:
        from pruning import zoo

        folder.mkdir(parents=True, exist_ok=True)
        path = export_onnx(model, folder / "model.onnx", (int(self.latency.batch), *self.input_shape[1:]))
        if self.describe is not None:
            zoo.save_arch(self.describe(model), folder / "arch.json")
        return path

    def _time(self, path: Path, model: nn.Module) -> float:
        return float(self.latency.measure_ms(str(path), model=model))

    def measure_masks(self, model: nn.Module, graph: ChannelGraph, keep_masks: Sequence[torch.Tensor],
                      scales: Sequence[torch.Tensor | None] | None = None) -> dict[str, float]:
        """measure() of `model` materialized with `keep_masks`."""
        return self.measure(materialize(model, graph, keep_masks, scales).eval())


def confirmed_measurement(measure: Callable[[], dict[str, float]], expected_ms: float | None,
                          tolerance: float, extra: int = 2) -> dict[str, Any]:
    """measure() once; if that is off `expected_ms` (the finisher's own measurement of the same configuration)
    by more than `tolerance`, `extra` more times, and the median of them all by ms, with every reading listed."""
    readings = [measure()]
    # On a shared machine a candidate's timings sometimes read high for seconds on end while the dense runs
    # around them do not, which the ratio to the dense model cannot cancel: disagreeing with the finisher calls
    # for more readings.
    if expected_ms is not None and abs(readings[0]["ms"] / max(expected_ms, 1e-12) - 1.0) > tolerance:
        readings += [measure() for _ in range(extra)]
    chosen = sorted(readings, key=lambda r: r["ms"])[(len(readings) - 1) // 2]
    return {**chosen, "readings_ms": [r["ms"] for r in readings]}


def accept_margin(tolerance: float, margin: float | None = None) -> float:
    """How far over (or under) the target, as a share of it, the finisher accepts a reading: `margin`, at most the
    tolerance, else half the tolerance."""
    return tolerance / 2 if margin is None else min(float(margin), tolerance)
