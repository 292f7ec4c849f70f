from __future__ import annotations

import numpy as np
import pytest

from latency.evaluation import FlopsLinear, LayerTable, build_data, metrics, split_keys
from latency.sampler import config_key, sample_configs
from latency.samples import LatencySample


def test_metrics_on_known_values():
    m = metrics(np.array([1.0, 2.15, 2.9, 4.5]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert m["n"] == 4
    assert m["mape"] == pytest.approx((0 + 7.5 + 100 / 30 + 12.5) / 4)
    assert m["within_5"] == pytest.approx(0.5) and m["within_10"] == pytest.approx(0.75)
    assert m["spearman"] == pytest.approx(1.0)


def test_split_is_reproducible_and_partial():
    keys = [f"k{i}" for i in range(50)]
    test = split_keys(keys, 0.2, seed=1)
    assert len(test) == 10 and test == split_keys(keys, 0.2, seed=1) and set(test) < set(keys)
    with pytest.raises(ValueError):
        split_keys(keys, 1.5)


def test_baselines_recover_what_they_can_express(tiny_target, cpu_device):
    from latency.device import current_fingerprint

    fp = current_fingerprint(cpu_device)
    samples = []
    for i, c in enumerate(sample_configs(tiny_target.group_sizes, 60, seed=0)):
        macs = float(tiny_target.cost.macs(list(c.keep_counts))) / tiny_target.cost.dense_macs
        ratio = 0.2 + 0.8 * macs
        samples.append(LatencySample(key=config_key(c.keep_counts, 16), kind=c.kind, arch="resnet20", resolution=16,
                                     keep_counts=list(c.keep_counts), latency_ms=2 * ratio, iqr_ratio=0.0,
                                     reference_ms=2.0, ratio=ratio, runs=1, measured_at=float(i), fingerprint=fp))
    samples.append(samples[3].model_copy(update={"repeat": True}))
    data = build_data(samples, {16: tiny_target.cost})
    assert len(data) == 60  # the repeat is not a training sample
    linear = FlopsLinear().fit(data, data.ratio)
    assert linear.coef == pytest.approx([0.8, 0.2], abs=1e-6)
    table = LayerTable().fit(data, data.ratio)
    assert metrics(table.predict(data), data.ratio)["mape"] < 1.0
    assert data.reference_by_resolution() == [2.0]
