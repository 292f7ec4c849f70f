"""One pruning job end to end: data, dense model, method, finisher, fine-tune, export, report.

Used by the CLI and by the Celery worker. Stage outputs are kept in `checkpoint_dir`, so a re-run of the same
job resumes where it stopped instead of starting over.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from pruning import zoo
from pruning.allocation import trim_masks
from pruning.budget import Budget, BudgetCost, parse_budget
from pruning.cost import CostModel
from pruning.data import DatasetSplits, load_dataset, make_loaders
from pruning.finisher import DeviceMeter, LatencyFit, fit_measured_latency, round_masks
from pruning.groups import ChannelGraph
from pruning.methods.api import MethodContext, Selection
from pruning.oracle import DeviceOracle
from pruning.registry import MethodInfo, MethodParams, get_method, load_check, load_runner
from pruning.report import job_report, latency_section, measured_latency
from pruning.surgery import export_onnx, materialize
from pruning.train import Cancelled, evaluate, pick_device, seed_everything, train
from pruning.verify import final_reading

__all__ = ["Budget", "Cancelled", "PruneRequest", "parse_budget", "run_prune"]

# Share of the job's progress bar each stage takes (dense training, the method, fine-tuning, the recovery epoch
# after a post-fine-tune trim, export).
STAGE_SPAN = {"dense": (0.0, 0.35), "prune": (0.35, 0.6), "finetune": (0.6, 0.93), "recovery": (0.93, 0.97),
              "export": (0.97, 1.0)}


@dataclass
class PruneRequest:
    """Everything that defines a pruning job."""

    arch: str
    dataset: str
    method: str
    budget: Budget
    epochs: int = 1
    finetune_epochs: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    weights_path: Path | None = None
    resolution: int | None = None
    seed: int = 0
    batch_size: int = 64
    lr: float = 0.05
    finetune_lr: float = 0.01
    data_root: Path | None = None
    device: str | None = None
    max_weights_bytes: int | None = None
    # Latency budgets: how far over the target a re-measured model may be, and how often to trim and re-measure.
    latency_tolerance: float = 0.05
    latency_rounds: int = 3


def _atomic_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


def _stage_progress(progress: Callable[[dict], None] | None, stage: str) -> Callable[[dict], None] | None:
    if progress is None:
        return None
    lo, hi = STAGE_SPAN[stage]

    def emit(event: dict) -> None:
        inner = float(event.get("fraction", 0.0))
        progress({**event, "stage": stage, "fraction": lo + (hi - lo) * min(max(inner, 0.0), 1.0)})

    return emit


@dataclass
class JobSetup:
    """What every stage shares: the validated request, its data, the dense model and its channel groups."""

    request: PruneRequest
    method: MethodInfo
    params: MethodParams
    device: torch.device
    splits: DatasetSplits
    loaders: tuple[DataLoader, DataLoader, DataLoader]  # train, val, test
    dense: nn.Module
    dense_arch: dict
    graph: ChannelGraph
    cache: StageCache
    progress: Callable[[dict], None] | None = None
    should_cancel: Callable[[], bool] | None = None

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, self.splits.in_channels, self.splits.resolution, self.splits.resolution)

    def describe(self, model: nn.Module) -> dict:
        """arch.json of `model`, a pruned copy of the dense architecture."""
        arch = self.dense_arch
        return zoo.describe(model, arch["arch"], arch["num_classes"], arch["in_channels"], arch["resolution"])

    def train(self, model: nn.Module, epochs: int, lr: float, stage: str, resumable: bool = True) -> None:
        train(model, self.loaders[0], epochs, lr=lr, device=self.device, progress=_stage_progress(self.progress, stage),
              should_cancel=self.should_cancel, checkpoint_dir=self.cache.folder(stage) if resumable else None,
              stage=stage, seed=self.request.seed)


class StageCache:
    """The one resume mechanism of a job: each stage's output under `root` (None: nothing is kept), so a re-run of
    the same job skips the stages it finished and resumes the one it was in (training checkpoints per stage)."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root else None
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path | None:
        return self.root / name if self.root is not None else None

    def folder(self, stage: str) -> Path | None:
        """Where a stage keeps its training checkpoints."""
        return self.path(stage)

    def has(self, *names: str) -> bool:
        return self.root is not None and all((self.root / n).exists() for n in names)

    def save_model(self, stem: str, model: nn.Module, arch: dict, info: dict | None = None) -> None:
        if self.root is None:
            return
        zoo.save_arch(arch, self.root / f"{stem}.arch.json")
        zoo.save_weights(model, self.root / f"{stem}.safetensors")
        if info is not None:
            _atomic_json(self.root / f"{stem}.info.json", info)

    def load_model(self, stem: str) -> tuple[nn.Module, dict]:
        model, _ = zoo.load_pruned(self.root / f"{stem}.arch.json", self.root / f"{stem}.safetensors")
        return model, json.loads((self.root / f"{stem}.info.json").read_text())


