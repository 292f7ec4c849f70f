"""GReg (Wang et al., ICLR 2021): an L2 penalty that grows on the channels chosen for removal until they carry
nothing, so that removing them costs (almost) no accuracy.

GReg-1 chooses the channels by L1 up front; GReg-2 first grows a small penalty on every filter, then chooses
by L1 (the filters that shrank most under it are the ones the loss needs least). The schedule (the chosen set,
the phase, how many increments were made) lives in GrowingRegularizer, which pruning.train checkpoints.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from pruning.allocation import fit_scores, masks_from_counts
from pruning.groups import ChannelGraph
from pruning.importance import L1Importance
from pruning.methods.api import MethodContext, NotApplicable, Selection
from pruning.regularizer import Regularizer
from pruning.surgery import materialize
from pruning.train import evaluate, train

STAGE = "greg"
PHASES = ("pick", "grow", "stabilize", "done")


@dataclass(frozen=True)
class GrowthSchedule:
    """The penalty's schedule in training steps: a uniform phase (greg2: every filter's factor grows by
    pick_delta_lambda up to pick_ceiling), the growth of the chosen channels' factor by delta_lambda up to tau,
    one increment every interval_steps, then stabilize_steps at tau."""

    interval_steps: int
    delta_lambda: float
    tau: float
    stabilize_steps: int
    pick_ceiling: float = 0.0  # 0: no uniform phase (greg1)
    pick_delta_lambda: float = 1.0
    kept_lambda: float = 0.0  # the kept channels' factor after the re-selection (-weight decay cancels it)

    @property
    def pick_updates(self) -> int:
        return math.ceil(self.pick_ceiling / self.pick_delta_lambda - 1e-9) if self.pick_ceiling > 0 else 0

    @property
    def grow_updates(self) -> int:
        return max(1, math.ceil((self.tau - self.pick_ceiling) / self.delta_lambda - 1e-9))

    @property
    def total_steps(self) -> int:
        return self.interval_steps * (self.pick_updates + self.grow_updates) + self.stabilize_steps

    def fitted(self, available_steps: int) -> GrowthSchedule:
        """This schedule, or one with fewer, larger increments (same interval and ceilings) and a proportionally
        shorter stabilization that ends within `available_steps`."""
        if self.total_steps <= available_steps:
            return self
        share = available_steps / self.total_steps
        grow = max(1, math.floor(self.grow_updates * share))
        changes: dict[str, Any] = {"delta_lambda": (self.tau - self.pick_ceiling) / grow,
                                   "stabilize_steps": math.floor(self.stabilize_steps * share)}
        if self.pick_ceiling > 0:
            changes["pick_delta_lambda"] = self.pick_ceiling / max(1, math.floor(self.pick_updates * share))
        return replace(self, **changes)

    @classmethod
    def from_params(cls, params: Any) -> GrowthSchedule:
        greg2 = params.variant == "greg2"
        kept = -params.weight_decay if greg2 and params.cancel_decay_on_kept else 0.0
        return cls(params.update_interval_steps, params.delta_lambda, params.tau, params.stabilize_steps,
                   params.pick_ceiling if greg2 else 0.0, params.pick_delta_lambda, kept)


@dataclass(frozen=True)
class L1Allocator:
    """Chooses the channels to keep: L1 scores, allocated to the budget globally or uniformly."""

    graph: ChannelGraph
    fits: Callable[[list[int]], bool]
    round_to: int = 1
    allocation: str = "global"

    def select(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(L1 scores, keep masks) of `model`'s current weights."""
        scores = L1Importance()(model, self.graph)
        counts = fit_scores(scores, self.graph.sizes, self.fits, self.round_to, self.allocation)
        return scores, masks_from_counts(scores, counts)


def coupled_layers(model: nn.Module, graph: ChannelGraph) -> list[list[str]]:
    """Per group, the layers whose output slices are its channels: the producing convs/linears and their norms
    (every parameter that removing the channel deletes from a producer; consumers' inputs are left alone)."""
    out = []
    for group in graph.groups:
        shares = [*group.out_layers, *group.norm_layers]
        out.append([s.layer for s in shares if s.channels == group.size])
    return out


