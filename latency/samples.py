"""Latency samples as JSON lines: one measurement per line, appended as it is taken (resumable)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from latency.device import EnvironmentFingerprint


class StoreError(ValueError):
    """A sample file that cannot be read."""


class LatencySample(BaseModel):
    """One measured width configuration, with the dense reference timed alongside it."""

    model_config = ConfigDict(extra="forbid")

    key: str
    kind: str
    arch: str
    resolution: int
    num_classes: int = 10
    in_channels: int = 3
    keep_counts: list[int]
    latency_ms: float = Field(gt=0)
    iqr_ratio: float = Field(ge=0)
    reference_ms: float | None = None
    reference_iqr_ratio: float | None = None
    latency_p10_ms: float | None = Field(None, description="10th percentile of the timed runs")
    reference_p10_ms: float | None = None
    ratio: float | None = Field(None, description="sample / reference, 10th percentiles of interleaved runs")
    attempts: int = 1
    noisy: bool = False
    slow: bool = Field(False, description="the reference ran slower than its quiet level in every attempt")
    runs: int
    measured_at: float = Field(description="unix time")
    repeat: bool = Field(False, description="a re-measurement for the repeatability floor")
    fingerprint: EnvironmentFingerprint

    @property
    def noise(self) -> float:
        """IQR/median of the sample or of its reference, whichever is larger."""
        return max(self.iqr_ratio, self.reference_iqr_ratio or 0.0)


def best_measurements(samples: Sequence[LatencySample]) -> dict[str, LatencySample]:
    """Per configuration key, its least noisy measurement (repeats left out; ties: the earliest)."""
    best: dict[str, LatencySample] = {}
    for s in samples:
        if not s.repeat and (s.key not in best or s.noise < best[s.key].noise):
            best[s.key] = s
    return best


class SampleStore:
    """Append-only JSONL file of LatencySample; a line cut short by a crash is dropped on the next write."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> list[LatencySample]:
        """All complete samples in the file (none if it does not exist)."""
        if not self.path.exists():
            return []
        text = self.path.read_text()
        lines = text.split("\n")
        complete = lines[:-1]  # the part after the last newline is empty or an interrupted write
        samples = []
        for number, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                samples.append(LatencySample.model_validate(json.loads(line)))
            except (json.JSONDecodeError, ValidationError) as exc:
                raise StoreError(f"{self.path}:{number}: not a latency sample ({str(exc).splitlines()[0]})") from None
        return samples

    def _drop_partial_line(self) -> None:
        with self.path.open("rb+") as fh:
            data = fh.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                fh.truncate(end)

    def append(self, sample: LatencySample) -> None:
        """Write one sample durably (flushed and fsynced) so an interrupted profile loses at most one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._drop_partial_line()
        with self.path.open("a") as fh:
            fh.write(sample.model_dump_json() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
