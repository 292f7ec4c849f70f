"""The budget finisher after a method: the measured-latency search that re-measures the materialized model on
the device and trims (or grows) it by importance until it reads within the band, and the same trim of an already
fine-tuned model. Its steps are in pruning.finisher_steps, the measuring in pruning.meter.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pruning.allocation import mask_counts, trim_masks
from pruning.budget import BudgetCost
from pruning.finisher_steps import (  # noqa: F401 - the steps, re-exported
    Fits,
    Masks,
    Probe,
    between_masks,
    brackets_from_below,
    capped_masks,
    cliff_caps,
    grow_masks,
    round_masks,
    scaled_aim,
    secant_aim,
    tried,
)
from pruning.groups import ChannelGraph
from pruning.meter import (  # noqa: F401 - the measuring, re-exported
    DeviceMeter,
    accept_margin,
    confirmed_measurement,
    measure_model_ms,
)
from pruning.surgery import materialize


@dataclass
class LatencyFit:
    """What the measured-latency finisher did: final masks, every measurement, channels trimmed/added."""

    keep_masks: Masks
    target_ms: float
    tolerance: float
    measurements: list[dict[str, Any]] = field(default_factory=list)
    rounds: int = 0
    channels_trimmed: int = 0
    channels_added: int = 0
    round_to: int = 1
    rounding_applied: bool = False
    accept_over: float | None = None  # how far over the target the finisher accepted a reading (None: tolerance)
    accept_under: float | None = None  # how far under the target it accepted one (None: tolerance)

    @property
    def measured_ms(self) -> float:
        return self.measurements[-1]["measured_ms"]

    @property
    def within_tolerance(self) -> bool:
        return self.measured_ms <= self.target_ms * (1 + self.tolerance)

    def report(self) -> dict[str, Any]:
        """JSON-ready summary for report.json."""
        return {"target_ms": self.target_ms, "tolerance": self.tolerance, "accept_over": self.accept_over,
                "accept_under": self.accept_under, "rounds": self.rounds,
                "channels_trimmed": self.channels_trimmed, "channels_added": self.channels_added,
                "round_to": self.round_to, "rounding_applied": self.rounding_applied,
                "within_tolerance": self.within_tolerance, "measurements": self.measurements}


class LatencySearch:
    """The measured-latency finisher as a search over Probes (see fit_measured_latency for what it does): each
    round measures one new configuration, chosen by one of the steps in pruning.finisher_steps."""

    def __init__(self, budget: BudgetCost, scores: Sequence[torch.Tensor], measure_ms: Callable[[Masks], float],
                 sizes: Sequence[int], tolerance: float, normalize: bool, round_to: int, grow: bool,
                 confirm_readings: int, accept_over: float | None, accept_under: float | None):
        self.budget, self.scores, self.measure_ms, self.sizes = budget, scores, measure_ms, list(sizes)
        self.tolerance, self.normalize, self.round_to, self.grow = tolerance, normalize, round_to, grow
        self.confirm_readings = confirm_readings
        self.target = budget.target
        self.accept_over = accept_margin(tolerance, accept_over)
        self.accept_under = accept_margin(tolerance, accept_under)
        self.limit, self.low = self.target * (1 + self.accept_over), self.target * (1 - self.accept_under)
        self.probes: list[Probe] = []  # every usable measurement
        self.caps: dict[int, int] = {}  # groups held at a count because growing them fell off a latency cliff
        self.smallest = budget.hard([1] * len(self.sizes)) * (1 + 1e-6)
        self.fit: LatencyFit | None = None

    def predicted(self, masks: Masks) -> float:
        return self.budget.hard(mask_counts(masks))

    def record(self, masks: Masks, action: str) -> Probe:
        """Measure `masks` (confirmed where the reading disagrees with what the last probe implies)."""
        predicted = self.predicted(masks)
        # A trim that reads slower than the configuration it was cut from is a burst, not the model, and acting on
        # it would cut far below the budget.
        last = self.probes[-1] if self.probes else None
        expected = predicted * last.measured / max(last.predicted, 1e-12) if last else predicted
        reading = confirmed_measurement(lambda: {"ms": float(self.measure_ms(masks))}, expected, self.tolerance,
                                        self.confirm_readings)
        entry = {"action": action, "keep_counts": mask_counts(masks), "predicted_ms": predicted,
                 "measured_ms": reading["ms"]}
        if len(reading["readings_ms"]) > 1:
            entry["readings_ms"] = reading["readings_ms"]
        self.fit.measurements.append(entry)
        probe = Probe(masks, predicted, reading["ms"], entry)
        self.probes.append(probe)
        return probe

    def settle(self, probe: Probe, in_band_only: bool = True) -> float:
        """`probe`'s reading, first taken `confirm_readings` more times (median of all) if it was read once and is
        about to be accepted (inside the band, or at all with in_band_only False)."""
        ms = probe.measured
        if self.confirm_readings < 1 or "readings_ms" in probe.entry or (
                in_band_only and not self.low <= ms <= self.limit):
            return ms
        # Accepting the slowest configuration that reads within the limit favours readings that came out high by
        # chance, which would leave the delivered model well under the budget.
        readings = [ms] + [float(self.measure_ms(probe.masks)) for _ in range(self.confirm_readings)]
        probe.measured = statistics.median(readings)
        probe.entry.update(measured_ms=probe.measured, readings_ms=readings)
        return probe.measured

    def start(self, keep_masks: Sequence[torch.Tensor]) -> Probe:
        """The method's configuration measured, and rounded to `round_to` if that measures faster."""
        masks = [m.clone().bool() for m in keep_masks]
        self.fit = LatencyFit(masks, self.target, self.tolerance, round_to=self.round_to,
                              accept_over=self.accept_over, accept_under=self.accept_under)
        current = self.record(masks, "initial")
        if self.round_to > 1:
            rounded = round_masks(self.scores, masks, self.round_to, self.budget.fits, self.sizes)
            if mask_counts(rounded) != mask_counts(masks):
                candidate = self.record(rounded, f"round_to_{self.round_to}")
                if candidate.measured < current.measured:
                    current, self.fit.rounding_applied = candidate, True
                    self.probes.pop(0)  # the unrounded start is superseded
                else:
                    candidate.entry["rejected"] = True
                    self.probes.pop()
        return current

    def fits_below(self, aim: float) -> Fits:
        return lambda counts: self.budget.hard(counts) <= aim

    def cliff_step(self) -> Probe | None:
        """Grow the other groups where the slowest configuration under the band grew into one far over it."""
        cliff = cliff_caps(self.probes, self.limit, self.low) if self.grow and not self.fit.rounding_applied else None
        if cliff is None or set(cliff[1]) <= set(self.caps):
            return None
        # A few channels more read far slower than the predictor's step (onnxruntime's blocked kernels drop out
        # when a count leaves the block), so no step between the two can land in the band.
        start, new_caps = cliff
        held = {**new_caps, **self.caps}  # a group keeps the cap it was first held at
        aim = max(scaled_aim(start.predicted, max(start.measured, 1e-12), self.target), self.smallest)
        candidate, added = grow_masks(self.scores, start.masks, self.fits_below(aim), self.normalize, held)
        if not added or tried(candidate, self.probes):
            return None  # the bracket's steps below, without new caps
        self.caps = held
        self.fit.rounds += 1
        probe = self.record(candidate, "grow_past_cliff")
        probe.entry["capped_groups"] = sorted(self.caps)
        return probe

    def step(self, current: Probe) -> Probe | None:
        """One round: the next configuration towards the band, measured; None when there is nothing new."""
        feasible = [p for p in self.probes if p.measured <= self.limit]
        too_slow = [p for p in self.probes
                    if p.measured > self.limit and all(p.masks[g].sum() <= c for g, c in self.caps.items())]
        base, predicted = current.masks, self.predicted(current.masks)
        aim = scaled_aim(predicted, current.measured, self.target)
        lo = max(feasible, key=lambda p: p.measured) if feasible else None
        if feasible and too_slow:
            secant = secant_aim(lo, min(too_slow, key=lambda p: p.predicted), self.target)
            if secant is not None:
                aim, base = secant, lo.masks
        aim = max(aim, self.smallest)
        if self.budget.hard(mask_counts(base)) > aim:
            candidate, _ = trim_masks(self.scores, base, self.fits_below(aim), self.normalize)
        else:
            candidate, _ = grow_masks(self.scores, base, self.fits_below(aim), self.normalize, self.caps)
        if self.fit.rounding_applied:
            candidate = round_masks(self.scores, candidate, self.round_to, self.fits_below(aim), self.sizes)
        if tried(candidate, self.probes) and feasible and too_slow:
            candidate = self.interpolate(lo, min(too_slow, key=lambda p: p.measured))
        candidate = capped_masks(self.scores, candidate, self.caps)
        if tried(candidate, self.probes):
            return None
        self.fit.rounds += 1
        return self.record(candidate, "trim" if self.predicted(candidate) < predicted else "grow")

    def interpolate(self, lo: Probe, over_end: Probe) -> Masks:
        """Where the predictor cannot tell the bracket's inside apart (it is not monotone in every channel): step in
        channel counts from the bracket's feasible end towards its nearest slow one, to the first new one."""
        share = (self.target - lo.measured) / max(over_end.measured - lo.measured, 1e-12)
        multiple = self.round_to if self.fit.rounding_applied else 1
        # A share under half a channel from the feasible end rounds back onto it (or onto another measured
        # configuration); move it a channel further towards the slow end at a time until it is new.
        steps = max(1, sum(abs(int(a.sum()) - int(b.sum())) for a, b in zip(lo.masks, over_end.masks, strict=True)))
        candidate = lo.masks
        for extra in range(steps):
            candidate = capped_masks(self.scores, between_masks(self.scores, lo.masks, over_end.masks,
                                                                share + extra / steps, multiple), self.caps)
            if not tried(candidate, self.probes):
                break
        return candidate

    def best(self) -> Probe:
        """The slowest configuration read within the limit (the fastest if none is), confirmed."""
        while True:
            feasible = [p for p in self.probes if p.measured <= self.limit]
            best = max(feasible, key=lambda p: p.measured) if feasible else min(self.probes, key=lambda p: p.measured)
            before = best.measured
            if self.settle(best, in_band_only=False) == before:
                return best  # confirmed (or confirmed before): a changed reading may make another one the best


