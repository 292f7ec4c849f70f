"""The budget finisher after a method: trim (or grow) channel masks by importance, optional channel rounding,
and the latency loop that re-measures the materialized model on the device and trims again while it is over.
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning.allocation import largest_true, mask_counts, masks_from_counts, ranked_values, round_counts, trim_masks
from pruning.budget import BudgetCost
from pruning.groups import ChannelGraph
from pruning.oracle import DeviceOracle
from pruning.surgery import export_onnx, materialize

Masks = list[torch.Tensor]
Fits = Callable[[list[int]], bool]


def measure_model_ms(model: nn.Module, input_shape: Sequence[int], latency: DeviceOracle,
                     describe: Callable[[nn.Module], dict] | None = None) -> float:
    """Measured latency (ms) of `model` on the latency device: exported to ONNX at the device's batch size, with
    arch.json (`describe`: model -> arch.json) next to it for devices that rebuild the model from it."""
    from pruning import zoo

    shape = (int(latency.batch), *tuple(input_shape)[1:])
    with tempfile.TemporaryDirectory(prefix="latprune-measure-") as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", shape)
        if describe is not None:
            zoo.save_arch(describe(model), Path(tmp) / "arch.json")
        return float(latency.measure_ms(str(path), model=model))


class DeviceMeter:
    """Latency of candidate models relative to the dense model timed alongside each of them.

    On a shared machine the absolute speed drifts between measurements; the ratio to the dense model measured
    alongside the candidate does not, so a candidate's ms = its ratio x `reference_ms` (the dense latency the
    predictor was fitted against, else the dense model's first measurement here). Where the oracle can
    (`times_relative`), each round times the two alternated run by run and takes the ratio of 10th percentiles,
    as the profile does for LPNet's labels, retrying a round timed while the dense model ran slower than its
    quiet level (the oracle keeps that level across readings); else a round is dense, candidate, dense timed one
    after another, with the ratio of medians. The ratio is the median of `repeats` rounds, so one round hit by
    another process's burst does not count.
    """

    def __init__(self, latency: DeviceOracle, dense: nn.Module, input_shape: Sequence[int],
                 describe: Callable[[nn.Module], dict] | None = None, reference_ms: float | None = None,
                 repeats: int = 5):
        self.latency = latency
        self.input_shape = tuple(input_shape)
        self.describe = describe
        self.repeats = max(1, int(repeats))
        self.dense = copy.deepcopy(dense).cpu().eval()
        # The dense model never changes: exported once, for every reading (a temporary folder removed with the
        # meter), not once per reading as before.
        self._dense_folder: tempfile.TemporaryDirectory | None = None
        self.reference_ms = float(reference_ms if reference_ms is not None
                                  else latency.reference_ms or self.dense_ms())

    def dense_ms(self) -> float:
        """The dense model's latency right now."""
        return measure_model_ms(self.dense, self.input_shape, self.latency, self.describe)

    def measure(self, model: nn.Module) -> dict[str, float]:
        """{'ms': drift-corrected ms, 'raw_ms': the candidate's own median, 'ratio': to the dense model,
        'slow_retries': readings retried because they fell in a slow spell}."""
        dense_path = self._dense_path()
        with tempfile.TemporaryDirectory(prefix="latprune-meter-") as tmp:
            path = self._export(model, Path(tmp) / "candidate")
            if self.latency.times_relative:
                # Medians timed one after the other differ by 5-30% on a loaded 2-core machine where alternated
                # 10th percentiles differ by 1-4% (latency/timing.py), and a reading in one of the machine's slow
                # spells can read a configuration 20-30% over its quiet latency; the oracle retries those.
                return self._relative(path, dense_path, model)
            ratios, raws = [], []
            before = self._time(dense_path, self.dense)
            for _ in range(self.repeats):
                raw = self._time(path, model)
                after = self._time(dense_path, self.dense)
                ratios.append(raw / max(0.5 * (before + after), 1e-12))
                raws.append(raw)
                before = after
        ratio = statistics.median(ratios)
        return {"ms": ratio * self.reference_ms, "raw_ms": statistics.median(raws), "ratio": ratio,
                "slow_retries": 0}

    def _relative(self, path: Path, dense_path: Path, model: nn.Module) -> dict[str, float]:
        readings = [self.latency.measure_relative(str(path), str(dense_path), model=model, reference_model=self.dense)
                    for _ in range(self.repeats)]
        ratio = statistics.median(r.ratio for r in readings)
        return {"ms": ratio * self.reference_ms, "ratio": ratio,
                "raw_ms": statistics.median(r.raw_ms for r in readings),
                "slow_retries": sum(r.slow_retries for r in readings)}

    def _dense_path(self) -> Path:
        if self._dense_folder is None:
            self._dense_folder = tempfile.TemporaryDirectory(prefix="latprune-meter-dense-")
        path = Path(self._dense_folder.name) / "model.onnx"
        return path if path.exists() else self._export(self.dense, Path(self._dense_folder.name))

    def _export(self, model: nn.Module, folder: Path) -> Path:
        from pruning import zoo

        folder.mkdir(parents=True, exist_ok=True)
        path = export_onnx(model, folder / "model.onnx", (int(self.latency.batch), *self.input_shape[1:]))
        if self.describe is not None:
            zoo.save_arch(self.describe(model), folder / "arch.json")
        return path

    def _time(self, path: Path, model: nn.Module) -> float:
        return float(self.latency.measure_ms(str(path), model=model))

    def measure_masks(self, model: nn.Module, graph: ChannelGraph, keep_masks: Sequence[torch.Tensor],
                      scales: Sequence[torch.Tensor | None] | None = None) -> dict[str, float]:
        """measure() of `model` materialized with `keep_masks`."""
        return self.measure(materialize(model, graph, keep_masks, scales).eval())


