"""W-Gates (Li et al., ECCV-W 2020): binary channel gates computed from the filters' own weights, trained
against a differentiable cost (the device's LPNet latency, or MACs/params) with an adaptive penalty weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from pruning.budget import BudgetCost
from pruning.data import shuffled_loader
from pruning.finisher import DeviceMeter
from pruning.groups import ChannelGraph
from pruning.methods.api import MethodContext, Selection
from pruning.methods.wgates_net import (  # noqa: F401 - the gate machinery, re-exported for tests and users
    FLOOR_RANK,
    FilterGate,
    GatedNetwork,
    binary_gate,
    budget_floors,
    filter_vectors,
    final_masks,
    finisher_scores,
    first_channels,
    floor_count,
    floored_gate,
    group_floors,
    is_residual,
    lowered_shares,
    range_term,
)
from pruning.methods.wgates_params import WGatesParams
from pruning.oracle import DeviceOracle
from pruning.regularizer import Regularizer
from pruning.train import train

# get too noisy below it.
MIN_GATE_BATCH = 16


def latency_check_steps(anneal_steps: int, total_steps: int, checks: int) -> set[int]:
    """Steps after which the gates' configuration is measured on the device: spread from the end of the
    annealing to the last step, which is never one (the finisher measures the final model anyway)."""
    if checks <= 0 or total_steps < 2:
        return set()
    last = total_steps - 1
    first = min(anneal_steps, last)
    return {round(first + (last - first) * i / checks) for i in range(checks)}


def device_multiple(ctx: MethodContext) -> int:
    """The channel multiple the finisher may round to: params.round_to, else the latency device's preference."""
    if ctx.params.round_to > 1:
        return int(ctx.params.round_to)
    if not ctx.params.device_rounding:
        return 1
    latency = ctx.budget.latency
    return int(latency.channel_multiple) if latency is not None else 1


