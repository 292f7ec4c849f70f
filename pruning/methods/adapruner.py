"""AdaPruner (Liu et al., 2021): widths from block BN importance, then the best weight-inheritance criterion.

In this engine a "block" is a channel group of the ChannelGraph (coupled channels kept or removed together: a
conv's outputs and its BN, or a whole residual stream). Block importance I_b = mean |BN gamma| over the BNs where
the group's mask acts; group b keeps c_b = C_b * clip(kappa * I_b / mean(I), rho_min, 1) channels, kappa bisected
so that the cost lands in [(1 - band) x target, target]. Then every criterion (l1, l2, bn_gamma, fpgm, random)
picks which c_b channels of each group to inherit; each subnet is materialized, its BN statistics re-estimated on
training batches and its accuracy measured on the held-out split. The best criterion's masks and scores are
returned with the dense model, into which the winner's recalibrated BN statistics are written.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from pruning.allocation import bisect_scalar, masks_from_counts, round_counts
from pruning.budget import BudgetCost, BudgetError
from pruning.groups import ChannelGraph
from pruning.importance import BNScaleImportance, L1Importance, L2Importance, fpgm_scores
from pruning.methods.adapruner_params import AdaPrunerParams
from pruning.methods.api import MethodContext, NotApplicable, Selection
from pruning.methods.ofa import recalibrate_bn
from pruning.surgery import materialize, slice_indices
from pruning.train import Cancelled, evaluate_metrics

STAGE = "adapruner"
CACHE_FILE = "adapruner_criteria.json"
BISECT_ITERATIONS = 50


# ---- block importance and allocation -------------------------------------------------------------------------------

def _group_norms(model: nn.Module, graph: ChannelGraph) -> list[list[nn.Module]]:
    """Per group, the affine BNs (of the group's width) directly following its producers."""
    out = []
    for group in graph.groups:
        layers = [model.get_submodule(name) for name in group.scale_layers]
        out.append([m for m in layers if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
                    and m.weight.numel() == group.size])
    return out


def check(model: nn.Module, graph: ChannelGraph, params: AdaPrunerParams) -> None:
    """Block importance is read off BN scales: a network without BN after any prunable layer has none."""
    if not any(_group_norms(model, graph)):
        raise NotApplicable("adapruner ranks blocks by BatchNorm scales, and no prunable layer is followed by one")


@torch.no_grad()
def block_importance(model: nn.Module, graph: ChannelGraph) -> tuple[torch.Tensor, int]:
    """I_b per group = mean |gamma| of its BNs; a group without BN gets the mean of the others (a neutral ratio).
    Returns (importance, number of groups without BN)."""
    values = [torch.cat([m.weight.detach().abs().float().cpu() for m in norms]).mean() if norms else None
              for norms in _group_norms(model, graph)]
    known = [float(v) for v in values if v is not None]
    if not known:
        raise NotApplicable("adapruner ranks blocks by BatchNorm scales, and no prunable layer is followed by one")
    neutral = sum(known) / len(known)
    importance = torch.tensor([neutral if v is None else float(v) for v in values], dtype=torch.float64)
    return importance, sum(v is None for v in values)


class BlockWidths:
    """Channel counts as a function of kappa: c_b = C_b * clip(kappa * I_b / mean(I), rho_min, 1), rounded to the
    nearest multiple of `round_to`, never under ceil(rho_min * C_b) (nor one channel)."""

    def __init__(self, importance: torch.Tensor, sizes: Sequence[int], rho_min: float, round_to: int = 1):
        self.relative = importance.double() / importance.double().mean().clamp_min(1e-12)
        self.sizes = [int(s) for s in sizes]
        self.rho_min = float(rho_min)
        self.round_to = int(round_to)
        floors = [max(1, math.ceil(rho_min * s - 1e-9)) for s in self.sizes]
        # The floor itself rounded up to the channel multiple, so rounding never undercuts rho_min.
        self.floors = [min(s, math.ceil(f / self.round_to) * self.round_to)
                       for f, s in zip(floors, self.sizes, strict=True)]

    def exact(self, kappa: float) -> list[float]:
        ratios = (kappa * self.relative).clamp(self.rho_min, 1.0)
        return [float(r) * s for r, s in zip(ratios, self.sizes, strict=True)]

    def counts(self, kappa: float) -> list[int]:
        rounded = round_counts([math.floor(x + 0.5) for x in self.exact(kappa)], self.sizes, self.round_to)
        return [min(s, max(c, f)) for c, f, s in zip(rounded, self.floors, self.sizes, strict=True)]

    def saturating_kappa(self) -> float:
        """A kappa at which every group keeps all its channels."""
        return 1.0 / float(self.relative.min().clamp_min(1e-6))


@dataclass(frozen=True)
class Allocation:
    """The widths AdaPruner allocates, and how close to the budget they come."""

    counts: list[int]
    kappa: float
    cost_ratio: float  # hard cost / target (latency: the predictor's ms)
    topped_up_channels: int
    in_band: bool


def allocate(widths: BlockWidths, budget: BudgetCost, band: float) -> Allocation:
    """Bisect kappa to the largest allocation that fits; top up by rounding remainder if it is under the band."""
    if not budget.fits(widths.counts(0.0)):
        raise BudgetError(f"keeping rho_min={widths.rho_min:g} of every group already exceeds the budget "
                          f"({budget.hard(widths.counts(0.0)):.4g} > {budget.target:.4g} {budget.unit}); "
                          "lower rho_min or raise the budget")
    hi = widths.saturating_kappa()
    kappa = hi if budget.fits(widths.counts(hi)) else bisect_scalar(
        lambda k: budget.fits(widths.counts(k)), 0.0, hi, BISECT_ITERATIONS)
    counts = widths.counts(kappa)
    low = (1.0 - band) * budget.target
    topped = top_up(counts, widths.exact(kappa), widths, budget, low)
    cost = budget.hard(topped)
    return Allocation(topped, kappa, cost / budget.target, sum(topped) - sum(counts),
                      low <= cost <= budget.target)


def top_up(counts: list[int], exact: Sequence[float], widths: BlockWidths, budget: BudgetCost,
           low: float) -> list[int]:
    """Add round_to channels at a time to the groups whose formula width exceeds their rounded count the most,
    while the budget fits, until the cost reaches `low` (the bisection alone can stop a whole channel step short:
    on a small network one residual channel is several percent of the cost)."""
    counts = list(counts)
    added = True
    while added and budget.hard(counts) < low:
        added = False
        order = sorted(range(len(counts)), key=lambda g: counts[g] - exact[g])
        for g in order:
            if counts[g] >= widths.sizes[g]:
                continue
            trial = counts.copy()
            trial[g] = min(widths.sizes[g], counts[g] + widths.round_to)
            if budget.fits(trial):
                counts, added = trial, True
                if budget.hard(counts) >= low:
                    break
    return counts


# ---- inheritance criteria ------------------------------------------------------------------------------------------

def criterion_scores(name: str, model: nn.Module, graph: ChannelGraph, seed: int) -> list[torch.Tensor]:
    """Per-channel scores of one inheritance criterion (higher: inherited first)."""
    if name == "l1":
        return L1Importance()(model, graph)
    if name == "l2":
        return L2Importance()(model, graph)
    if name == "bn_gamma":
        return BNScaleImportance()(model, graph)
    if name == "fpgm":
        return fpgm_scores(model, graph)
    if name == "random":
        generator = torch.Generator().manual_seed(seed)
        return [torch.rand(size, generator=generator) for size in graph.sizes]
    raise ValueError(f"unknown criterion {name!r}")


# ---- candidates: build, recalibrate, score -------------------------------------------------------------------------

def reseed_loader(loader: DataLoader, seed: int) -> None:
    """The same calibration batches for every candidate, so criteria compare on equal terms and a resumed job
    rebuilds the winner exactly."""
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(seed)
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, RandomSampler) and sampler.generator is not None:
        sampler.generator.manual_seed(seed)