def channel_square_norms(model: nn.Module, layers: Sequence[str]) -> torch.Tensor:
    """Sum over `layers` of each output channel's squared weight (and bias) norm, differentiable."""
    total = None
    for name in layers:
        layer = model.get_submodule(name)
        part = layer.weight.pow(2).flatten(1).sum(1) if layer.weight.dim() > 1 else layer.weight.pow(2)
        if getattr(layer, "bias", None) is not None:
            part = part + layer.bias.pow(2)
        total = part if total is None else total + part
    return total


@torch.no_grad()
def producer_norms(model: nn.Module, graph: ChannelGraph) -> list[torch.Tensor]:
    """Per group, the L2 norm of every channel's producing parameters (filters, norm scale and shift)."""
    return [channel_square_norms(model, layers).detach().float().cpu().sqrt() if layers else torch.zeros(g.size)
            for layers, g in zip(coupled_layers(model, graph), graph.groups, strict=True)]


class GrowingRegularizer(Regularizer):
    """The growing L2 penalty 0.5 * sum_j lambda_j * ||theta_j||^2 over every channel j's coupled parameters
    (gradient lambda_j * theta_j, as in the paper), with lambda a function of the checkpointed schedule state:
    the channels chosen for removal (`pruned`), the phase and the increments made so far."""

    state_fields = ("pruned", "phase", "pick_updates_done", "grow_updates_done", "reselected_at_step",
                    "stabilized_at_step")

    def __init__(self, layers: list[list[str]], schedule: GrowthSchedule, allocator: L1Allocator,
                 pruned: Sequence[torch.Tensor]):
        self.layers = layers
        self.schedule = schedule
        self.allocator = allocator
        self.pruned = [m.detach().cpu().bool().clone() for m in pruned]
        self.phase = "pick" if schedule.pick_ceiling > 0 else "grow"
        self.pick_updates_done = 0
        self.grow_updates_done = 0
        self.reselected_at_step = -1
        self.stabilized_at_step = -1

    def pruned_lambda(self) -> float:
        """The penalty factor of the chosen channels (of every channel during the uniform phase)."""
        s = self.schedule
        if self.phase == "pick":
            return min(s.pick_ceiling, self.pick_updates_done * s.pick_delta_lambda)
        return min(s.tau, s.pick_ceiling + self.grow_updates_done * s.delta_lambda)

    def lambdas(self) -> list[torch.Tensor]:
        """Every group's per-channel penalty factors now."""
        value = self.pruned_lambda()
        if self.phase == "pick":
            return [torch.full((len(m),), value) for m in self.pruned]
        return [torch.where(m, torch.tensor(value), torch.tensor(self.schedule.kept_lambda)) for m in self.pruned]

    def penalty(self, model: nn.Module, step: int) -> torch.Tensor | None:
        terms = []
        for layers, lam in zip(self.layers, self.lambdas(), strict=True):
            if layers and bool(lam.any()):
                squares = channel_square_norms(model, layers)
                terms.append(0.5 * (lam.to(squares.device, squares.dtype) * squares).sum())
        return torch.stack(terms).sum() if terms else None

    def after_step(self, model: nn.Module, step: int) -> None:
        s = self.schedule
        if self.phase == "stabilize" and step - self.stabilized_at_step >= s.stabilize_steps:
            self.phase = "done"  # the penalty stays at tau for whatever training is left
        if self.phase in ("stabilize", "done") or step % s.interval_steps:
            return
        if self.phase == "pick":
            self.pick_updates_done += 1
            if self.pick_updates_done >= s.pick_updates:
                self.reselect(model, step)
            return
        self.grow_updates_done += 1
        if self.grow_updates_done >= s.grow_updates:
            self.phase = "stabilize" if s.stabilize_steps > 0 else "done"
            self.stabilized_at_step = step

    def reselect(self, model: nn.Module, step: int) -> None:
        """End of the uniform phase: choose the channels again by L1 of the shrunk weights (GReg-2)."""
        _, keep = self.allocator.select(model)
        self.pruned = [~m for m in keep]
        self.phase = "grow"
        self.reselected_at_step = step


class LambdaProgress:
    """Forwards training progress events with the penalty's phase and factor added."""

    def __init__(self, progress: Callable[[dict], None] | None, regularizer: GrowingRegularizer):
        self.progress = progress
        self.regularizer = regularizer

    def __call__(self, event: dict) -> None:
        if self.progress is not None:
            self.progress({**event, "phase": self.regularizer.phase, "lambda": self.regularizer.pruned_lambda()})