@dataclass
class Selected:
    """The select + finish stage's result: the pruned (not yet fine-tuned) model and what chose it."""

    pruned: nn.Module
    info: dict  # keep_counts, finisher_channels_removed, method_info, predicted_cost[, latency_fit]


@dataclass
class Verified:
    """The verify stage's result: the model to deliver, its counts, the final reading and any post-trim."""

    model: nn.Module
    counts: list[int]
    final: dict | None = None
    post_trim: LatencyFit | None = None
    recovery_epochs: int = 0


def prepare(request: PruneRequest, progress: Callable[[dict], None] | None,
            should_cancel: Callable[[], bool] | None, checkpoint_dir: str | Path | None) -> JobSetup:
    """Validate the request, load the data, build the dense model and its groups, and let the method refuse the
    architecture (NotApplicable) before any training."""
    method = get_method(request.method)
    params = method.validate_params(request.params)
    seed_everything(request.seed)
    device = pick_device(request.device)
    splits = load_dataset(request.dataset, request.data_root, request.resolution)
    loaders = make_loaders(splits, request.batch_size, request.seed)
    dense = zoo.build_model(request.arch, splits.num_classes, splits.in_channels)
    dense_arch = zoo.describe(dense, request.arch, splits.num_classes, splits.in_channels, splits.resolution)
    # The groups depend on the architecture only: found (and the method's own check made) before any training.
    graph = ChannelGraph.build(dense.eval(), (1, splits.in_channels, splits.resolution, splits.resolution))
    check = load_check(request.method)
    if check is not None:
        check(dense, graph, params)
    return JobSetup(request, method, params, device, splits, loaders, dense, dense_arch, graph,
                    StageCache(checkpoint_dir), progress, should_cancel)


def dense_stage(job: JobSetup) -> tuple[float, int]:
    """(test accuracy, epochs trained) of the dense model: given weights, cached ones, or trained now (unless the
    method trains from scratch itself)."""
    request, cache = job.request, job.cache
    trains_dense = request.weights_path is None and job.method.needs_dense
    if request.weights_path is not None:
        zoo.load_weights(job.dense, request.weights_path, request.max_weights_bytes)
    elif cache.has("dense.safetensors"):
        zoo.load_weights(job.dense, cache.path("dense.safetensors"))
    elif trains_dense:
        job.train(job.dense, request.epochs, request.lr, "dense")
        if cache.root is not None:
            zoo.save_weights(job.dense, cache.path("dense.safetensors"))
    accuracy = evaluate(job.dense, job.loaders[2], job.device)
    job.dense.cpu().eval()
    return accuracy, request.epochs if trains_dense else 0


def select_stage(job: JobSetup, budget_cost: BudgetCost, meter: DeviceMeter | None) -> Selected:
    """The method's Selection, brought to the budget by the finisher (on the device where it measures), and
    materialized; cached as pruned.*."""
    if job.cache.has("pruned.arch.json", "pruned.safetensors", "pruned.info.json"):
        return Selected(*job.cache.load_model("pruned"))
    request = job.request
    ctx = MethodContext(model=job.dense, graph=job.graph, cost_model=budget_cost.cost_model, budget=budget_cost,
                        params=job.params, train_loader=job.loaders[0], val_loader=job.loaders[1], device=job.device,
                        epochs=request.epochs, lr=request.finetune_lr, seed=request.seed,
                        progress=_stage_progress(job.progress, "prune"), should_cancel=job.should_cancel,
                        checkpoint_dir=job.cache.folder("method"))
    result = load_runner(request.method)(ctx)
    if not isinstance(result, Selection):
        raise TypeError(f"method {request.method!r} returned {type(result).__name__}, not a Selection")
    result.model.cpu().eval()
    masks, trimmed, latency_fit = finish_selection(job, result, budget_cost, meter)
    counts = [int(m.sum()) for m in masks]
    pruned = materialize(result.model, job.graph, masks, result.scales)
    method_info = {**result.info, "score_scale": result.score_scale, "finisher_round_to": result.round_to}
    info = {"keep_counts": counts, "finisher_channels_removed": trimmed, "method_info": method_info,
            "predicted_cost": budget_cost.hard(counts)}
    if latency_fit is not None:
        info["latency_fit"] = latency_fit.report()
    job.cache.save_model("pruned", pruned, job.describe(pruned), info)
    return Selected(pruned, info)


def finish_selection(job: JobSetup, result: Selection, budget_cost: BudgetCost, meter: DeviceMeter | None,
                     ) -> tuple[list[torch.Tensor], int, LatencyFit | None]:
    """(masks, channels trimmed, the measured fit or None): the Selection trimmed to the budget's hard cost and
    rounded, or, on the latency device, fitted to the measured latency."""
    if meter is not None:
        # The device is the judge: the measured loop trims (or grows) from the method's own choice, which may
        # already have been corrected for the predictor's bias on this device.
        request = job.request
        fit = fit_measured_latency(budget_cost, result.scores, result.keep_masks, Measurer(result, job.graph, meter),
                                   job.graph.sizes, request.latency_tolerance, request.latency_rounds,
                                   result.normalize_scores, result.round_to)
        return fit.keep_masks, fit.channels_trimmed, fit
    masks, trimmed = trim_masks(result.scores, result.keep_masks, budget_cost.fits, result.normalize_scores)
    if result.round_to > 1:
        masks = round_masks(result.scores, masks, result.round_to, budget_cost.fits, job.graph.sizes)
    return masks, trimmed, None