def recalibrated_subnet(model: nn.Module, graph: ChannelGraph, masks: Sequence[torch.Tensor], loader: DataLoader,
                        batches: int, seed: int, device: torch.device) -> tuple[nn.Module, int]:
    """The materialized subnet with BN statistics re-estimated on `batches` training batches (eval mode, on
    `device`); returns (subnet, batches used)."""
    subnet = materialize(model, graph, list(masks))
    reseed_loader(loader, seed)
    with torch.no_grad():
        used = recalibrate_bn(subnet, loader, batches, device)
    return subnet, used


def held_out_metrics(subnet: nn.Module, loader: DataLoader, batches: int, device: torch.device) -> dict:
    """Accuracy and loss on the held-out split (its first `batches` batches; 0: all)."""
    data = itertools.islice(loader, batches) if batches else loader
    result = evaluate_metrics(subnet, data, device)
    return {"accuracy": result.accuracy, "loss": result.loss, "samples": result.samples}


def better(candidate: dict, best: dict) -> bool:
    """Higher held-out accuracy wins; equal accuracy: lower loss; a full tie keeps the earlier criterion."""
    return (candidate["accuracy"], -candidate["loss"]) > (best["accuracy"], -best["loss"])


@torch.no_grad()
def inherit_bn_stats(model: nn.Module, graph: ChannelGraph, masks: Sequence[torch.Tensor],
                     subnet: nn.Module) -> tuple[nn.Module, int]:
    """A copy of the dense `model` whose BN running statistics, at the kept channels, are the recalibrated
    subnet's: materializing it with `masks` gives the recalibrated subnet. Returns (copy, BNs written)."""
    out = copy.deepcopy(model).cpu()
    subnet = subnet.cpu()
    indices = slice_indices(out, graph, list(masks), compact=subnet)
    written = 0
    for name, norm in subnet.named_modules():
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or not norm.track_running_stats:
            continue
        target = out.get_submodule(name)
        if norm.affine:
            kept = indices[f"{name}.weight"][0]
        elif norm.num_features == target.num_features:
            kept = None
        else:
            continue  # a non-affine BN whose channels were cut: no parameter tells which ones it kept
        rows = slice(None) if kept is None else kept
        target.running_mean[rows] = norm.running_mean
        target.running_var[rows] = norm.running_var
        written += 1
    return out, written


