from __future__ import annotations

import itertools

import pytest

from latency.timing import QuietReference, TimingPlan, measure, summarize


class FakeClock:
    """A clock that only moves when a fake inference advances it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def scripted_run(clock: FakeClock, durations_s):
    """A fake inference that advances `clock` by the next duration of `durations_s` on every call."""
    it = iter(durations_s)

    def run() -> None:
        clock.now += next(it)

    return run


def test_stable_runs_measure_once_with_exact_median():
    clock = FakeClock()
    plan = TimingPlan(warmup_runs=2, blocks=3, runs_per_block=4, max_noise=0.10, max_attempts=3)
    m = measure(scripted_run(clock, itertools.repeat(0.002)), plan, clock)
    assert m.attempts == 1 and not m.noisy
    assert m.sample.median_ms == pytest.approx(2.0)
    assert m.sample.iqr_ratio == pytest.approx(0.0)
    assert m.sample.runs == 12


def test_noisy_attempt_is_remeasured_and_the_quiet_one_kept():
    clock = FakeClock()
    plan = TimingPlan(warmup_runs=1, blocks=2, runs_per_block=4, max_noise=0.10, max_attempts=3)
    per_attempt = plan.warmup_runs + plan.blocks * plan.runs_per_block
    noisy = [0.001, 0.003] * (per_attempt // 2) + [0.001] * (per_attempt % 2)
    quiet = [0.002] * per_attempt
    m = measure(scripted_run(clock, noisy + quiet), plan, clock)
    assert m.attempts == 2
    assert m.noise_history[0] > 0.10 and m.noise_history[1] == pytest.approx(0.0)
    assert not m.noisy
    assert m.sample.median_ms == pytest.approx(2.0)


def test_always_noisy_gives_up_after_max_attempts_and_flags_it():
    clock = FakeClock()
    plan = TimingPlan(warmup_runs=0, blocks=2, runs_per_block=4, max_noise=0.10, max_attempts=3)
    m = measure(scripted_run(clock, itertools.cycle([0.001, 0.004])), plan, clock)
    assert m.attempts == 3 and m.noisy
    assert len(m.noise_history) == 3


def test_interleaved_reference_ratio_cancels_drift_between_blocks():
    # The machine slows down 2x after the first block pair; sample = 0.5 x reference throughout.
    clock = FakeClock()
    plan = TimingPlan(warmup_runs=0, blocks=2, runs_per_block=3, max_noise=10.0, max_attempts=1)
    speed = {"factor": 1.0, "calls": 0}

    def advance(base):
        def run():
            clock.now += base * speed["factor"]
            speed["calls"] += 1
            if speed["calls"] == 6:  # after block 0 of both models
                speed["factor"] = 2.0
        return run

    m = measure(advance(0.001), plan, clock, reference=advance(0.002))
    assert m.ratio == pytest.approx(0.5)
    assert m.reference is not None and m.sample.block_medians_ms == pytest.approx([1.0, 2.0])


def test_summary_and_plan_validation():
    t = summarize([0.001, 0.002, 0.003, 0.004], [[0.001, 0.002], [0.003, 0.004]])
    assert t.median_ms == pytest.approx(2.5)
    assert t.iqr_ratio == pytest.approx(1.5 / 2.5)
    assert t.block_medians_ms == pytest.approx([1.5, 3.5])
    with pytest.raises(ValueError):
        TimingPlan(blocks=0)


def test_ratio_ignores_contention_spikes():
    # Every third run of both models is hit by another process; the fast runs still give the true 1:2.
    clock = FakeClock()
    plan = TimingPlan(warmup_runs=0, blocks=4, runs_per_block=9, max_noise=10.0, max_attempts=1)

    def spiky(base):
        calls = itertools.count()
        return lambda: setattr(clock, "now", clock.now + base * (5.0 if next(calls) % 3 == 0 else 1.0))

    m = measure(spiky(0.001), plan, clock, reference=spiky(0.002))
    assert m.ratio == pytest.approx(0.5)
    assert m.sample.iqr_ratio > 0.10  # the spikes do show in the spread


def test_reference_alternates_run_by_run_so_a_steady_slowdown_hits_both_models_alike():
    # The machine slows by 5% of its speed on every inference. Alternated block by block (10 runs of one model,
    # then 10 of the other) the sample's fast runs come from earlier than the reference's and the ratio of
    # 10th percentiles read ~0.34 for a true 0.5; alternated run by run both come from the same moments.
    clock = FakeClock()
    plan = TimingPlan(warmup_runs=0, blocks=2, runs_per_block=10, max_noise=10.0, max_attempts=1)
    calls = itertools.count()
    order = []

    def slowing(base, name):
        def run():
            order.append(name)
            clock.now += base * (1.0 + 0.05 * next(calls))
        return run

    m = measure(slowing(0.001, "s"), plan, clock, reference=slowing(0.002, "r"))
    assert order[:6] == ["s", "r", "r", "s", "s", "r"]
    assert m.ratio == pytest.approx(0.5, rel=0.05)
    assert m.sample.runs == m.reference.runs == 20


def test_a_reading_in_a_slow_spell_is_retried_after_a_pause_and_flagged_if_the_spell_outlasts_the_retries():
    # Slow spells add the same time to every inference, which inflates the small model's ratio (0.5 -> 0.6).
    clock = FakeClock()
    plan = TimingPlan(warmup_runs=0, blocks=2, runs_per_block=5, max_noise=10.0, max_attempts=1, slow_retries=2,
                      slow_pause_s=0.7)
    spell = {"extra_s": 0.0}

    def model(base):
        def run():
            clock.now += base + spell["extra_s"]
        return run

    quiet = QuietReference()
    m = measure(model(0.001), plan, clock, reference=model(0.002), quiet=quiet)
    assert m.ratio == pytest.approx(0.5) and not m.slow and quiet.level_ms == pytest.approx(2.0)

    pauses = []

    def sleep(seconds):
        pauses.append(seconds)
        spell["extra_s"] = 0.0  # the spell is over after the pause

    spell["extra_s"] = 0.0005
    m = measure(model(0.001), plan, clock, reference=model(0.002), quiet=quiet, sleep=sleep)
    assert pauses == [0.7]
    assert m.ratio == pytest.approx(0.5) and not m.slow and m.slow_retries == 1 and m.attempts == 2

    spell["extra_s"] = 0.0005
    m = measure(model(0.001), plan, clock, reference=model(0.002), quiet=quiet, sleep=lambda s: None)
    assert m.slow and m.slow_retries == 3 and m.attempts == 3
    assert m.ratio == pytest.approx(0.0015 / 0.0025)

    # Without a quiet level (or a reference) nothing is retried.
    m = measure(model(0.001), plan, clock, reference=model(0.002), sleep=sleep)
    assert m.attempts == 1 and not m.slow and m.ratio == pytest.approx(0.6)


def test_quiet_level_is_the_fastest_of_a_window_so_a_lasting_slowdown_stops_counting_as_a_spell():
    quiet = QuietReference(window=3)
    assert quiet.level_ms is None and not quiet.is_slow(5.0, 0.08)
    quiet.observe(2.0)
    assert quiet.is_slow(2.5, 0.08) and not quiet.is_slow(2.1, 0.08)
    for _ in range(3):
        quiet.observe(2.5)
    assert quiet.level_ms == pytest.approx(2.5) and not quiet.is_slow(2.5, 0.08)
    with pytest.raises(ValueError):
        TimingPlan(slow_retries=-1)