def fit_measured_latency(budget: BudgetCost, scores: Sequence[torch.Tensor], keep_masks: Sequence[torch.Tensor],
                         measure_ms: Callable[[Masks], float], sizes: Sequence[int], tolerance: float = 0.05,
                         max_rounds: int = 3, normalize: bool = True, round_to: int = 1,
                         grow: bool = True, confirm_readings: int = 2, accept_over: float | None = None,
                         bracket_rounds: int = 3, accept_under: float | None = None) -> LatencyFit:
    """Measure the masked configuration on the device; while it is outside the band target*(1 - accept_under) ..
    target*(1 + accept_over), trim (or grow) it by importance to a new predicted-cost aim and measure again (at
    most `max_rounds` times, plus up to `bracket_rounds` more while the measurements bracket the band from both
    sides and the best one under it is still below the band).

    `accept_under` (default half the tolerance, as `accept_over`) makes the loop grow a configuration that reads
    more than that under the target: with the tolerance as the band's lower edge, a resnet56 whose second trim
    read 0.96 x its budget was kept there in all three seeds of a bench, 4% of the latency the user asked for unused
    (the result is still the slowest configuration read within the limit, so a grow that reads over it is undone).

    `accept_over` (default half the tolerance) keeps accepted readings under the tolerance's limit by a margin,
    because a later reading of the same model on a shared machine can come out a few percent higher: one job's
    finisher accepted a reading of 1.05 x its budget at a 5% tolerance, and the job's final reading was 1.10 x.

    The aim is the predicted cost scaled by target/measured, or, once one measured configuration is within the
    limit and one over it, the secant between them (the predictor's error changes with the configuration, so
    scaling alone can jump back and forth); where the predictor's aim gives nothing new inside such a bracket,
    kept counts are interpolated between its two measured ends. The result is the slowest measured configuration
    within the limit (the fastest one if none is). With `round_to` > 1, kept counts are rounded to that multiple
    first, but only if the rounded model measures faster than the unrounded one. A reading that disagrees by
    more than the tolerance with what the last measurement implies (its measured/predicted ratio applied to the
    new prediction; the prediction itself for the first) is taken `confirm_readings` more times, and the median
    counts, so one burst on a shared machine does not set off a trim; a configuration read once is read
    `confirm_readings` more times before it is accepted (inside the band, or as the result), so one reading
    that came out high by chance does not end the loop under the budget. Where growing from a configuration under
    the band to one over it cost far more than the predicted step (a latency cliff), the groups that grew are
    held at their count (`capped_groups` in the measurement) and the others grow instead.
    """
    search = LatencySearch(budget, scores, measure_ms, sizes, tolerance, normalize, round_to, grow, confirm_readings,
                           accept_over, accept_under)
    current = search.start(keep_masks)
    rounds_left, bracket_left = max_rounds, bracket_rounds
    while True:
        # Settled before the rounds are counted: a last round's reading inside the band that more readings put
        # over it must still count as over.
        measured = search.settle(current)
        if not (measured > search.limit or (measured < search.low and grow)):
            break
        if rounds_left > 0:
            rounds_left -= 1
        elif bracket_left > 0 and brackets_from_below(search.probes, search.limit, search.low):
            # A CPU whose latency steps between channel counts can leave the last ordinary round's bracket 0.86 /
            # 1.07 of the target; each further step inside it halves the gap, and the band lies in between.
            bracket_left -= 1
        else:
            break
        following = search.cliff_step() or search.step(current)
        if following is None:
            break  # nothing new to try
        current = following
    return finished_fit(search, current, keep_masks)


