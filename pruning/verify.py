"""The verify stage: the fine-tuned model measured on the latency device, and trimmed (the post-fine-tune trim)
where that reading is over the budget by more than the tolerance."""

from __future__ import annotations

from torch import nn

from pruning.budget import BudgetCost
from pruning.finisher import DeviceMeter, LatencyFit, accept_margin, confirmed_measurement, trim_finetuned
from pruning.groups import ChannelGraph


def final_reading(pruned: nn.Module, prune_info: dict, meter: DeviceMeter, budget_cost: BudgetCost,
                  graph: ChannelGraph, input_shape: tuple[int, ...], tolerance: float, rounds: int,
                  ) -> tuple[dict, nn.Module, LatencyFit | None]:
    """(reading, model, post-fine-tune trim or None): the fine-tuned model measured on the device, and trimmed
    where that reading is over the budget by more than the tolerance."""
    fit_info = prune_info.get("latency_fit", {})
    counts = prune_info["keep_counts"]
    # The finisher's measurements of the configuration the fine-tuned model still has.
    same = [m for m in fit_info.get("measurements", []) if m["keep_counts"] == counts]
    fit_ms = [m["measured_ms"] for m in same]
    # A disagreement of more than the finisher's margin under the limit calls for more readings.
    accept_over = fit_info.get("accept_over")
    if accept_over is None:  # a checkpoint from before the finisher recorded it
        accept_over = accept_margin(tolerance)
    final = confirmed_measurement(lambda: meter.measure(pruned), fit_ms[-1] if fit_ms else None, accept_over)
    limit = budget_cost.target * (1 + tolerance)
    if final["ms"] > limit and fit_ms and fit_ms[-1] <= limit:
        earlier = [ms for m in same for ms in m.get("readings_ms", [m["measured_ms"]])]
        final = _pooled_reading(pruned, meter, earlier, final)
    if final["ms"] <= limit:
        return final, pruned, None
    # The finisher's readings and this one are minutes apart, and on a shared machine the model can read over the
    # budget now though it read within it then. What the user gets is judged by this reading, so the fine-tuned
    # model loses its least important channels until it fits.
    trimmed = trim_finetuned(pruned, input_shape, [g.root for g in graph.groups], budget_cost, meter,
                             tolerance, rounds, accept_over)
    if trimmed is None:
        return final, pruned, None
    model, fit = trimmed
    if fit.channels_trimmed == 0:
        # The trim's own reading of the untouched model is the latest, confirmed where it disagreed: a slow spell
        # can cover every final reading and be over by the time the trim reads the model, and the report must not
        # carry the stale reading.
        return _rechecked_reading(final, fit.measurements[0], meter), pruned, fit
    final = confirmed_measurement(lambda: meter.measure(model), fit.measured_ms, accept_over)
    return final, model, fit


def _pooled_reading(pruned: nn.Module, meter: DeviceMeter, earlier: list[float], final: dict,
                    again: int = 3) -> dict:
    """`final` (over the limit) decided again: `again` more readings, and the median of every reading of this
    configuration, the finisher's (`earlier`) included."""
    # Fine-tuning changed the weights, not the structure the finisher measured within the limit, so the two
    # disagree only by timing noise; the median of all their readings decides whether to trim, so that one slow
    # spell does not cut channels out of a fine-tuned model that fits.
    readings = [meter.measure(pruned) for _ in range(again)]
    listed = final["readings_ms"] + [r["ms"] for r in readings]
    pooled = sorted(earlier + listed)
    ms = pooled[(len(pooled) - 1) // 2]
    return {**final, "ms": ms, "ratio": ms / meter.reference_ms, "readings_ms": listed, "earlier_ms": earlier,
            "slow_retries": final.get("slow_retries", 0) + sum(r.get("slow_retries", 0) for r in readings)}


def _rechecked_reading(final: dict, recheck: dict, meter: DeviceMeter) -> dict:
    """`final` replaced by a later measurement of the same model (`recheck`, a finisher measurement), both
    readings listed."""
    ms = recheck["measured_ms"]
    rechecked = recheck.get("readings_ms", [ms])
    return {**final, "ms": ms, "ratio": ms / meter.reference_ms, "readings_ms": final["readings_ms"] + rechecked,
            "rechecked_ms": rechecked}
