"""The worker's latency object carries the device's spec, so wgates' finisher may round to its channel multiple."""

from __future__ import annotations

from types import SimpleNamespace

from latency.device import DeviceSpec
from pruning.methods.wgates import device_multiple
from pruning.methods.wgates_params import WGatesParams
from workers.cohort_job import PredictOnly


def context(latency, **params) -> SimpleNamespace:
    return SimpleNamespace(params=WGatesParams(**params), budget=SimpleNamespace(latency=latency))


def test_the_devices_channel_multiple_reaches_wgates_through_the_worker():
    latency = PredictOnly(SimpleNamespace(spec=DeviceSpec(name="npu", channel_multiple=8)))
    assert latency.spec.channel_multiple == 8
    assert device_multiple(context(latency)) == 8
    # An explicit round_to wins; device_rounding=False leaves the channels alone.
    assert device_multiple(context(latency, round_to=4)) == 4
    assert device_multiple(context(latency, device_rounding=False)) == 1
    assert device_multiple(context(None)) == 1
