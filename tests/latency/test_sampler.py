from __future__ import annotations

import numpy as np
import pytest

from latency.sampler import config_key, sample_configs

SIZES = [16, 16, 32, 32, 64, 64, 64]


def test_sampler_covers_kinds_bounds_and_unaligned_counts():
    configs = sample_configs(SIZES, 200, seed=3)
    assert configs[0].kind == "dense" and list(configs[0].keep_counts) == SIZES
    assert {c.kind for c in configs} == {"dense", "uniform", "single", "random", "levelled", "aligned"}
    assert len({c.keep_counts for c in configs}) == len(configs)
    for c in configs:
        assert all(1 <= k <= s for k, s in zip(c.keep_counts, SIZES, strict=True))
    counts = [k for c in configs for k in c.keep_counts]
    assert any(k % 8 for k in counts) and any(k % 8 == 0 and k % 16 for k in counts)
    singles = [c for c in configs if c.kind == "single"]
    # each single-group sweep moves one group off the 8-channel grid
    assert all(any(k % 8 for k in c.keep_counts) for c in singles)
    ratios = [k / s for c in configs if c.kind == "random" for k, s in zip(c.keep_counts, SIZES, strict=True)]
    assert min(ratios) < 0.2 and max(ratios) > 0.9
    aligned = [c for c in configs if c.kind == "aligned"]
    assert aligned and all(k % 8 == 0 for c in aligned for k in c.keep_counts)
    # levelled configurations reach the small and the nearly dense models that uniform ratios rarely do
    means = [np.mean(np.divide(c.keep_counts, SIZES)) for c in configs if c.kind == "levelled"]
    assert min(means) < 0.25 and max(means) > 0.85


def test_configurations_are_a_deterministic_prefix():
    short, long = sample_configs(SIZES, 30, seed=1), sample_configs(SIZES, 90, seed=1)
    assert long[:30] == short
    assert sample_configs(SIZES, 30, seed=2) != short


def test_config_key_depends_on_widths_and_resolution():
    assert config_key([1, 2], 32) == config_key((1, 2), 32)
    assert config_key([1, 2], 32) != config_key([1, 2], 64)
    assert config_key([1, 2], 32) != config_key([2, 1], 32)


def test_bad_sampler_input():
    with pytest.raises(ValueError):
        sample_configs([], 5)
    with pytest.raises(ValueError):
        sample_configs(SIZES, 0)