def finished_fit(search: LatencySearch, current: Probe, keep_masks: Sequence[torch.Tensor]) -> LatencyFit:
    """The search's LatencyFit with its best configuration restored and the channels trimmed/added counted."""
    fit, best = search.fit, search.best()
    if best is not current:
        fit.measurements.append({"action": "restore", "keep_counts": best.counts, "predicted_ms": best.predicted,
                                 "measured_ms": best.measured})
    fit.keep_masks = best.masks
    start, end = mask_counts(keep_masks), best.counts
    fit.channels_trimmed = sum(max(0, a - b) for a, b in zip(start, end, strict=True))
    fit.channels_added = sum(max(0, b - a) for a, b in zip(start, end, strict=True))
    return fit


def trim_finetuned(model: nn.Module, input_shape: Sequence[int], group_roots: Sequence[str], budget: BudgetCost,
                   meter: DeviceMeter, tolerance: float = 0.05, max_rounds: int = 3,
                   accept_over: float | None = None) -> tuple[nn.Module, LatencyFit] | None:
    """Trim an already materialized model (least filter-L1 channels first) while the device measures it over the
    band, without growing it; (trimmed model, fit), or None where its channel groups are not the budget's
    (`group_roots`, in the budget's order)."""
    from pruning.importance import group_weight_norms

    model = model.cpu().eval()
    graph = ChannelGraph.build(model, input_shape)
    if [g.root for g in graph.groups] != list(group_roots):
        return None
    scores = group_weight_norms(model, graph)
    fit = fit_measured_latency(budget, scores, [torch.ones(g.size, dtype=torch.bool) for g in graph.groups],
                               lambda masks: meter.measure_masks(model, graph, masks)["ms"],
                               [g.size for g in graph.groups], tolerance, max_rounds, normalize=True, grow=False,
                               accept_over=accept_over)
    if fit.channels_trimmed == 0:
        return model, fit
    return materialize(model, graph, fit.keep_masks).eval(), fit
