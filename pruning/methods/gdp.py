"""GDP, Gates with Differentiable Polarization (Guo et al., ICCV 2021): per-channel gates
g = theta^2 / (theta^2 + eps) trained with the weights against an adaptive penalty on the budget's soft cost;
eps is annealed on a log scale so that the gates polarize to exactly 0 or towards 1. Zero gates are removed and the
others folded into the layers, so removing them changes nothing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import nn

from pruning.budget import BudgetCost
from pruning.groups import ChannelGraph
from pruning.methods.api import MethodContext, NotApplicable, Selection
from pruning.methods.gdp_params import GDPParams
from pruning.regularizer import Regularizer
from pruning.train import train

# How many points of each schedule trace the report keeps.
TRACE_POINTS = 50
# Smallest cosine factor the gates' gradient is divided by (train()'s last step has a factor near 0).
MIN_LR_FACTOR = 1e-3


def polarized_gate(theta: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """g = theta^2 / (theta^2 + eps): exactly 0 at theta = 0, towards 1 for |theta| >> sqrt(eps)."""
    square = theta * theta
    return square / (square + eps)


def annealed_eps(step: int, anneal_steps: int, eps_start: float, eps_end: float) -> float:
    """eps at 0-based step `step`: from eps_start down to eps_end on a log scale over `anneal_steps`, then flat."""
    share = min(1.0, step / max(1, anneal_steps))
    return math.exp(math.log(eps_start) + (math.log(eps_end) - math.log(eps_start)) * share)


def cosine_factor(step: int, total_steps: int) -> float:
    """The factor train()'s CosineAnnealingLR puts on every learning rate at 0-based optimizer step `step`."""
    return 0.5 * (1.0 + math.cos(math.pi * step / max(1, total_steps)))


def floor_count(size: int, min_keep: float) -> int:
    """Gates of a group that are never snapped shut: at least one, at least `min_keep` of them."""
    return min(size, max(1, math.ceil(min_keep * size - 1e-9)))