class CriterionCache:
    """Held-out results per criterion in checkpoint_dir (JSON), so a killed job does not redo finished criteria;
    valid only for the same weights, allocation and scoring settings (`key`)."""

    def __init__(self, directory: Path | None, key: dict):
        self.path = Path(directory) / CACHE_FILE if directory is not None else None
        self.key = key
        self.results: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            stored = json.loads(self.path.read_text())
            if stored.get("key") == key:
                self.results = dict(stored.get("results", {}))

    def store(self, name: str, result: dict) -> None:
        self.results[name] = result
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, "results": self.results}, indent=1))
        os.replace(tmp, self.path)


def weights_digest(model: nn.Module) -> str:
    """sha256 of the model's state (a cache written for other weights is not reused)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        # Raw bytes of any dtype (numpy has no bfloat16).
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---- the method ----------------------------------------------------------------------------------------------------

def _emit(progress: Callable[[dict], None] | None, step: int, steps: int, cost: float, result: dict,
          name: str) -> None:
    if progress is not None:
        progress({"stage": STAGE, "fraction": step / steps, "step": step, "steps": steps, "cost": cost,
                  "loss": result["loss"], "criterion": name, "accuracy": result["accuracy"]})


def candidate(ctx: MethodContext, model: nn.Module, name: str, counts: Sequence[int]):
    """One criterion's (scores, masks, recalibrated subnet) at the allocated widths."""
    scores = criterion_scores(name, model, ctx.graph, ctx.seed)
    masks = masks_from_counts(scores, counts)
    subnet, _ = recalibrated_subnet(model, ctx.graph, masks, ctx.train_loader, ctx.params.recal_batches, ctx.seed,
                                    ctx.device)
    return scores, masks, subnet


def score_criteria(ctx: MethodContext, model: nn.Module, counts: Sequence[int], cache: CriterionCache,
                   cost: float) -> tuple[str, nn.Module | None]:
    """Score every criterion the cache lacks (cancellable before each); returns the best criterion and its
    subnet, or None for the subnet when the winner's score came from the cache."""
    criteria = ctx.params.criteria
    best_name, best_subnet = None, None
    for step, name in enumerate(criteria, start=1):
        subnet = None
        if name not in cache.results:
            if ctx.should_cancel is not None and ctx.should_cancel():
                raise Cancelled(f"adapruner cancelled before criterion {name!r}")
            _, _, subnet = candidate(ctx, model, name, counts)
            cache.store(name, held_out_metrics(subnet, ctx.val_loader, ctx.params.val_batches, ctx.device))
        if best_name is None or better(cache.results[name], cache.results[best_name]):
            best_name, best_subnet = name, subnet
        _emit(ctx.progress, step, len(criteria), cost, cache.results[name], name)
    return best_name, best_subnet


def run(ctx: MethodContext) -> Selection:
    """Allocate widths by block BN importance, score every inheritance criterion, keep the best."""
    params: AdaPrunerParams = ctx.params  # type: ignore[assignment]
    model = ctx.model.cpu().eval()
    importance, without_bn = block_importance(model, ctx.graph)
    widths = BlockWidths(importance, ctx.graph.sizes, params.rho_min, params.round_to)
    allocation = allocate(widths, ctx.budget, params.band)
    counts, cost = allocation.counts, ctx.budget.hard(allocation.counts)
    cache = CriterionCache(ctx.checkpoint_dir, {
        "counts": counts, "seed": ctx.seed, "recal_batches": params.recal_batches,
        "val_batches": params.val_batches, "weights": weights_digest(model)})
    resumed = [name for name in params.criteria if name in cache.results]
    best_name, best_subnet = score_criteria(ctx, model, counts, cache, cost)
    if best_subnet is None:  # scored by an earlier, killed run: rebuilt from the same batches, same statistics
        scores, masks, best_subnet = candidate(ctx, model, best_name, counts)
    else:
        scores = criterion_scores(best_name, model, ctx.graph, ctx.seed)
        masks = masks_from_counts(scores, counts)
    inherited, bn_written = inherit_bn_stats(model, ctx.graph, masks, best_subnet)
    info = {"criteria": {name: cache.results[name] for name in params.criteria}, "chosen": best_name,
            "kappa": allocation.kappa, "rho_min": params.rho_min, "allocation": asdict(allocation),
            "allocated_cost": cost, "target": ctx.budget.target, "unit": ctx.budget.unit,
            "block_importance": [round(float(v), 6) for v in importance], "groups_without_bn": without_bn,
            "recal_batches": params.recal_batches, "bn_layers_recalibrated": bn_written,
            "resumed_criteria": resumed}
    return Selection(inherited, masks, scores, score_scale="per_group", round_to=params.round_to, info=info)
