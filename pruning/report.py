"""report.json of a pruning job: what was asked, what the method and the finisher chose, what the device read."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pruning.budget import Budget, BudgetCost
from pruning.finisher import LatencyFit
from pruning.oracle import DeviceOracle


def job_report(request: Any, setup: Any, selected: Any, verified: Any, budget_cost: BudgetCost,
               dense_accuracy: float, pruned_accuracy: float, pruned_params: int, widths: dict,
               epochs: dict[str, int]) -> dict[str, Any]:
    """The report's fields common to every job (pipeline's PruneRequest, JobSetup, Selected and Verified)."""
    cost_model = budget_cost.cost_model
    counts = verified.counts
    return {
        "method": request.method,
        "params": setup.params.model_dump(),
        "arch": request.arch,
        "dataset": request.dataset,
        "resolution": setup.splits.resolution,
        "budget": {**asdict(request.budget), "target": budget_cost.target, "unit": budget_cost.unit},
        "dense": {"macs": cost_model.dense_macs, "params": cost_model.dense_params, "accuracy": dense_accuracy},
        "pruned": {"macs": int(round(float(cost_model.macs(counts)))), "params": pruned_params,
                   "accuracy": pruned_accuracy},
        "keep_counts": counts,
        "group_sizes": setup.graph.sizes,
        "widths": widths,
        "finisher_channels_removed": selected.info["finisher_channels_removed"],
        "method_info": selected.info["method_info"],
        "epochs": epochs,
        "seed": request.seed,
        "device": str(setup.device),
    }


def latency_section(budget: Budget, budget_cost: BudgetCost, counts: list[int], measured: tuple[Any, Any],
                    final: dict | None, prune_info: dict, post_trim: LatencyFit | None,
                    recovery_epochs: int) -> dict[str, Any]:
    """report['latency_ms']: predicted and measured dense/pruned latency, the final reading and the finisher's."""
    predicts = budget.kind == "latency_ms"
    section: dict[str, Any] = {
        "dense": {"predicted": budget_cost.dense() if predicts else None, "measured": measured[0]},
        "pruned": {"predicted": budget_cost.hard(counts) if predicts else None, "measured": measured[1]},
    }
    if final is not None:
        section["pruned"].update(drift_corrected=final["ms"], ratio_to_dense=final["ratio"],
                                 readings_ms=final["readings_ms"], slow_retries=final.get("slow_retries", 0))
        if "earlier_ms" in final:  # decided with the finisher's readings of the same configuration
            section["pruned"]["finisher_readings_ms"] = final["earlier_ms"]
        if "rechecked_ms" in final:  # the post-fine-tune trim's reading, which found nothing to trim
            section["pruned"]["rechecked_readings_ms"] = final["rechecked_ms"]
    if "latency_fit" in prune_info:
        fit = prune_info["latency_fit"]
        section.update(target=fit["target_ms"], tolerance=fit["tolerance"], accept_over=fit.get("accept_over"),
                       accept_under=fit.get("accept_under"), rounds=fit["rounds"],
                       channels_trimmed=fit["channels_trimmed"], channels_added=fit["channels_added"],
                       round_to=fit["round_to"], rounding_applied=fit["rounding_applied"],
                       measurements=fit["measurements"])
    if post_trim is not None:
        section["post_finetune_trim"] = {**post_trim.report(), "recovery_epochs": recovery_epochs}
    return section


def measured_latency(latency: DeviceOracle, dense_onnx: str, pruned_onnx: str) -> tuple[float, float]:
    """(dense ms, pruned ms) timed alone on the device (the report's plain readings beside the drift-corrected)."""
    return latency.measure_ms(dense_onnx), latency.measure_ms(pruned_onnx)