def confirmed_measurement(measure: Callable[[], dict[str, float]], expected_ms: float | None,
                          tolerance: float, extra: int = 2) -> dict[str, Any]:
    """measure() once; if that is off `expected_ms` (the finisher's own measurement of the same configuration)
    by more than `tolerance`, `extra` more times, and the median of them all by ms, with every reading listed."""
    readings = [measure()]
    # On a shared machine a candidate's timings sometimes read high for seconds on end while the dense runs
    # around them do not, which the ratio to the dense model cannot cancel (one report read 0.418 ms for a model
    # the finisher had measured at 0.291 ms and four later measurements at 0.295-0.298 ms): disagreeing with the
    # finisher calls for more readings.
    if expected_ms is not None and abs(readings[0]["ms"] / max(expected_ms, 1e-12) - 1.0) > tolerance:
        readings += [measure() for _ in range(extra)]
    chosen = sorted(readings, key=lambda r: r["ms"])[(len(readings) - 1) // 2]
    return {**chosen, "readings_ms": [r["ms"] for r in readings]}


def grow_masks(scores: Sequence[torch.Tensor], keep_masks: Sequence[torch.Tensor], fits: Fits,
               normalize: bool = True, caps: dict[int, int] | None = None) -> tuple[Masks, int]:
    """Add back the most important removed channels while the cost still fits, no group past its count in
    `caps`, then each later one that still fits; (masks, channels added)."""
    masks = [m.clone().bool() for m in keep_masks]
    values = ranked_values(scores, normalize)
    removed = sorted(((-float(values[g][c]), g, c) for g, m in enumerate(masks)
                      for c in torch.nonzero(~m).flatten().tolist()))
    room = {g: max(0, cap - int(masks[g].sum())) for g, cap in (caps or {}).items()}
    order = []
    for _, g, c in removed:
        if g in room:
            if room[g] == 0:
                continue
            room[g] -= 1
        order.append((g, c))

    def after(k: int) -> Masks:
        out = [m.clone() for m in masks]
        for g, c in order[:k]:
            out[g][c] = True
        return out

    if not fits(mask_counts(masks)):
        return masks, 0
    k = largest_true(len(order), lambda j: fits(mask_counts(after(j))))
    grown = after(k)
    # (ours) A learned predictor can jump at one count (resnet20's LPNet: one channel past 16 in a 64-wide group
    # added 19%), and a prefix stops at the first channel that does not fit: one job's grow step added nothing
    # and it ended at 0.87 of its budget. The channels after it are still tried, in order, each kept if it fits.
    counts = mask_counts(grown)
    added = k
    for g, c in order[k + 1:]:
        counts[g] += 1
        if fits(counts):
            grown[g][c] = True
            added += 1
        else:
            counts[g] -= 1
    return grown, added


def round_masks(scores: Sequence[torch.Tensor], keep_masks: Sequence[torch.Tensor], multiple: int, fits: Fits,
                sizes: Sequence[int]) -> Masks:
    """Masks with counts rounded to `multiple`: to the nearest multiple if that fits, else down (unchanged if
    neither fits)."""
    counts = mask_counts(keep_masks)
    for mode in ("nearest", "down"):
        candidate = round_counts(counts, sizes, multiple, mode)
        if fits(candidate):
            return masks_from_counts(scores, candidate)
    return [m.clone().bool() for m in keep_masks]


def between_masks(scores: Sequence[torch.Tensor], start: Sequence[torch.Tensor], end: Sequence[torch.Tensor],
                  share: float, multiple: int = 1) -> Masks:
    """Masks `share` (0..1) of the way from `start` to `end` in kept counts: channels both keep come first, then
    those one of them keeps, each by score; with `multiple` 1 the total is the nearest whole count (the groups
    nearest their next channel get it), else each group is rounded to `multiple` where that stays between."""
    share = min(max(float(share), 0.0), 1.0)
    spans = [(int(a.sum()), int(b.sum())) for a, b in zip(start, end, strict=True)]
    exact = [a + share * (b - a) for a, b in spans]
    if multiple > 1:
        counts = []
        for (a, b), count in zip(spans, exact, strict=True):
            rounded = multiple * math.floor(count / multiple + 0.5)
            counts.append(rounded if min(a, b) <= rounded <= max(a, b) else math.floor(count + 0.5))
    else:
        # Rounding every group on its own can move all of them at once, or none: a step from 19 kept channels
        # to 24 went to 21, skipping the 20 that fit.
        counts = [math.floor(x) for x in exact]
        extra = math.floor(sum(exact) + 0.5) - sum(counts)
        for g in sorted(range(len(exact)), key=lambda g: exact[g] - counts[g], reverse=True)[:max(0, extra)]:
            counts[g] += 1
    out = []
    for score, a, b, count in zip(scores, start, end, counts, strict=True):
        # Rank by membership (kept by both > by one > by neither), ties by score.
        values = score.detach().float()
        spread = float(values.max() - values.min()) + 1.0
        rank = values - values.min() + spread * (a.bool().float() + b.bool().float())
        mask = torch.zeros(len(score), dtype=torch.bool)
        mask[torch.topk(rank, max(1, int(count))).indices] = True
        out.append(mask)
    return out


def capped_masks(scores: Sequence[torch.Tensor], keep_masks: Sequence[torch.Tensor], caps: dict[int, int]) -> Masks:
    """Masks with every group in `caps` cut to at most that many kept channels, its best-scored kept ones."""
    out = []
    for g, (score, mask) in enumerate(zip(scores, keep_masks, strict=True)):
        mask = mask.clone().bool()
        cap = caps.get(g)
        if cap is not None and int(mask.sum()) > cap:
            values = torch.where(mask, score.detach().float(), torch.full_like(score.detach().float(), -math.inf))
            mask = torch.zeros_like(mask)
            mask[torch.topk(values, max(1, cap)).indices] = True
        out.append(mask)
    return out


def cliff_caps(states: Sequence[tuple[Masks, float, float]], limit: float, low: float,
               factor: float = 3.0, max_step: float = 0.1) -> tuple[tuple[Masks, float, float], dict[int, int]] | None:
    """(start, caps) where the slowest configuration within `limit` reads under `low` and growing it by at most
    `max_step` of its kept channels into a configuration over `limit` cost more than `factor` times the expected
    step (the predicted one scaled by the start's measured/predicted ratio, or the start's latency per kept
    channel, whichever is larger): a latency cliff. caps holds the start's counts of the groups that grew."""
    feasible = [st for st in states if st[2] <= limit]
    if not feasible:
        return None
    start = max(feasible, key=lambda st: st[2])
    if start[2] >= low:
        return None
    base = mask_counts(start[0])
    scale = start[2] / max(start[1], 1e-12)
    caps: dict[int, int] = {}
    for masks, predicted, measured in states:
        counts = mask_counts(masks)
        if measured <= limit or any(c < b for c, b in zip(counts, base, strict=True)):
            continue
        if sum(counts) - sum(base) > max_step * sum(base):
            continue  # a wide step: the bracket's interpolation can still find its inside
        # Either estimate alone misreads a smooth device: a predictor flat over a range of widths predicts no
        # step at all, and latency in proportion to the kept channels under-counts convolutions' growth.
        step_ms = max(max(predicted - start[1], 0.0) * scale, start[2] * (sum(counts) - sum(base)) / max(sum(base), 1))
        if measured - start[2] > factor * step_ms:
            caps.update({g: b for g, (c, b) in enumerate(zip(counts, base, strict=True)) if c > b})
    return (start, caps) if caps else None


def _brackets_from_below(states: Sequence[tuple[Masks, float, float]], limit: float, low: float) -> bool:
    """Whether some measured configuration is over `limit` and the slowest one within it is under `low`."""
    feasible = [st[2] for st in states if st[2] <= limit]
    return bool(feasible) and max(feasible) < low and any(st[2] > limit for st in states)


def _tried(candidate: Masks, states: Sequence[tuple[Masks, float, float]]) -> bool:
    return any(mask_counts(candidate) == mask_counts(st[0]) for st in states)


def accept_margin(tolerance: float, margin: float | None = None) -> float:
    """How far over (or under) the target, as a share of it, the finisher accepts a reading: `margin`, at most the
    tolerance, else half the tolerance."""
    return tolerance / 2 if margin is None else min(float(margin), tolerance)


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
    target = budget.target
    accept_over = accept_margin(tolerance, accept_over)
    accept_under = accept_margin(tolerance, accept_under)
    limit, low = target * (1 + accept_over), target * (1 - accept_under)
    masks = [m.clone().bool() for m in keep_masks]
    fit = LatencyFit(masks, target, tolerance, round_to=round_to, accept_over=accept_over, accept_under=accept_under)
    states: list[tuple[Masks, float, float]] = []  # (masks, predicted, measured) of every usable measurement

    entries: dict[int, dict[str, Any]] = {}  # id(masks) -> its measurement entry

    def record(current: Masks, action: str) -> float:
        counts = mask_counts(current)
        predicted = budget.hard(counts)
        # A trim that reads slower than the configuration it was cut from is a burst, not the model: one such
        # reading (2.10 ms for a trim of a 1.75 ms resnet56) once cut a model to 1.21 ms against a 1.64 ms budget.
        expected = predicted * states[-1][2] / max(states[-1][1], 1e-12) if states else predicted
        reading = confirmed_measurement(lambda: {"ms": float(measure_ms(current))}, expected, tolerance,
                                        confirm_readings)
        measured = reading["ms"]
        entry = {"action": action, "keep_counts": counts, "predicted_ms": predicted, "measured_ms": measured}
        if len(reading["readings_ms"]) > 1:
            entry["readings_ms"] = reading["readings_ms"]
        fit.measurements.append(entry)
        entries[id(current)] = entry
        states.append((current, predicted, measured))
        return measured

    def settle(current: Masks, in_band_only: bool = True) -> float:
        """`current`'s measurement, first read `confirm_readings` more times (median of all) if it was read once
        and is about to be accepted (inside the band, or at all with in_band_only False)."""
        i = next(i for i, st in enumerate(states) if st[0] is current)
        _, predicted, ms = states[i]
        entry = entries[id(current)]
        if confirm_readings < 1 or "readings_ms" in entry or (in_band_only and not low <= ms <= limit):
            return ms
        # Accepting the slowest configuration that reads within the limit favours readings that came out high by
        # chance: one job's choice read 0.95 of its budget once and 0.86-0.88 in all three final readings.
        readings = [ms] + [float(measure_ms(current)) for _ in range(confirm_readings)]
        ms = statistics.median(readings)
        entry.update(measured_ms=ms, readings_ms=readings)
        states[i] = (current, predicted, ms)
        return ms

    measured = record(masks, "initial")
    if round_to > 1:
        rounded = round_masks(scores, masks, round_to, budget.fits, sizes)
        if mask_counts(rounded) != mask_counts(masks):
            rounded_ms = record(rounded, f"round_to_{round_to}")
            if rounded_ms < measured:
                masks, measured, fit.rounding_applied = rounded, rounded_ms, True
                states.pop(0)  # the unrounded start is superseded
            else:
                fit.measurements[-1]["rejected"] = True
                states.pop()
    smallest = budget.hard([1] * len(sizes)) * (1 + 1e-6)

    caps: dict[int, int] = {}  # groups held at a count because growing them fell off a latency cliff

    def within_caps(st: tuple[Masks, float, float]) -> bool:
        return all(int(st[0][g].sum()) <= cap for g, cap in caps.items())

    rounds_left, bracket_left = max_rounds, bracket_rounds
    while True:
        # Settled before the rounds are counted: a last round's reading inside the band that more readings put
        # over it must still count as over (one job stopped there and restored a configuration 13% under).
        measured = settle(masks)
        over, under = measured > limit, measured < low
        if not (over or (under and grow)):
            break
        if rounds_left > 0:
            rounds_left -= 1
        elif bracket_left > 0 and _brackets_from_below(states, limit, low):
            # A CPU whose latency steps between channel counts can leave the last ordinary round's bracket 0.86 /
            # 1.07 of the target; each further step inside it halves the gap, and the band lies in between.
            bracket_left -= 1
        else:
            break
        cliff = cliff_caps(states, limit, low) if grow and not fit.rounding_applied else None
        if cliff is not None and not set(cliff[1]) <= set(caps):
            # A few channels more read far slower than the predictor's step (onnxruntime's blocked kernels
            # drop out when a count leaves the block: 204 kept channels of a resnet56 measured 0.712 ms, 207
            # 0.980 ms), so no step between the two can land in the band: grow the other groups instead.
            start, new_caps = cliff
            held = {**new_caps, **caps}  # a group keeps the cap it was first held at
            aim = max(start[1] * target / max(start[2], 1e-12), smallest)
            candidate, added = grow_masks(scores, start[0], lambda counts, aim=aim: budget.hard(counts) <= aim,
                                          normalize, held)
            if added and not _tried(candidate, states):  # else the bracket's steps below, without new caps
                caps = held
                fit.rounds += 1
                masks = candidate
                measured = record(masks, "grow_past_cliff")
                fit.measurements[-1]["capped_groups"] = sorted(caps)
                continue
        feasible = [st for st in states if st[2] <= limit]
        too_slow = [st for st in states if st[2] > limit and within_caps(st)]
        base, predicted = masks, budget.hard(mask_counts(masks))
        aim = predicted * target / measured
        if feasible and too_slow:
            lo = max(feasible, key=lambda st: st[2])
            hi = min(too_slow, key=lambda st: st[1])
            if hi[1] > lo[1] and hi[2] > lo[2]:
                aim = lo[1] + (hi[1] - lo[1]) * (target - lo[2]) / (hi[2] - lo[2])
                aim = min(max(aim, lo[1]), hi[1] - 1e-9 * hi[1])
                base = lo[0]
        aim = max(aim, smallest)

        def fits_aim(counts: list[int], aim: float = aim) -> bool:
            return budget.hard(counts) <= aim

        if budget.hard(mask_counts(base)) > aim:
            candidate, _ = trim_masks(scores, base, fits_aim, normalize)
        else:
            candidate, _ = grow_masks(scores, base, fits_aim, normalize, caps)
        if fit.rounding_applied:
            candidate = round_masks(scores, candidate, round_to, fits_aim, sizes)
        if _tried(candidate, states) and feasible and too_slow:
            # The predictor cannot tell the bracket's inside apart (it is not monotone in every channel):
            # step in channel counts from the bracket's feasible end (lo, above) to its nearest slow one instead.
            over_end = min(too_slow, key=lambda st: st[2])
            share = (target - lo[2]) / max(over_end[2] - lo[2], 1e-12)
            multiple = round_to if fit.rounding_applied else 1
            # A share under half a channel from the feasible end rounds back onto it (or onto another measured
            # configuration); move it a channel further towards the slow end at a time until it is new.
            steps = max(1, sum(abs(int(a.sum()) - int(b.sum())) for a, b in zip(lo[0], over_end[0], strict=True)))
            for extra in range(steps):
                candidate = capped_masks(scores, between_masks(scores, lo[0], over_end[0], share + extra / steps,
                                                               multiple), caps)
                if not _tried(candidate, states):
                    break
        candidate = capped_masks(scores, candidate, caps)
        if _tried(candidate, states):
            break  # nothing new to try
        fit.rounds += 1
        masks = candidate
        measured = record(masks, "trim" if budget.hard(mask_counts(masks)) < predicted else "grow")
    while True:
        feasible = [st for st in states if st[2] <= limit]
        best = max(feasible, key=lambda st: st[2]) if feasible else min(states, key=lambda st: st[2])
        if settle(best[0], in_band_only=False) == best[2]:
            break  # confirmed (or confirmed before): a changed reading may make another state the best
    if best[0] is not masks:
        masks, measured = best[0], best[2]
        fit.measurements.append({"action": "restore", "keep_counts": mask_counts(masks), "predicted_ms": best[1],
                                 "measured_ms": best[2]})
    fit.keep_masks = masks
    start, end = mask_counts(keep_masks), mask_counts(masks)
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