class GatedNetwork(nn.Module):
    """The model with every group's channels multiplied by its polarized gates where the graph puts per-channel
    scales (after each producer's BN), the same place pruning.surgery.fold_scales folds them into."""

    def __init__(self, model: nn.Module, graph: ChannelGraph, theta_init: float, eps: float, gate_lr: float,
                 max_step_share: float):
        super().__init__()
        self.model = model
        self.groups = list(graph.groups)
        self.thetas = nn.ParameterList(nn.Parameter(torch.full((g.size,), float(theta_init))) for g in self.groups)
        # A buffer, so that the network's own checkpoint also carries the eps its gates were computed with.
        self.register_buffer("eps", torch.tensor(float(eps)))
        self.gate_lr = gate_lr
        self.max_step_share = max_step_share
        # train()'s cosine factor on every learning rate at the current step (set by PolarizationSchedule.penalty).
        self.lr_factor = 1.0
        self.current: list[torch.Tensor] = []
        self._handles: list = []
        for index, theta in enumerate(self.thetas):
            self._handles.append(theta.register_hook(functools.partial(self._preconditioned, index)))
        for index, group in enumerate(self.groups):
            for name in group.scale_layers:
                hook = functools.partial(self._apply_gate, index)
                self._handles.append(self.model.get_submodule(name).register_forward_hook(hook))

    def gates(self) -> list[torch.Tensor]:
        """The gates of every group at the current eps (differentiable in theta)."""
        return [polarized_gate(theta, self.eps) for theta in self.thetas]

    def _preconditioned(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        """theta's gradient divided by 2 eps, clipped so that one SGD step at gate_lr changes |theta| by at most
        max_step_share of it."""
        # (ours) dg/dtheta = 2 theta eps / (theta^2 + eps)^2 is about 2 eps at theta = 1: without the division an
        # open gate stops feeling the loss as eps falls (at 1e-6 it would need lambda ~ 1e6 to move); with it, an
        # open gate's theta moves as the gate itself would under plain SGD, and a gate pushed down accelerates
        # (dg/dtheta peaks near sqrt(eps)). The clip keeps that acceleration from throwing theta across zero: a
        # whole group's gates, pushed alike by the cost, then fall over several steps, not in one, while the
        # penalty weight and the task loss still react.
        # The division by lr_factor undoes train()'s cosine decay on theta: eps is the gates' annealing, and
        # gates still undecided in the last steps must still be able to go to 0 or to 1.
        scaled = grad / (2.0 * self.eps.to(grad.device, grad.dtype))
        limit = self.max_step_share * self.thetas[index].detach().abs() / self.gate_lr
        return torch.maximum(torch.minimum(scaled, limit), -limit) / self.lr_factor

    def _apply_gate(self, index: int, _module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        gate = self.current[index].to(output.dtype)
        return output * gate.view([1, -1] + [1] * (output.dim() - 2))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.current = self.gates()
        return self.model(inputs)

    def remove(self) -> nn.Module:
        """Detach the gates' hooks and return the bare model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.current = []
        return self.model


class PolarizationSchedule(Regularizer):
    """Penalty lambda * max(0, soft cost / target - 1) on the gates' soft keep counts, lambda adapted towards the
    target, eps annealed, and gates below `snap_below` snapped to exactly 0 and frozen (each group's `floor`
    largest gates are held at g >= 0.5 instead).

    closed_step[g][c]: the step after which gate c of group g was snapped shut (-1: open), closed_gate[g][c] its
    value before that step; a closed gate's theta is held at 0, where g and its gradient are exactly 0, so it never
    comes back.
    """

    state_fields = ("eps", "penalty_weight", "closed_step", "closed_gate", "eps_trace", "penalty_weight_trace",
                    "cost_trace")

    def __init__(self, params: GDPParams, budget: BudgetCost, sizes: Sequence[int], anneal_steps: int,
                 total_steps: int):
        self.params = params
        self.total_steps = total_steps
        self.budget = budget
        self.anneal_steps = anneal_steps
        self.floors = [floor_count(size, params.min_keep) for size in sizes]
        self.eps = annealed_eps(0, anneal_steps, params.eps_start, params.eps_end)
        self.penalty_weight = float(params.lambda_init)
        self.closed_step = [torch.full((size,), -1, dtype=torch.long) for size in sizes]
        self.closed_gate = [torch.zeros(size) for size in sizes]
        self.eps_trace: list[float] = []
        self.penalty_weight_trace: list[float] = []
        self.cost_trace: list[float] = []
        # This step's soft cost and the thetas before its optimizer step (set by penalty, used by after_step).
        self._step_cost = float("nan")
        self._thetas_before: list[torch.Tensor] = []

    def penalty(self, model: nn.Module, step: int) -> torch.Tensor:
        model.lr_factor = max(MIN_LR_FACTOR, cosine_factor(step, self.total_steps))
        counts = torch.stack([g.sum() for g in model.gates()])
        # The cost models live on the CPU; autograd carries the gradient back to the gates' device.
        cost = self.budget.soft(counts.cpu())
        self._step_cost = float(cost.detach())
        self._thetas_before = [theta.detach().clone() for theta in model.thetas]
        # A hinge: the push stops the step the soft cost reaches the target, so gates falling in lockstep (a
        # group's gates share their cost gradient) stop there instead of overshooting while lambda decays.
        return (self.penalty_weight * torch.relu(cost / self.budget.target - 1.0)).float().to(counts.device)

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        self.snap(model, step)
        p = self.params
        # Dual-ascent-like: lambda grows while the soft cost is over the target and decays while under.
        factor = 1.0 + p.lambda_rate if self._step_cost > self.budget.target else 1.0 / (1.0 + p.lambda_rate)
        self.penalty_weight = min(max(self.penalty_weight * factor, p.lambda_min), p.lambda_max)
        self.eps_trace.append(self.eps)
        self.penalty_weight_trace.append(self.penalty_weight)
        self.cost_trace.append(self._step_cost)
        self.eps = annealed_eps(step, self.anneal_steps, p.eps_start, p.eps_end)
        model.eps.fill_(self.eps)

    def snap(self, model: nn.Module, step: int) -> None:
        """Close the open gates that fell below snap_below in this step, except each group's `floor` largest ones,
        which are held at g >= 0.5 instead; hold every closed gate's theta at exactly 0."""
        for index, theta in enumerate(model.thetas):
            values = theta.detach().cpu()
            open_now = self.closed_step[index] < 0
            held = torch.zeros_like(open_now)
            magnitude = torch.where(open_now, values.abs(), torch.full_like(values, -1.0))
            held[torch.topk(magnitude, self.floors[index]).indices] = True
            candidate = (polarized_gate(values, self.eps) < self.params.snap_below) & open_now & ~held
            before = (polarized_gate(self._thetas_before[index].cpu(), self.eps) if self._thetas_before
                      else torch.ones_like(values))
            self.closed_step[index][candidate] = step
            self.closed_gate[index][candidate] = before[candidate]
            floor_value = math.sqrt(self.eps)
            lifted = torch.where(values < 0, -floor_value, floor_value)
            new = torch.where(held & (values.abs() < floor_value), lifted, values)
            new[self.closed_step[index] >= 0] = 0.0
            theta.copy_(new.to(theta.device))

    def open_masks(self) -> list[torch.Tensor]:
        return [closed < 0 for closed in self.closed_step]


def device_multiple(ctx: MethodContext) -> int:
    """The channel multiple the finisher may round to: params.round_to, else the latency device's preference."""
    if ctx.params.round_to > 1:
        return int(ctx.params.round_to)
    if not ctx.params.device_rounding:
        return 1
    spec = getattr(ctx.budget.latency, "spec", None)
    return int(getattr(spec, "channel_multiple", 1) or 1)


def check(model: nn.Module, graph: ChannelGraph, params: GDPParams) -> None:
    """GDP gates the graph's channel groups where their scales fold exactly; it needs at least one group."""
    if not graph.groups:
        raise NotApplicable("gdp: the model has no prunable channel group to gate")
    for group in graph.groups:
        if not group.scale_layers:
            raise NotApplicable(f"gdp: group {group.root} has no layer to fold a gate into")


def finisher_scores(gates: Sequence[torch.Tensor], schedule: PolarizationSchedule,
                    total_steps: int) -> list[torch.Tensor]:
    """Open gates score their value (in (0, 1]); closed ones score in [-1, 0): the later a gate closed, and the larger
    it was before its last step, the higher; so every closed gate ranks below every open one and the finisher
    grows back the last to close first."""
    out = []
    for gate, step, before in zip(gates, schedule.closed_step, schedule.closed_gate, strict=True):
        late = (step.to(torch.float32) + 0.5 * before.clamp(0, 1)) / (total_steps + 1)
        out.append(torch.where(step >= 0, -1.0 + late, gate.detach().float().cpu()))
    return out


def thinned(trace: Sequence[float]) -> list[float]:
    return list(trace[:: max(1, len(trace) // TRACE_POINTS)])


def run(ctx: MethodContext) -> Selection:
    """Train the gates and the weights, then remove the zero gates and fold the others into the layers."""
    p: GDPParams = ctx.params  # type: ignore[assignment]
    check(ctx.model, ctx.graph, p)
    total_steps = ctx.epochs * len(ctx.train_loader)
    anneal_steps = max(1, round(p.anneal_share * total_steps))
    schedule = PolarizationSchedule(p, ctx.budget, ctx.graph.sizes, anneal_steps, total_steps)
    gated = GatedNetwork(ctx.model, ctx.graph, p.theta_init, schedule.eps, p.gate_lr, p.max_step_share)
    # No momentum on theta: a snapped gate's theta stays exactly 0 and an open one stops when the push stops.
    param_groups = [{"params": list(ctx.model.parameters()), "lr": ctx.lr},
                    {"params": list(gated.thetas), "lr": p.gate_lr, "momentum": 0.0, "weight_decay": 0.0}]
    try:
        result = train(gated, ctx.train_loader, ctx.epochs, lr=ctx.lr, device=ctx.device, progress=ctx.progress,
                       should_cancel=ctx.should_cancel, checkpoint_dir=ctx.checkpoint_dir, stage="gdp",
                       seed=ctx.seed, params=param_groups, regularizer=schedule)
        with torch.no_grad():
            gates = [g.detach().float().cpu() for g in gated.gates()]
    finally:
        model = gated.remove()
    masks = schedule.open_masks()
    counts = [int(m.sum()) for m in masks]
    undecided = sum(int(((g > 0) & (g < 0.5)).sum()) for g in gates)
    info = {
        "gate_keep_counts": counts,
        "gate_cost": ctx.budget.hard(counts),
        "target": ctx.budget.target,
        "undecided_gates": undecided,
        "eps_final": float(gated.eps),
        "penalty_weight": schedule.penalty_weight,
        "steps": result.steps,
        "resumed_from_step": result.resumed_from_step,
        "eps_trace": thinned(schedule.eps_trace),
        "penalty_weight_trace": thinned(schedule.penalty_weight_trace),
        "cost_trace": thinned(schedule.cost_trace),
    }
    # Closed gates scale their channels by 0: one the finisher grows back enters silently and fine-tuning wakes it.
    return Selection(model, masks, finisher_scores(gates, schedule, total_steps),
                     score_scale="global", round_to=device_multiple(ctx), scales=gates, info=info)