def gate_batch_size(samples: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """The job's batch size, or a smaller one (not below MIN_GATE_BATCH) giving `epochs` at least `min_steps`
    steps over `samples` training samples."""
    if min_steps <= 0 or epochs <= 0 or epochs * (samples // batch_size) >= min_steps:
        return batch_size
    return min(batch_size, max(MIN_GATE_BATCH, samples * epochs // min_steps))


def gate_loader(train_loader: DataLoader, epochs: int, min_steps: int, seed: int) -> DataLoader:
    """`train_loader`, or the same data in the smaller batches of gate_batch_size, shuffled by `seed`."""
    data = train_loader.dataset
    size = gate_batch_size(len(data), int(train_loader.batch_size), epochs, min_steps)
    if size == train_loader.batch_size:
        return train_loader
    return shuffled_loader(data, size, seed, train_loader.num_workers, train_loader.pin_memory)


class LatencyProbe:
    """Measures configurations of a model on the latency device during gate training (one meter, made on first
    use, so the dense reference is exported once)."""

    def __init__(self, latency: DeviceOracle, budget: BudgetCost, graph: ChannelGraph):
        self.latency, self.budget, self.graph = latency, budget, graph
        self.meter: DeviceMeter | None = None

    def read(self, bare: nn.Module, masks: Sequence[torch.Tensor]) -> tuple[float, float, float]:
        """(predicted ms, measured ms, measured / predicted) of `bare` materialized with `masks`."""
        if self.meter is None:
            self.meter = DeviceMeter(self.latency, bare, self.graph.input_shape)
        predicted = self.budget.hard([int(m.sum()) for m in masks])
        measured = self.meter.measure_masks(bare, self.graph, masks)["ms"]
        return predicted, measured, max(measured / max(predicted, 1e-9), 1e-3)


def plan_floors(ctx: MethodContext, residual: Sequence[bool], probe: LatencyProbe | None,
                ) -> tuple[list[int], dict[str, float]]:
    """The floors (channels per group the gates keep open) and how they were set: min_keep / residual_min_keep,
    lowered (floor_share, floor_lowering) when they cost more than the budget by more than floor_tolerance."""
    p, budget, sizes = ctx.params, ctx.budget, ctx.graph.sizes
    floors = group_floors(sizes, residual, p.min_keep, p.residual_min_keep)
    info: dict[str, float] = {"floor_min_keep": p.min_keep, "floor_residual_min_keep": p.residual_min_keep}
    if p.floor_share <= 0:
        return floors, info
    # (ours) Floors that cost more than the budget pin every gate at its floor, and the finisher, not the gates,
    # then decides what goes; lowered until they fit, they let the gates reach the budget themselves.
    bias = 1.0
    if probe is not None:
        # LPNet's error near a tight budget can exceed the room the share leaves, so the floors are measured
        # once and the predictions scaled by measured / predicted.
        predicted, measured, bias = probe.read(ctx.model, first_channels(sizes, floors))
        info.update(floor_predicted=predicted, floor_measured=measured)

    def floor_cost(counts: list[int]) -> float:
        return budget.hard(counts) * bias

    # Within the tolerance the device's timings cannot tell the floors from the budget, and lowering them there
    # costs accuracy for nothing: the finisher trims them if they do measure over.
    if floor_cost(floors) > (1 + p.floor_tolerance) * budget.target:
        floors, shares = budget_floors(sizes, residual, p.min_keep, p.residual_min_keep, floor_cost,
                                       p.floor_share * budget.target, p.floor_lowering == "residual_first")
        info.update(floor_min_keep=shares[0], floor_residual_min_keep=shares[1])
    return floors, info


class WGatesSchedule(Regularizer):
    """The budget penalty lambda * max(0, cost/target - 1) on the gated network, with its schedule: the target
    falls from the dense cost to the budget over the annealing steps, lambda rises while the gates cost more than
    the target and falls while they cost less, two-sided once the target stops falling, and on-device checks
    rescale the target by LPNet's measured bias. lambda, the step count and the correction are buffers of the
    gated network (checkpointed with it); the history is this regularizer's state."""

    state_fields = ("history",)

    def __init__(self, params: WGatesParams, budget: BudgetCost, anneal_steps: int, check_steps: set[int],
                 probe: LatencyProbe | None):
        self.p, self.budget, self.anneal_steps, self.check_steps = params, budget, anneal_steps, check_steps
        self.probe = probe
        self.dense_cost = budget.dense()
        self.history: dict[str, list] = {"cost": [], "penalty_weight": [], "latency_checks": []}
        self.last_cost, self.last_target, self.settling = float("nan"), budget.target, False

    def final_target(self, net: GatedNetwork) -> float:
        # On-device checks scale the predicted-cost target by predicted/measured: the gates absorb LPNet's bias.
        return self.budget.target * (1.0 - self.p.target_margin) / float(net.latency_correction)

    def scheduled_target(self, net: GatedNetwork, step: int) -> float:
        # The target falls linearly from the dense cost, so gates close gradually while the task loss ranks them.
        share = min(1.0, step / self.anneal_steps)
        end = self.final_target(net)
        return min(self.dense_cost, max(end, self.dense_cost + (end - self.dense_cost) * share))

    def penalty(self, net: GatedNetwork, step: int) -> torch.Tensor:
        p = self.p
        counts = net.keep_counts()
        target = self.scheduled_target(net, int(net.steps_done) + 1)
        # The cost models live on the CPU; autograd carries the gradient back to the gates' device.
        cost = self.budget.soft(counts.cpu())
        self.settling = int(net.steps_done) + 1 > self.anneal_steps
        self.last_cost, self.last_target = float(cost.detach()), target
        # (ours) Once the target stops falling, the penalty is two-sided, so that gates closed on the way down
        # reopen and the configuration settles at the target rather than below it.
        gap = cost / target - 1.0
        violation = gap.abs() if self.settling and p.two_sided else torch.relu(gap)
        term = (float(net.penalty_weight) * violation).float().to(counts.device)
        if p.range_weight > 0:
            # On the gate networks only: the filters learn from the task and the budget, not from the window.
            term = term + p.range_weight * range_term(net.scores(through_filters=False))
        return term

    def after_step(self, net: GatedNetwork, step: int) -> None:
        # Raise lambda while this step's gates cost more than the (scheduled) target, lower it when under; while
        # settling, raise it while the cost is off the target by more than the settling tolerance.
        p = self.p
        gap = self.last_cost / self.last_target - 1.0
        missed = abs(gap) > p.settle_tolerance if self.settling and p.two_sided else gap > 0
        factor = 1.0 + p.lambda_rate if missed else 1.0 / (1.0 + p.lambda_rate)
        value = min(max(float(net.penalty_weight) * factor, p.lambda_min), p.lambda_max)
        net.penalty_weight.fill_(value)
        net.steps_done += 1
        self.history["cost"].append(self.last_cost)
        self.history["penalty_weight"].append(value)
        if step in self.check_steps and self.probe is not None:
            self.check_latency(net, step)

    def check_latency(self, net: GatedNetwork, step: int) -> None:
        masks = [g.detach().cpu() > 0 for g in net.current]
        with net.bare() as bare:
            predicted, measured, correction = self.probe.read(bare, masks)
        net.latency_correction.fill_(correction)
        self.history["latency_checks"].append({"step": step, "keep_counts": [int(m.sum()) for m in masks],
                                               "predicted_ms": predicted, "measured_ms": measured})

    def cost_now(self) -> float | None:
        """The last step's soft cost (None before the first)."""
        return None if self.last_cost != self.last_cost else self.last_cost


class ProgressWithCost:
    """The method's progress callback with the gates' current cost added to every event."""

    def __init__(self, progress, schedule: WGatesSchedule):  # noqa: ANN001 - Callable[[dict], None] | None
        self.progress, self.schedule = progress, schedule

    def __call__(self, event: dict) -> None:
        if self.progress is not None:
            self.progress({**event, "cost": self.schedule.cost_now()})


def run(ctx: MethodContext) -> Selection:
    """Train weight-dependent gates and the weights against task loss + lambda * max(0, cost/target - 1)."""
    p, model, budget = ctx.params, ctx.model, ctx.budget
    latency = budget.latency if budget.budget.kind == "latency_ms" else None
    probe = LatencyProbe(latency, budget, ctx.graph) if latency is not None else None
    residual = [is_residual(model, g) for g in ctx.graph.groups]
    floors, floor_info = plan_floors(ctx, residual, probe)
    gated = GatedNetwork(model, ctx.graph, p.hidden, p.init_score, p.lambda_init, p.norm_weight, floors)
    # A small dataset gives the gates few steps per epoch; they need steps, not passes, to reach the target.
    loader = gate_loader(ctx.train_loader, ctx.epochs, p.min_gate_steps, ctx.seed)
    total_steps = ctx.epochs * len(loader)
    anneal_steps = max(1, int(p.anneal_share * total_steps))
    checks = latency_check_steps(anneal_steps, total_steps, p.latency_checks if probe is not None else 0)
    schedule = WGatesSchedule(p, budget, anneal_steps, checks, probe)
    param_groups = [{"params": list(model.parameters()), "lr": ctx.lr}, *gated.gate_param_groups(p.gate_lr)]
    try:
        result = train(gated, loader, ctx.epochs, lr=ctx.lr, device=ctx.device,
                       progress=ProgressWithCost(ctx.progress, schedule), should_cancel=ctx.should_cancel,
                       checkpoint_dir=ctx.checkpoint_dir, stage="wgates", seed=ctx.seed, params=param_groups,
                       regularizer=schedule)
        with torch.no_grad():
            scores = [s.detach().float().cpu() for s in gated.scores()]
    finally:
        gated.remove()
    masks = final_masks(scores, floors)
    counts = [int(m.sum()) for m in masks]
    history = schedule.history
    info = {"gate_keep_counts": counts, "floors": floors, **floor_info, "gate_cost": budget.hard(counts),
            "target": budget.target, "penalty_weight": float(gated.penalty_weight), "steps": result.steps,
            "cost_trace": history["cost"][:: max(1, len(history["cost"]) // 50)],
            "latency_checks": history["latency_checks"], "latency_correction": float(gated.latency_correction)}
    # Gate scores share one threshold (0) across groups: the finisher ranks them as they are.
    return Selection(model, masks, finisher_scores(scores, floors), score_scale="global",
                     round_to=device_multiple(ctx), info=info)