def check(model: nn.Module, graph: ChannelGraph, params: Any) -> None:
    """greg needs at least one group whose producing parameters it can penalize."""
    if not any(coupled_layers(model, graph)):
        raise NotApplicable("greg: no channel group has a producing layer to penalize")


def shrink_factors(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor],
                   masks: Sequence[torch.Tensor]) -> list[float]:
    """norm before / norm after of every channel selected by `masks` (over all groups)."""
    return [float(b / a.clamp_min(1e-12)) for bs, as_, ms in zip(before, after, masks, strict=True)
            for b, a in zip(bs[ms], as_[ms], strict=True)]


def planned_schedule(ctx: MethodContext) -> tuple[GrowthSchedule, int]:
    """(schedule, epochs): the params' schedule fitted to the job's epochs, or the epochs the schedule needs."""
    schedule = GrowthSchedule.from_params(ctx.params)
    steps_per_epoch = len(ctx.train_loader)
    if ctx.params.fit_to_epochs:
        return schedule.fitted(ctx.epochs * steps_per_epoch), ctx.epochs
    return schedule, math.ceil(schedule.total_steps / steps_per_epoch)


def run(ctx: MethodContext) -> Selection:
    """Choose by L1, grow the penalty on the chosen channels (after a uniform phase for greg2), return them."""
    p = ctx.params
    model = copy.deepcopy(ctx.model).to(ctx.device)
    allocator = L1Allocator(ctx.graph, ctx.budget.fits, p.round_to, p.allocation)
    _, first_keep = allocator.select(model)
    schedule, epochs = planned_schedule(ctx)
    regularizer = GrowingRegularizer(coupled_layers(model, ctx.graph), schedule, allocator,
                                     [~m for m in first_keep])
    norms_before = producer_norms(model, ctx.graph)
    accuracy_dense = evaluate(model, ctx.val_loader, ctx.device)
    result = train(model, ctx.train_loader, epochs, lr=p.reg_lr or ctx.lr, weight_decay=p.weight_decay,
                   device=ctx.device, progress=LambdaProgress(ctx.progress, regularizer),
                   should_cancel=ctx.should_cancel, checkpoint_dir=ctx.checkpoint_dir, stage=STAGE, seed=ctx.seed,
                   regularizer=regularizer)
    keep = [~m for m in regularizer.pruned]
    model.eval()
    norms_after = producer_norms(model, ctx.graph)
    removed_shrink = shrink_factors(norms_before, norms_after, regularizer.pruned)
    kept_shrink = shrink_factors(norms_before, norms_after, keep)
    info = {
        "variant": p.variant,
        "allocation": p.allocation,
        "keep_counts": [int(m.sum()) for m in keep],
        "first_keep_counts": [int(m.sum()) for m in first_keep],
        "reselected_at_step": regularizer.reselected_at_step,
        "reselection_overlap": overlap(first_keep, keep),
        "phase": regularizer.phase,
        "final_lambda": regularizer.pruned_lambda(),
        "schedule": {**asdict(schedule), "total_steps": schedule.total_steps},
        "steps": result.steps,
        "epochs": epochs,
        "removed_min_shrink": min(removed_shrink, default=None),
        "kept_median_shrink": float(torch.tensor(kept_shrink).median()) if kept_shrink else None,
        "accuracy_dense": accuracy_dense,
        "accuracy_before_removal": evaluate(model, ctx.val_loader, ctx.device),
        "accuracy_after_removal": evaluate(materialize(model, ctx.graph, keep), ctx.val_loader, ctx.device),
    }
    # L1 of the regularized weights: the removed channels sit near zero, so the finisher trims the weakest kept
    # channels first and grows back the least shrunk removed ones; per layer, as L1 compares within a group.
    scores = L1Importance()(model, ctx.graph)
    return Selection(model, keep, scores, score_scale="per_group", round_to=p.round_to, info=info)


def overlap(first_keep: Sequence[torch.Tensor], keep: Sequence[torch.Tensor]) -> float | None:
    """Share of the finally removed channels that the first L1 choice removed too (1: the same choice)."""
    removed = sum(int((~k).sum()) for k in keep)
    common = sum(int(((~a) & (~b)).sum()) for a, b in zip(first_keep, keep, strict=True))
    return common / removed if removed else None
