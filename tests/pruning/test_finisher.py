"""The finisher: trimming, growing and rounding masks by score, and the measured-latency loop (brackets,
cliffs, interpolation when the predictor is no guide)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pruning import zoo
from pruning.allocation import round_counts as rounded_counts
from pruning.allocation import trim_masks
from pruning.budget import Budget, BudgetCost
from pruning.cost import CostModel
from pruning.finisher import (
    between_masks,
    confirmed_measurement,
    fit_measured_latency,
    grow_masks,
    round_masks,
)
from pruning.groups import ChannelGraph
from tests.pruning.test_wgates import FakeLatency, resnet20_setup, tiny_setup


class FlatPredictor:
    """A budget whose predictor calls every configuration of up to `flat_until` kept channels equally fast
    (as a learned predictor can be over a range of widths) and everything wider slow."""

    def __init__(self, target: float, flat_until: int):
        self.target = target
        self.flat_until = flat_until

    def hard(self, counts) -> float:
        return 0.5 if sum(counts) <= self.flat_until else 0.9

    def fits(self, counts) -> bool:
        return self.hard(counts) <= self.target


def test_finisher_interpolates_counts_when_the_predictor_cannot_split_the_bracket():
    sizes = [16, 16]
    scores = [torch.rand(16, generator=torch.Generator().manual_seed(g)) for g in range(2)]
    start = [torch.topk(s, 6).indices for s in scores]
    masks = [torch.zeros(16, dtype=torch.bool).index_fill_(0, idx, True) for idx in start]
    budget = FlatPredictor(target=0.6, flat_until=24)

    def measure(current):  # the device: latency proportional to the kept channels, 1 ms dense
        return sum(int(m.sum()) for m in current) / 32

    fit = fit_measured_latency(budget, scores, masks, measure, sizes, tolerance=0.05, max_rounds=4)
    actions = [m["action"] for m in fit.measurements]
    assert fit.measurements[0]["measured_ms"] < 0.6 * 0.95  # starts far under
    assert any(m["measured_ms"] > 0.6 * 1.05 for m in fit.measurements)  # the predictor's aim overshot
    assert 0.6 * 0.95 <= fit.measured_ms <= 0.6 * 1.05, actions
    tried = [tuple(m["keep_counts"]) for m in fit.measurements if m["action"] != "restore"]
    assert len(tried) == len(set(tried))


def _flat_start():
    sizes = [16, 16]
    scores = [torch.rand(16, generator=torch.Generator().manual_seed(g)) for g in range(2)]
    masks = [torch.zeros(16, dtype=torch.bool).index_fill_(0, torch.topk(s, 6).indices, True) for s in scores]
    return sizes, scores, masks


def test_finisher_keeps_bisecting_a_bracket_that_is_still_under_the_band_after_its_rounds():
    sizes, scores, masks = _flat_start()
    budget = FlatPredictor(target=0.6, flat_until=24)

    def stepped(current):  # latency grows 20% per kept channel: only 20 channels land in the band
        return 0.6 * 1.2 ** (sum(int(m.sum()) for m in current) - 20)

    stopped = fit_measured_latency(budget, scores, masks, stepped, sizes, tolerance=0.05, bracket_rounds=0)
    assert stopped.measured_ms < 0.6 * 0.95  # three rounds end on the bracket's low end
    fit = fit_measured_latency(budget, scores, masks, stepped, sizes, tolerance=0.05)
    assert sum(fit.measurements[-1]["keep_counts"]) == 20 and fit.measured_ms == 0.6, fit.measurements
    assert fit.rounds == stopped.rounds + 2 <= 3 + 3


def test_finisher_goes_on_when_the_last_rounds_reading_is_read_again_over_the_band():
    sizes, scores, masks = _flat_start()
    budget = FlatPredictor(target=0.6, flat_until=32)
    budget.hard = lambda counts: sum(counts) / 32  # the predictor agrees with the device's first readings
    seen: list[int] = []

    def device(current):  # 1 ms dense, in proportion to the kept channels; 19 channels read in band only once
        n = sum(int(m.sum()) for m in current)
        seen.append(n)
        return 0.6 * 1.1 if n == 19 and seen.count(19) > 1 else n / 32

    fit = fit_measured_latency(budget, scores, masks, device, sizes, tolerance=0.05, max_rounds=1)
    assert [sum(m["keep_counts"]) for m in fit.measurements[:2]] == [12, 19]
    assert fit.measurements[1]["readings_ms"][0] == 19 / 32 and fit.measurements[1]["measured_ms"] > 0.6 * 1.05
    assert fit.rounds > 1 and sum(m.sum() for m in fit.keep_masks) == 18, fit.measurements
    assert fit.measured_ms == 18 / 32  # not the 12-channel start the loop would have gone back to


def test_finisher_accepts_readings_only_up_to_half_the_tolerance_over_the_target():
    sizes, scores, masks = _flat_start()
    budget = FlatPredictor(target=0.6, flat_until=24)
    budget.hard = lambda counts: sum(counts) / 32  # a predictor in proportion to the kept channels

    def device(current):  # 13 kept channels read 4% over the target, 12 read 4% under
        return 0.6 * (1.04 if sum(int(m.sum()) for m in current) >= 13 else 0.96)

    start = between_masks(scores, masks, [torch.ones(16, dtype=torch.bool)] * 2, 1 / 20)
    assert sum(int(m.sum()) for m in start) == 13
    lenient = fit_measured_latency(budget, scores, start, device, sizes, tolerance=0.05, accept_over=0.05)
    assert lenient.measured_ms == 0.6 * 1.04 and lenient.rounds == 0
    fit = fit_measured_latency(budget, scores, start, device, sizes, tolerance=0.05)
    assert fit.measured_ms == 0.6 * 0.96 and fit.channels_trimmed >= 1
    assert fit.report()["accept_over"] == 0.025


def test_between_masks_moves_the_total_by_whole_channels():
    scores = [torch.rand(16, generator=torch.Generator().manual_seed(g)) for g in range(2)]
    start = [torch.zeros(16, dtype=torch.bool).index_fill_(0, torch.arange(n), True) for n in (10, 9)]
    end = [torch.zeros(16, dtype=torch.bool).index_fill_(0, torch.arange(n), True) for n in (12, 12)]
    # The ends are five channels apart; rounding each group on its own gave 19 (no step) or 21 for these.
    assert sum(int(m.sum()) for m in between_masks(scores, start, end, 0.1)) == 20
    assert sum(int(m.sum()) for m in between_masks(scores, start, end, 0.25)) == 20
    assert sum(int(m.sum()) for m in between_masks(scores, start, end, 0.6)) == 22


def test_between_masks_steps_from_one_mask_towards_another():
    scores = [torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4])]
    start = [torch.tensor([1, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool)]
    end = [torch.tensor([1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)]
    half = between_masks(scores, start, end, 0.5)[0]
    assert int(half.sum()) == 4
    assert half[0] and half[2]  # what both keep stays
    assert not half[6] and not half[7]  # what neither keeps stays out, even with a better score than index 1
    assert half[4] and half[5]  # then the best of what only the wider one keeps
    assert between_masks(scores, start, end, 0.0)[0].tolist() == start[0].tolist()
    assert between_masks(scores, start, end, 1.0)[0].tolist() == end[0].tolist()
    assert int(between_masks(scores, start, end, 0.5, multiple=4)[0].sum()) == 4


def test_trim_and_grow_by_raw_or_normalized_scores():
    scores = [torch.tensor([0.5, -0.2, 0.1, 0.9]), torch.tensor([2.0, 1.5, 1.2])]
    masks = [torch.tensor([True, False, True, True]), torch.ones(3, dtype=torch.bool)]

    def fits_total(limit):
        return lambda counts: sum(counts) <= limit

    trimmed, removed = trim_masks(scores, masks, fits_total(4), normalize=False)
    # Raw scores: the two weakest kept channels overall are 0.1 (group 0) and 0.5 (group 0).
    assert removed == 2 and trimmed[0].tolist() == [False, False, False, True] and trimmed[1].all()
    trimmed_norm, removed_norm = trim_masks(scores, masks, fits_total(4), normalize=True)
    assert removed_norm == 2 and int(trimmed_norm[1].sum()) < 3  # normalized: group 1 loses its weakest
    grown, added = grow_masks(scores, masks, fits_total(7), normalize=False)
    assert added == 1 and grown[0].all()
    same, none = grow_masks(scores, masks, fits_total(5), normalize=False)
    assert none == 0 and [m.tolist() for m in same] == [m.tolist() for m in masks]


def test_grow_goes_past_a_channel_that_does_not_fit():
    # Group 0's removed channel ranks first but costs 10 (a predictor's jump at one count); group 1's cost 1.
    scores = [torch.tensor([5.0, 9.0]), torch.tensor([1.0, 3.0, 2.0, 0.5])]
    masks = [torch.tensor([True, False]), torch.tensor([True, False, False, False])]

    def fits(counts):
        return 10 * (counts[0] - 1) + counts[1] <= 3

    grown, added = grow_masks(scores, masks, fits, normalize=False)
    assert added == 2 and grown[0].tolist() == [True, False]
    assert grown[1].tolist() == [True, True, True, False]  # the best two of group 1's removed channels
    assert fits([int(m.sum()) for m in grown])


def test_rounding_to_a_channel_multiple():
    assert rounded_counts([5, 3, 12, 16], [16, 16, 16, 16], 4, "nearest") == [4, 4, 12, 16]
    assert rounded_counts([5, 3, 15, 16], [16, 16, 16, 16], 4, "down") == [4, 4, 12, 16]
    scores = [torch.arange(8.0), torch.arange(8.0)]
    masks = [torch.arange(8) >= 2, torch.arange(8) >= 5]  # 6 and 3 kept
    rounded = round_masks(scores, masks, 4, lambda counts: sum(counts) <= 8, [8, 8])
    assert [int(m.sum()) for m in rounded] == [4, 4]  # nearest would be 8 + 4: too big, so down
    assert rounded[0].tolist() == [False] * 4 + [True] * 4  # the best channels stay


def cost_budget(cost: CostModel, target_ms: float, latency: FakeLatency) -> BudgetCost:
    return BudgetCost(Budget("latency_ms", target_ms, "fake"), cost, latency)


def test_measured_latency_finisher_trims_until_the_device_fits():
    model, graph, cost = tiny_setup()
    latency = FakeLatency(cost, bias=1.3)
    budget = cost_budget(cost, 0.6 * float(cost.dense_macs) / 1e6, latency)
    scores = [torch.rand(g.size) for g in graph.groups]
    masks, _ = trim_masks(scores, [torch.ones(g.size, dtype=torch.bool) for g in graph.groups], budget.fits)
    calls = []

    def measure(current):
        calls.append([int(m.sum()) for m in current])
        return budget.hard(calls[-1]) * 1.3  # the device is 30% slower than predicted

    fit = fit_measured_latency(budget, scores, masks, measure, graph.sizes, tolerance=0.05, max_rounds=3)
    assert fit.measurements[0]["measured_ms"] > budget.target * 1.05
    assert fit.rounds >= 1 and fit.channels_trimmed > 0 and fit.within_tolerance
    assert fit.measured_ms <= budget.target * 1.05
    assert [int(m.sum()) for m in fit.keep_masks] == calls[-1]
    report = fit.report()
    assert report["rounds"] == fit.rounds and len(report["measurements"]) == fit.rounds + 1


def test_measured_latency_finisher_brackets_a_latency_cliff_instead_of_oscillating():
    model = zoo.build_model("resnet20", 10, 3).eval()
    graph = ChannelGraph.build(model, (1, 3, 16, 16))
    cost = CostModel(graph)
    dense_ms = float(cost.dense_macs) / 1e6
    budget = cost_budget(cost, 0.5 * dense_ms, FakeLatency(cost))
    target = budget.target

    def cliff(masks):  # exact up to 90% of the target, then 40% slower than predicted
        predicted = budget.hard([int(m.sum()) for m in masks])
        return predicted if predicted <= 0.9 * target else 1.4 * predicted

    scores = [torch.rand(g.size, generator=torch.Generator().manual_seed(g.index)) for g in graph.groups]
    full = [torch.ones(g.size, dtype=torch.bool) for g in graph.groups]
    fit = fit_measured_latency(budget, scores, full, cliff, graph.sizes, tolerance=0.05, max_rounds=6)
    tried = [tuple(m["keep_counts"]) for m in fit.measurements if m["action"] != "restore"]
    assert len(tried) == len(set(tried))  # never measures the same configuration twice
    assert 0.85 * target <= fit.measured_ms <= 0.9 * target
    assert [int(m.sum()) for m in fit.keep_masks] == list(fit.measurements[-1]["keep_counts"])


def test_measured_latency_finisher_stops_at_one_channel_per_group_when_the_device_is_far_too_slow():
    _, graph, cost = tiny_setup()
    budget = cost_budget(cost, 0.5 * float(cost.dense_macs) / 1e6, FakeLatency(cost))
    full = [torch.ones(g.size, dtype=torch.bool) for g in graph.groups]
    scores = [torch.rand(g.size) for g in graph.groups]
    fit = fit_measured_latency(budget, scores, full, lambda m: 100 * budget.hard([int(x.sum()) for x in m]),
                               graph.sizes, max_rounds=2)
    assert [int(m.sum()) for m in fit.keep_masks] == [1] * len(graph.groups)
    assert not fit.within_tolerance and fit.report()["within_tolerance"] is False


def test_measured_latency_finisher_grows_when_far_under_and_rounds_only_if_faster():
    _, graph, cost = tiny_setup()
    latency = FakeLatency(cost)
    budget = cost_budget(cost, 0.7 * float(cost.dense_macs) / 1e6, latency)
    scores = [torch.rand(g.size) for g in graph.groups]
    masks, _ = trim_masks(scores, [torch.ones(g.size, dtype=torch.bool) for g in graph.groups], budget.fits)

    def slow_measure(current):
        return budget.hard([int(m.sum()) for m in current]) * 0.7

    fit = fit_measured_latency(budget, scores, masks, slow_measure, graph.sizes, tolerance=0.05)
    assert fit.channels_added > 0 and fit.measured_ms > fit.measurements[0]["measured_ms"]

    odd = [torch.arange(8) >= 3, torch.arange(12) >= 5]  # 5 and 7 kept: the nearest multiples of 4 are 4, 8
    roomy = cost_budget(cost, 2 * budget.dense(), latency)
    for factor, applied in ((2.0, False), (0.5, True)):
        def rounding_changes_speed(current, factor=factor):
            counts = [int(m.sum()) for m in current]
            return roomy.hard(counts) * (factor if all(c % 4 == 0 for c in counts) else 1.0)

        fit = fit_measured_latency(roomy, scores, odd, rounding_changes_speed, graph.sizes, tolerance=0.9,
                                       round_to=4, grow=False)
        assert fit.rounding_applied is applied and bool(fit.measurements[1].get("rejected")) is not applied
        expected = [4, 8] if applied else [5, 7]
        assert [int(m.sum()) for m in fit.keep_masks] == expected


def test_final_measurement_is_repeated_only_when_it_disagrees_with_the_finisher():
    def meter(*values):
        readings = iter(values)
        return lambda: {"ms": next(readings), "ratio": 0.0}

    once = confirmed_measurement(meter(0.30, 9.0), expected_ms=0.29, tolerance=0.05)
    assert once["ms"] == 0.30 and once["readings_ms"] == [0.30]
    # A reading far off the finisher's (a burst on the shared machine) is outvoted by two more.
    outlier = confirmed_measurement(meter(0.418, 0.296, 0.297), expected_ms=0.29, tolerance=0.05)
    assert outlier["ms"] == 0.297 and outlier["readings_ms"] == [0.418, 0.296, 0.297]
    unknown = confirmed_measurement(meter(0.5), expected_ms=None, tolerance=0.05)
    assert unknown["readings_ms"] == [0.5]


def test_measured_latency_finisher_confirms_a_reading_that_disagrees_before_trimming_on_it():
    _, graph, cost = tiny_setup()
    budget = cost_budget(cost, 0.6 * float(cost.dense_macs) / 1e6, FakeLatency(cost))
    scores = [torch.rand(g.size, generator=torch.Generator().manual_seed(g.index)) for g in graph.groups]
    start, _ = trim_masks(scores, [torch.ones(g.size, dtype=torch.bool) for g in graph.groups], budget.fits)

    slower = 1.1 * budget.target / budget.hard([int(m.sum()) for m in start])  # the start reads 10% over

    def noisy_device():
        seen: list[list[int]] = []

        def measure(current):  # the first reading of the first trim hits a burst
            counts = [int(m.sum()) for m in current]
            seen.append(counts)
            burst = 1.4 if counts != seen[0] and seen.count(counts) == 1 else 1.0
            return budget.hard(counts) * slower * burst

        return measure

    confirmed = fit_measured_latency(budget, scores, start, noisy_device(), graph.sizes, tolerance=0.05)
    trim = confirmed.measurements[1]
    assert trim["action"] == "trim" and len(trim["readings_ms"]) == 3
    assert max(trim["readings_ms"]) > 1.3 * budget.target > 1.05 * budget.target > trim["measured_ms"]
    assert confirmed.within_tolerance and confirmed.measured_ms >= budget.target * 0.95
    trusting = fit_measured_latency(budget, scores, start, noisy_device(), graph.sizes, tolerance=0.05,
                                    confirm_readings=0)
    assert "readings_ms" not in trusting.measurements[1]
    assert trusting.channels_trimmed > confirmed.channels_trimmed  # one burst reading cut channels it needed


class RelativeLatency(FakeLatency):
    """A device that times a model interleaved with a reference: the ratio of their MACs, with `measure_ms`
    (timed alone) off by a burst that must not reach the meter."""

    reference_ms = 2.0
    times_relative = True

    def measure_ms(self, onnx_path: str, model=None) -> float:  # noqa: ANN001
        raise AssertionError("timed alone although the device can time against the reference")

    def measure_relative(self, onnx_path, reference_path, model=None, reference_model=None):  # noqa: ANN001, ANN201
        from pruning.oracle import RelativeReading
        from tests.pruning.test_wgates import onnx_macs

        ratio = onnx_macs(onnx_path) / onnx_macs(reference_path)
        return RelativeReading(ratio=ratio, raw_ms=ratio * 1.5, slow_retries=0)


def test_device_meter_times_candidates_interleaved_with_the_dense_model_where_the_device_can():
    from pruning.finisher import DeviceMeter

    model, graph, cost = tiny_setup()
    meter = DeviceMeter(RelativeLatency(cost), model, graph.input_shape)
    half = [torch.arange(g.size) < max(1, g.size // 2) for g in graph.groups]
    reading = meter.measure_masks(model, graph, half)
    expected = float(cost.macs([int(m.sum()) for m in half])) / float(cost.dense_macs)
    assert abs(reading["ratio"] - expected) < 1e-6 and abs(reading["ms"] - 2.0 * expected) < 1e-6
    assert abs(reading["raw_ms"] - 1.5 * expected) < 1e-6


def test_device_meter_exports_the_dense_model_once_for_all_its_readings(monkeypatch):
    from pruning import meter as meter_module

    model, graph, cost = tiny_setup()
    meter = meter_module.DeviceMeter(RelativeLatency(cost), model, graph.input_shape)
    exported = []
    real_export = meter_module.export_onnx

    def counting_export(net, path, input_shape):  # noqa: ANN001, ANN202
        exported.append(net)
        return real_export(net, path, input_shape)

    monkeypatch.setattr(meter_module, "export_onnx", counting_export)
    half = [torch.arange(g.size) < max(1, g.size // 2) for g in graph.groups]
    readings = [meter.measure_masks(model, graph, half)["ratio"] for _ in range(3)]
    assert len(exported) == 4 and sum(net is meter.dense for net in exported) == 1
    assert readings[0] == readings[1] == readings[2] < 1
    dense_folder = meter._dense_folder.name
    del meter
    import gc

    gc.collect()
    assert not Path(dense_folder).exists()  # the dense export goes with its meter


def test_measured_latency_finisher_grows_other_groups_when_one_group_falls_off_a_latency_cliff():
    model = zoo.build_model("resnet20", 10, 3).eval()
    graph = ChannelGraph.build(model, (1, 3, 16, 16))
    cost = CostModel(graph)
    latency = FakeLatency(cost)
    cliff_group = max(range(len(graph.sizes)), key=lambda g: graph.sizes[g])
    start = [torch.arange(size) < 3 * size // 4 for size in graph.sizes]
    start_counts = [int(m.sum()) for m in start]
    start_ms = BudgetCost(Budget("latency_ms", 1.0, "fake"), cost, latency).hard(start_counts)
    budget = cost_budget(cost, start_ms / 0.92, latency)
    # The cliff group's removed channels score highest, so a plain grow takes them first.
    scores = [torch.full((size,), 10.0) if g == cliff_group
              else torch.rand(size, generator=torch.Generator().manual_seed(g)) for g, size in enumerate(graph.sizes)]

    def device(masks):  # exact, but twice as slow once the cliff group keeps more than it starts with
        counts = [int(m.sum()) for m in masks]
        slow = counts[cliff_group] > start_counts[cliff_group]
        return budget.hard(counts) * (2.0 if slow else 1.0)

    fit = fit_measured_latency(budget, scores, start, device, graph.sizes, tolerance=0.05, max_rounds=3,
                               normalize=False)
    actions = [m["action"] for m in fit.measurements]
    assert actions[:2] == ["initial", "grow"] and fit.measurements[1]["measured_ms"] > budget.target * 1.05
    assert fit.measurements[1]["keep_counts"][cliff_group] > start_counts[cliff_group]
    past = next(m for m in fit.measurements if m["action"] == "grow_past_cliff")
    assert cliff_group in past["capped_groups"]
    assert fit.within_tolerance and fit.measured_ms >= budget.target * 0.95, fit.measurements
    assert [int(m.sum()) for m in fit.keep_masks][cliff_group] == start_counts[cliff_group]
    assert sum(int(m.sum()) for m in fit.keep_masks) > sum(start_counts)


def test_measured_latency_finisher_reads_a_configuration_again_before_accepting_it_inside_the_band():
    _, graph, cost = tiny_setup()
    budget = cost_budget(cost, 0.6 * float(cost.dense_macs) / 1e6, FakeLatency(cost))
    scores = [torch.rand(g.size, generator=torch.Generator().manual_seed(g.index)) for g in graph.groups]
    start, _ = trim_masks(scores, [torch.ones(g.size, dtype=torch.bool) for g in graph.groups], budget.fits)
    start_counts = [int(m.sum()) for m in start]
    faster = 0.75 * budget.target / budget.hard(start_counts)  # the start really reads 25% under

    def lucky_device():
        seen: list[list[int]] = []

        def measure(current):  # the start's first reading comes out high, inside the band and near the prediction
            counts = [int(m.sum()) for m in current]
            seen.append(counts)
            high = 0.97 / 0.75 if counts == start_counts and seen.count(counts) == 1 else 1.0
            return budget.hard(counts) * faster * high

        return measure

    settled = fit_measured_latency(budget, scores, start, lucky_device(), graph.sizes, tolerance=0.1)
    first = settled.measurements[0]
    # The band is 0.95-1.05 of the target (accept_under and accept_over: half the tolerance).
    assert first["readings_ms"][0] > 0.95 * budget.target > first["measured_ms"]
    assert settled.channels_added > 0 and settled.within_tolerance
    assert settled.measured_ms >= 0.95 * budget.target
    final = [m for m in settled.measurements if m["keep_counts"] == [int(k.sum()) for k in settled.keep_masks]]
    assert len(final[-1]["readings_ms"]) == 3  # the accepted configuration was read three times too
    trusting = fit_measured_latency(budget, scores, start, lucky_device(), graph.sizes, tolerance=0.1,
                                    confirm_readings=0)
    assert trusting.channels_added == 0 and trusting.measured_ms > 0.95 * budget.target


def test_measured_latency_finisher_grows_a_configuration_that_reads_just_inside_the_tolerance_under_the_target():
    _, graph, cost = resnet20_setup()
    budget = cost_budget(cost, 0.5 * float(cost.dense_macs) / 1e6, FakeLatency(cost))
    scores = [torch.rand(g.size, generator=torch.Generator().manual_seed(g.index)) for g in graph.groups]
    start, _ = trim_masks(scores, [torch.ones(g.size, dtype=torch.bool) for g in graph.groups], budget.fits)

    factor = 0.96 * budget.target / budget.hard([int(m.sum()) for m in start])

    def measure(current):  # the start reads 0.96 x the target: inside the tolerance, 4% of the budget unused
        return budget.hard([int(m.sum()) for m in current]) * factor

    assert measure(start) == pytest.approx(0.96 * budget.target)
    fit = fit_measured_latency(budget, scores, start, measure, graph.sizes, tolerance=0.05)
    assert fit.accept_under == 0.025 and fit.report()["accept_under"] == 0.025
    assert fit.channels_added > 0 and 0.975 * budget.target <= fit.measured_ms <= 1.025 * budget.target
    # With the tolerance as the band's lower edge (as before), the start is kept as it reads.
    loose = fit_measured_latency(budget, scores, start, measure, graph.sizes, tolerance=0.05, accept_under=0.05)
    assert loose.rounds == 0 and loose.channels_added == 0 and loose.measured_ms == measure(start)


def test_the_search_aims_by_scaling_alone_and_by_the_secant_of_a_bracket():
    from pruning.finisher_steps import Probe, scaled_aim, secant_aim, tried

    assert scaled_aim(predicted=2.0, measured=4.0, target=3.0) == pytest.approx(1.5)
    masks = [torch.tensor([True, False])]
    lo, hi = Probe(masks, predicted=1.0, measured=0.8), Probe([torch.tensor([True, True])], 2.0, 1.6)
    # The line through (1.0, 0.8) and (2.0, 1.6) meets a target of 1.2 at a predicted 1.5.
    assert secant_aim(lo, hi, target=1.2) == pytest.approx(1.5)
    assert secant_aim(lo, Probe(masks, 0.5, 1.6), target=1.2) is None  # no bracket: predicted order reversed
    assert tried([torch.tensor([False, True])], [lo]) and not tried([torch.tensor([True, True])], [lo])
