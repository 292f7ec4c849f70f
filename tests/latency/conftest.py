"""Latency fixtures: a tiny profiled architecture (resnet20 at 16x16), a CPU device, a quick timing plan."""

from __future__ import annotations

import pytest

from latency.device import make_device
from latency.timing import TimingPlan

TINY_ARCH, TINY_RES = "resnet20", 16
QUICK_PLAN = TimingPlan(warmup_runs=1, blocks=2, runs_per_block=3, max_noise=10.0, max_attempts=1)


@pytest.fixture(scope="session")
def tiny_target():
    from latency.profiler import ProfileTarget

    return ProfileTarget.build(TINY_ARCH, TINY_RES)


@pytest.fixture
def cpu_device():
    return make_device(name="cpu1", runtime="onnxruntime", provider="cpu", threads=1, batch=1)