def verify_stage(job: JobSetup, selected: Selected, budget_cost: BudgetCost, meter: DeviceMeter | None,
                 finetune_epochs: int) -> Verified:
    """The fine-tuned model read on the device (where it measures), trimmed if over, and given one recovery
    epoch after a trim that removed channels."""
    verified = Verified(selected.pruned, selected.info["keep_counts"])
    if meter is None:
        return verified
    request = job.request
    final, model, post_trim = final_reading(selected.pruned, selected.info, meter, budget_cost, job.graph,
                                            job.input_shape, request.latency_tolerance, request.latency_rounds)
    verified = Verified(model, selected.info["keep_counts"], final, post_trim)
    if post_trim is not None:
        verified.counts = [int(m.sum()) for m in post_trim.keep_masks]
        if post_trim.channels_trimmed > 0 and finetune_epochs > 0:
            # The trim takes channels out of fine-tuned weights; without training after it a delivered model can
            # lose most of its accuracy. One epoch at the fine-tune rate recovers most of it; the structure, and so
            # the final reading, stays as measured.
            verified.recovery_epochs = 1
            job.train(model, 1, request.finetune_lr, "recovery", resumable=False)
    return verified


def export_stage(job: JobSetup, model: nn.Module, out_dir: Path) -> dict:
    """model.onnx, model.safetensors and arch.json in `out_dir`; returns the arch.json."""
    model.cpu().eval()
    arch_json = job.describe(model)
    zoo.save_arch(arch_json, out_dir / "arch.json")
    zoo.save_weights(model, out_dir / "model.safetensors")
    export_onnx(model, out_dir / "model.onnx", job.input_shape)
    return arch_json


def run_prune(request: PruneRequest, out_dir: str | Path, progress: Callable[[dict], None] | None = None,
              should_cancel: Callable[[], bool] | None = None, checkpoint_dir: str | Path | None = None,
              latency: DeviceOracle | None = None) -> dict:
    """Run the job's stages (dense, select + finish, fine-tune, verify on device, export); write model.onnx,
    model.safetensors, arch.json and report.json to `out_dir`; return the report."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    job = prepare(request, progress, should_cancel, checkpoint_dir)
    dense_accuracy, dense_epochs = dense_stage(job)
    budget_cost = BudgetCost(request.budget, CostModel(job.graph), latency)
    meter = None
    if request.budget.kind == "latency_ms" and latency is not None and latency.can_measure:
        # One meter for the whole job, so the final reading knows the machine's quiet speed from the finisher's.
        meter = DeviceMeter(latency, job.dense, job.input_shape, job.describe)
    selected = select_stage(job, budget_cost, meter)
    if progress:
        progress({"stage": "prune", "fraction": STAGE_SPAN["prune"][1], "cost": selected.info["predicted_cost"]})
    finetune_epochs = request.epochs if request.finetune_epochs is None else request.finetune_epochs
    if finetune_epochs > 0:
        job.train(selected.pruned, finetune_epochs, request.finetune_lr, "finetune")
    selected.pruned.cpu().eval()
    verified = verify_stage(job, selected, budget_cost, meter, finetune_epochs)
    pruned_accuracy = evaluate(verified.model, job.loaders[2], job.device)
    arch_json = export_stage(job, verified.model, out_dir)
    epochs = {"dense": dense_epochs, "finetune": finetune_epochs, "recovery": verified.recovery_epochs}
    report = job_report(request, job, selected, verified, budget_cost, dense_accuracy, pruned_accuracy,
                        zoo.param_count(verified.model), zoo.widths(arch_json), epochs)
    if latency is not None:
        measured = (None, None)
        # An oracle that cannot measure means this worker is not the device: the device's own queue measures later.
        if latency.can_measure:
            export_onnx(job.dense, out_dir / "dense.onnx", job.input_shape)
            measured = measured_latency(latency, str(out_dir / "dense.onnx"), str(out_dir / "model.onnx"))
            (out_dir / "dense.onnx").unlink()
        report["latency_ms"] = latency_section(request.budget, budget_cost, verified.counts, measured,
                                               verified.final, selected.info, verified.post_trim,
                                               verified.recovery_epochs)
    report["seconds"] = round(time.perf_counter() - started, 2)
    _atomic_json(out_dir / "report.json", report)
    if progress:
        progress({"stage": "export", "fraction": 1.0})
    return report


class Measurer:
    """masks -> drift-corrected ms on the latency device of the Selection's model materialized with them."""

    def __init__(self, result: Selection, graph: ChannelGraph, meter: DeviceMeter):
        self.result, self.graph, self.meter = result, graph, meter

    def __call__(self, masks: list[torch.Tensor]) -> float:
        return self.meter.measure_masks(self.result.model, self.graph, masks, self.result.scales)["ms"]
