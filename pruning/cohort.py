"""One cohort job end to end: data at every resolution, the cohort method, then every member materialized,
BN-recalibrated, evaluated and exported, and cohort.json.

Used by the CLI and by the Celery worker. Training stages keep their state in `checkpoint_dir` and finished
members stay in `out_dir/members/<id>/`, so a re-run of the same job resumes without redoing either.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import torch

from pruning import zoo
from pruning.budget import Budget, BudgetCost, BudgetError
from pruning.cost import CostModel
from pruning.data import DatasetSplits, load_dataset, make_loaders
from pruning.groups import ChannelGraph
from pruning.methods.api import CohortContext, MemberSpec
from pruning.methods.ofa import decode_masks, encode_masks, recalibrate_bn
from pruning.oracle import DeviceOracle
from pruning.pipeline import PruneRequest
from pruning.registry import get_method, load_runner
from pruning.selection import fronts_by_device
from pruning.surgery import export_onnx, materialize
from pruning.train import Cancelled, evaluate, pick_device, seed_everything

__all__ = ["COHORT_FORMAT", "Cancelled", "CohortPlan", "LatencyModels", "member_budget", "plan_cohort", "run_cohort"]

COHORT_FORMAT = "latprune.cohort/1"
MEMBER_FILE = "member.json"
# Share of the job's progress bar each stage takes.
STAGE_SPAN = {"search": (0.0, 0.45), "joint": (0.45, 0.9), "export": (0.9, 1.0)}

# Device name -> a function giving that device's latency model at an input resolution (it may raise when the
# device has no predictor at that resolution; the member's prediction is then None).
LatencyModels = Mapping[str, Callable[[int], DeviceOracle]]


def _atomic_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


def _progress_in(progress: Callable[[dict], None] | None) -> Callable[[dict], None] | None:
    """Map the stages' own 0..1 fractions onto the job's progress bar."""
    if progress is None:
        return None

    def emit(event: dict) -> None:
        lo, hi = STAGE_SPAN.get(event.get("stage", ""), (0.0, 1.0))
        inner = min(max(float(event.get("fraction", 0.0)), 0.0), 1.0)
        progress({**event, "fraction": lo + (hi - lo) * inner})

    return emit


def member_budget(kind: str, value: float, device: str | None, base_dense_macs: int) -> Budget:
    """A member's budget as the engine checks it: a FLOPs fraction becomes MACs of the dense model at the base
    resolution, so members at lower resolutions get the same absolute allowance."""
    if kind == "flops":
        Budget(kind, value)  # validates the fraction
        return Budget("macs", value * base_dense_macs)
    return Budget(kind, value, device if kind == "latency_ms" else None)  # type: ignore[arg-type]


def _latency_at(latency_models: LatencyModels | None, device: str, resolution: int) -> DeviceOracle:
    if not latency_models or device not in latency_models:
        raise BudgetError(f"a latency_ms budget on {device!r} needs that device's latency model")
    return latency_models[device](resolution)


def _predictions(latency_models: LatencyModels | None, counts: list[int], sizes: list[int],
                 resolution: int) -> dict[str, dict[str, Any]]:
    """Predicted latency of a member on every device given (None where that device cannot predict it)."""
    out: dict[str, dict[str, Any]] = {}
    ratios = torch.tensor([c / s for c, s in zip(counts, sizes, strict=True)], dtype=torch.float32)
    for device, factory in (latency_models or {}).items():
        entry: dict[str, Any] = {"predicted_ms": None, "measured_ms": None}
        try:
            with torch.no_grad():
                entry["predicted_ms"] = float(factory(resolution).predict_ms(ratios))
        except (ValueError, KeyError, FileNotFoundError, RuntimeError) as exc:
            entry["error"] = str(exc)[:300]
        out[device] = entry
    return out


class _Data:
    """Splits and loaders per resolution, loaded on first use."""

    def __init__(self, request: PruneRequest):
        self.request = request
        self._splits: dict[int, DatasetSplits] = {}

    def splits(self, resolution: int) -> DatasetSplits:
        if resolution not in self._splits:
            self._splits[resolution] = load_dataset(self.request.dataset, self.request.data_root, resolution)
        return self._splits[resolution]

    def loaders(self, resolution: int):  # noqa: ANN201
        return make_loaders(self.splits(resolution), self.request.batch_size, self.request.seed)


@dataclass
class CohortPlan:
    """A cohort job before training: data, model, per-resolution graphs and costs, members and the method context."""

    request: PruneRequest
    params: Any
    data: _Data
    ctx: CohortContext
    budgets: list[float]
    resolutions: list[int]
    base_resolution: int
    num_classes: int
    in_channels: int
    skipped: list[dict]
    device: torch.device


def plan_cohort(request: PruneRequest, progress: Callable[[dict], None] | None = None,
                should_cancel: Callable[[], bool] | None = None, checkpoint_dir: str | Path | None = None,
                latency_models: LatencyModels | None = None) -> CohortPlan:
    """Validate the request, load data and the model, and derive the members (budgets x resolutions) that can fit."""
    method = get_method(request.method)
    if not method.produces_cohort:
        raise ValueError(f"method {request.method!r} yields one subnet: use run_prune (`latprune prune`)")
    params = method.validate_params(request.params)
    budget = request.budget
    values = [float(v) for v in params.member_budgets()] or [float(budget.value)]
    for value in values:
        Budget(budget.kind, value, budget.device)  # each budget must be valid on its own (fraction <= 1, ...)
    if budget.kind == "latency_ms" and (not latency_models or budget.device not in latency_models):
        raise BudgetError(f"a latency_ms budget on {budget.device!r} needs that device's latency model")
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    seed_everything(request.seed)
    device = pick_device(request.device)

    data = _Data(request)
    reference = data.splits(request.resolution) if request.resolution else load_dataset(
        request.dataset, request.data_root, None)
    base_resolution = reference.resolution
    resolutions = params.member_resolutions() or [base_resolution]
    train_resolution = max(resolutions)
    train_loader, _, _ = data.loaders(train_resolution)
    num_classes, in_channels = reference.num_classes, reference.in_channels

    model = zoo.build_model(request.arch, num_classes, in_channels)
    if request.weights_path is not None:
        zoo.load_weights(model, request.weights_path, request.max_weights_bytes)
    model.eval()
    graphs = {r: ChannelGraph.build(model, (1, in_channels, r, r))
              for r in sorted({*resolutions, base_resolution, train_resolution})}
    cost_models = {r: CostModel(g) for r, g in graphs.items()}
    base_dense_macs = cost_models[base_resolution].dense_macs

    specs, budget_costs, skipped = [], [], []
    for index, (value, resolution) in enumerate(product(values, resolutions)):
        spec = MemberSpec(index, budget.kind, value, int(resolution), budget.device)
        latency = _latency_at(latency_models, budget.device, resolution) if budget.kind == "latency_ms" else None
        cost = BudgetCost(member_budget(budget.kind, value, budget.device, base_dense_macs),
                          cost_models[resolution], latency)
        if not cost.fits([min(params.round_to, size) for size in graphs[resolution].sizes]):
            skipped.append({"id": index, "name": spec.name, "reason": "below the cost of one channel per group"})
            continue
        specs.append(spec)
        budget_costs.append(cost)
    if not specs:
        raise BudgetError(f"no member of the cohort can meet its budget ({', '.join(s['name'] for s in skipped)}); "
                          "raise the budgets")

    finetune_epochs = request.epochs if request.finetune_epochs is None else request.finetune_epochs
    ctx = CohortContext(model=model, graphs=graphs, cost_models=cost_models, members=specs, budget_costs=budget_costs,
                     params=params, train_loader=train_loader, train_resolution=train_resolution, device=device,
                     search_epochs=request.epochs, joint_epochs=finetune_epochs, lr=request.lr,
                     joint_lr=request.finetune_lr, seed=request.seed, progress=_progress_in(progress),
                     should_cancel=should_cancel, checkpoint_dir=ckpt / "method" if ckpt else None)
    return CohortPlan(request, params, data, ctx, values, resolutions, base_resolution, num_classes, in_channels,
                      skipped, device)


def run_cohort(request: PruneRequest, out_dir: str | Path, progress: Callable[[dict], None] | None = None,
               should_cancel: Callable[[], bool] | None = None, checkpoint_dir: str | Path | None = None,
               latency_models: LatencyModels | None = None,
               on_member: Callable[[dict, Path], None] | None = None) -> dict:
    """Run a cohort job; write out_dir/members/<id>/{model.onnx, model.safetensors, arch.json, member.json} and
    out_dir/cohort.json; return the cohort report. `on_member(member, folder)` sees each member once it is on
    disk (also members kept from an earlier run), e.g. to store it before the rest are done."""
    started = time.perf_counter()
    plan = plan_cohort(request, progress, should_cancel, checkpoint_dir, latency_models)
    ctx, params, data, budget = plan.ctx, plan.params, plan.data, request.budget
    out_dir = Path(out_dir)
    (out_dir / "members").mkdir(parents=True, exist_ok=True)
    emit = ctx.progress

    result = load_runner(request.method)(ctx)
    shared = result.model.cpu().eval()
    dense_arch = zoo.describe(shared, request.arch, plan.num_classes, plan.in_channels, ctx.train_resolution)

    members = []
    for position, (spec, masks, cost) in enumerate(zip(ctx.members, result.structures, ctx.budget_costs,
                                                       strict=True)):
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cohort export cancelled before member {spec.id}")
        graph = ctx.graphs[spec.resolution]
        member = _export_member(shared, graph, ctx.cost_models[spec.resolution], masks, spec, cost, data,
                                dense_arch, out_dir, params.recalibration_batches, plan.device)
        member["latency_ms"] = _member_latency(member, latency_models, budget, graph.sizes, out_dir)
        members.append(member)
        if on_member is not None:
            on_member(member, member_dir(out_dir, spec.id))
        if emit:
            emit({"stage": "export", "member": spec.id, "accuracy": member["accuracy"],
                  "fraction": (position + 1) / len(ctx.members)})

    full_accuracy = _full_network_accuracy(shared, data, plan.base_resolution, params.recalibration_batches,
                                           plan.device)
    report = cohort_report(request, plan, members, full_accuracy, result.info, sorted(latency_models or {}))
    report["seconds"] = round(time.perf_counter() - started, 2)
    _atomic_json(out_dir / "cohort.json", report)
    if emit:
        emit({"stage": "export", "fraction": 1.0})
    return report


def cohort_report(request: PruneRequest, plan: CohortPlan, members: list[dict], full_accuracy: float,
                  method_info: dict, devices: list[str]) -> dict[str, Any]:
    """cohort.json: what was asked, every member, the Pareto fronts per device (and on MACs)."""
    ctx, budget = plan.ctx, request.budget
    base_cost = ctx.cost_models[plan.base_resolution]
    fronts = fronts_by_device(members, devices)
    return {
        "format": COHORT_FORMAT,
        "method": request.method,
        "params": plan.params.model_dump(),
        "arch": request.arch,
        "dataset": request.dataset,
        "num_classes": plan.num_classes,
        "in_channels": plan.in_channels,
        "budget_kind": budget.kind,
        "budget_device": budget.device,
        "budgets": plan.budgets,
        "resolutions": plan.resolutions,
        "base_resolution": plan.base_resolution,
        "train_resolution": ctx.train_resolution,
        "dense": {"macs": base_cost.dense_macs, "params": base_cost.dense_params, "accuracy": full_accuracy,
                  "resolution": plan.base_resolution},
        "members": members,
        "skipped": plan.skipped,
        "pareto": {key: [m["id"] for m in front] for key, front in fronts.items()},
        "method_info": method_info,
        "epochs": {"search_max": ctx.search_epochs, "joint": ctx.joint_epochs},
        "group_sizes": ctx.graphs[plan.base_resolution].sizes,
        "seed": request.seed,
        "device": str(plan.device),
    }


def member_dir(out_dir: str | Path, member_id: int) -> Path:
    """Where a member's files live."""
    return Path(out_dir) / "members" / str(member_id)


