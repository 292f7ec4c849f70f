"""The measured-latency finisher where the predictor is no guide inside a bracket, and mask interpolation."""

from __future__ import annotations

import torch

from pruning.finisher import between_masks, fit_measured_latency


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
