from __future__ import annotations

import pytest

import latency.profiler as profiler
from latency.profiler import ProfileCancelled, profile, repeatability
from latency.sampler import config_key
from latency.samples import SampleStore
from latency.timing import TimingPlan
from tests.latency.conftest import QUICK_PLAN


def test_profile_stores_interleaved_samples_and_resumes_without_remeasuring(tmp_path, tiny_target, cpu_device,
                                                                            monkeypatch):
    store = SampleStore(tmp_path / "p.jsonl")
    first = profile(cpu_device, tiny_target, store, 5, repeat_share=0.0, plan=QUICK_PLAN)
    assert (first.measured, first.skipped, first.repeats) == (5, 0, 0)
    samples = store.load()
    assert len(samples) == 5 and samples[0].kind == "dense"
    for s in samples:
        assert s.latency_ms > 0 and s.reference_ms > 0 and s.ratio > 0
        assert s.key == config_key(s.keep_counts, tiny_target.resolution)
        assert s.fingerprint.threads == 1 and not s.repeat

    built = []
    original = profiler.make_runner

    def counting(spec, target, counts, workdir, tag):
        built.append(tag)
        return original(spec, target, counts, workdir, tag)

    monkeypatch.setattr(profiler, "make_runner", counting)
    again = profile(cpu_device, tiny_target, store, 5, repeat_share=0.0, plan=QUICK_PLAN)
    assert (again.measured, again.skipped) == (0, 5)
    assert built == ["reference"]  # nothing but the reference is built when everything is measured
    more = profile(cpu_device, tiny_target, store, 7, repeat_share=0.0, plan=QUICK_PLAN)
    assert (more.measured, more.skipped) == (2, 5)
    assert len({s.key for s in store.load()}) == 7


def test_repeats_give_a_repeatability_floor(tmp_path, tiny_target, cpu_device):
    store = SampleStore(tmp_path / "p.jsonl")
    result = profile(cpu_device, tiny_target, store, 4, repeat_share=0.5, plan=QUICK_PLAN)
    assert result.repeats == 2
    repeats = [s for s in store.load() if s.repeat]
    assert len(repeats) == 2 and store.load()[-1].repeat
    floor = result.repeatability
    assert floor["pairs"] == 2 and floor["median_gap_s"] >= 0
    assert 0 <= floor["absolute_ms"]["within_10"] <= 1 and "relative" in floor
    # resuming does not repeat again
    assert profile(cpu_device, tiny_target, store, 4, repeat_share=0.5, plan=QUICK_PLAN).repeats == 0
    assert repeatability([s for s in store.load() if not s.repeat]) is None


def test_cancel_keeps_what_was_measured(tmp_path, tiny_target, cpu_device):
    store = SampleStore(tmp_path / "p.jsonl")
    calls = []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(ProfileCancelled):
        profile(cpu_device, tiny_target, store, 6, repeat_share=0.0, plan=QUICK_PLAN, should_cancel=should_cancel)
    assert len(store.load()) == 2


def test_noisy_configurations_are_retried_once_after_the_main_pass(tmp_path, tiny_target, cpu_device):
    store = SampleStore(tmp_path / "p.jsonl")
    always_noisy = TimingPlan(warmup_runs=0, blocks=2, runs_per_block=3, max_noise=1e-12, max_attempts=1)
    result = profile(cpu_device, tiny_target, store, 3, repeat_share=0.0, plan=always_noisy, noisy_retries=1)
    assert (result.measured, result.retried, result.noisy) == (3, 3, 3)
    assert [s.key for s in store.load()[3:]] == [s.key for s in store.load()[:3]]
    again = profile(cpu_device, tiny_target, store, 3, repeat_share=0.0, plan=always_noisy, noisy_retries=1)
    assert (again.measured, again.retried) == (0, 0)  # the retry budget is spent