def _export_member(shared: torch.nn.Module, graph: ChannelGraph, cost_model: CostModel, masks: list[torch.Tensor],
                   spec: MemberSpec, budget_cost: BudgetCost, data: _Data, dense_arch: dict, out_dir: Path,
                   recalibration_batches: int, device: torch.device) -> dict:
    """Materialize, recalibrate, evaluate and write one member (skipped when already written with these masks)."""
    final = member_dir(out_dir, spec.id)
    encoded = encode_masks([masks])[0]
    if (final / MEMBER_FILE).exists():
        done = json.loads((final / MEMBER_FILE).read_text())
        if done.get("masks") == encoded:
            return done
        shutil.rmtree(final)  # a different structure (other run): redo it
    counts = [int(m.sum()) for m in masks]
    pruned = materialize(shared, graph, masks)
    train_loader, _, test_loader = data.loaders(spec.resolution)
    recalibrate_bn(pruned, train_loader, recalibration_batches, device)
    accuracy = evaluate(pruned, test_loader, device)
    pruned.cpu().eval()
    arch_json = zoo.describe(pruned, dense_arch["arch"], dense_arch["num_classes"], dense_arch["in_channels"],
                             spec.resolution)
    staging = final.with_name(f".{spec.id}.tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    zoo.save_arch(arch_json, staging / "arch.json")
    zoo.save_weights(pruned, staging / "model.safetensors")
    export_onnx(pruned, staging / "model.onnx", (1, dense_arch["in_channels"], spec.resolution, spec.resolution))
    member = {
        "id": spec.id,
        "name": spec.name,
        "budget": {"kind": spec.kind, "value": spec.value, "device": spec.device, "target": budget_cost.target,
                   "unit": budget_cost.unit},
        "resolution": spec.resolution,
        "keep_counts": counts,
        "widths": zoo.widths(arch_json),
        "macs": int(round(float(cost_model.macs(counts)))),
        "params": zoo.param_count(pruned),
        "accuracy": accuracy,
        "predicted_cost": budget_cost.hard(counts),
        "files": {"onnx": f"members/{spec.id}/model.onnx", "safetensors": f"members/{spec.id}/model.safetensors",
                  "arch": f"members/{spec.id}/arch.json"},
        "masks": encoded,
    }
    _atomic_json(staging / MEMBER_FILE, member)
    os.replace(staging, final)
    return member


def _member_latency(member: dict, latency_models: LatencyModels | None, budget: Budget, sizes: list[int],
                    out_dir: Path) -> dict[str, dict[str, Any]]:
    """Predictions on every device given; the budget's device also measures the exported model (kept on resume)."""
    latency = _predictions(latency_models, member["keep_counts"], sizes, member["resolution"])
    earlier = member.get("latency_ms") or {}
    device = budget.device if budget.kind == "latency_ms" else None
    if device is not None and device in latency:
        measured = (earlier.get(device) or {}).get("measured_ms")
        model = latency_models[device](member["resolution"])
        # A predict-only model (the worker is not that device) leaves measuring to the device's own queue.
        if measured is None and model.can_measure:
            measured = float(model.measure_ms(str(out_dir / member["files"]["onnx"])))
            _store_measurement(out_dir, member, device, measured)
        latency[device]["measured_ms"] = measured
    return latency


def _store_measurement(out_dir: Path, member: dict, device: str, measured_ms: float) -> None:
    path = member_dir(out_dir, member["id"]) / MEMBER_FILE
    saved = json.loads(path.read_text())
    saved.setdefault("latency_ms", {}).setdefault(device, {})["measured_ms"] = measured_ms
    _atomic_json(path, saved)


def _full_network_accuracy(shared: torch.nn.Module, data: _Data, resolution: int, batches: int,
                           device: torch.device) -> float:
    """Accuracy of the full-width shared network at the base resolution, after its own BN recalibration."""
    full = copy.deepcopy(shared)
    train_loader, _, test_loader = data.loaders(resolution)
    recalibrate_bn(full, train_loader, batches, device)
    return evaluate(full, test_loader, device)


def load_cohort(out_dir: str | Path) -> dict:
    """Read out_dir/cohort.json."""
    return json.loads((Path(out_dir) / "cohort.json").read_text())


def member_masks(member: Mapping[str, Any]) -> list[torch.Tensor]:
    """A member's keep masks as saved in member.json / cohort.json."""
    return decode_masks([member["masks"]])[0]
