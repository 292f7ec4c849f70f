"""W-Gates (Li et al., ECCV-W 2020): binary channel gates computed from the filters' own weights, trained
against a differentiable cost (the device's LPNet latency, or MACs/params) with an adaptive penalty weight.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import DataLoader

from pruning.data import shuffled_loader
from pruning.finisher import DeviceMeter
from pruning.groups import ChannelGraph, ChannelGroup
from pruning.methods.api import MethodContext, Selection
from pruning.train import distillation_loss, train

# Where the finisher ranks the channels within a floor: far above any score the range term lets a gate reach.
FLOOR_RANK = 100.0
# Smallest batch the gates train on when a short schedule asks for more steps: BatchNorm's batch statistics
# get too noisy below it.
MIN_GATE_BATCH = 16


def binary_gate(scores: torch.Tensor) -> torch.Tensor:
    """1[s >= 0] in the forward pass; straight-through gradient dg/ds = 1[|s| <= 1]."""
    hard = (scores >= 0).to(scores.dtype)
    window = (scores.detach().abs() <= 1).to(scores.dtype)
    passed = scores * window
    # (passed - passed.detach()) is exactly 0 in value, so the forward gate is exactly 0 or 1.
    return hard + (passed - passed.detach())


def floor_count(size: int, min_keep: float) -> int:
    """Channels of a group that stay open whatever their scores: at least one, at least `min_keep` of them."""
    return min(size, max(1, math.ceil(min_keep * size - 1e-9)))


def group_floors(sizes: Sequence[int], residual: Sequence[bool], min_keep: float,
                 residual_min_keep: float) -> list[int]:
    """floor_count of every group, at min_keep (inner groups) or residual_min_keep (residual streams)."""
    return [floor_count(size, residual_min_keep if res else min_keep)
            for size, res in zip(sizes, residual, strict=True)]


def lowered_shares(min_keep: float, residual_min_keep: float, residual_first: bool = False,
                   steps: int = 256, residual_ratio: float | None = None) -> Iterator[tuple[float, float]]:
    """(inner share, residual share) of the floors from the given ones down to (0, 0): the residual share first
    falls to `residual_ratio` x the inner one (else 1 with `residual_first`) while the inner share stays, then
    both fall by one common factor (from the start with neither)."""
    ratio = residual_ratio if residual_ratio is not None else (1.0 if residual_first else None)
    start = residual_min_keep if ratio is None else min(residual_min_keep, max(ratio, 0.0) * min_keep)
    if start != residual_min_keep:
        for step in range(steps, 0, -1):
            yield min_keep, start + (residual_min_keep - start) * step / steps
    for step in range(steps, -1, -1):
        yield min_keep * step / steps, start * step / steps


def budget_floors(sizes: Sequence[int], residual: Sequence[bool], min_keep: float, residual_min_keep: float,
                  cost: Callable[[list[int]], float], limit: float,
                  residual_first: bool = False, residual_ratio: float | None = None,
                  ) -> tuple[list[int], tuple[float, float]]:
    """(floors, (inner share, residual share)): group_floors at the first shares of lowered_shares whose floors
    cost at most `limit` (one channel per group, shares 0, if none do)."""
    # A scan from the top, not a bisection: LPNet is not monotone in the channel counts (off-grid counts can
    # predict slower than larger ones), and a bisection took resnet56 floors 0.1% over a budget down to 0.75.
    seen: dict[tuple[int, ...], bool] = {}
    for inner, stream in lowered_shares(min_keep, residual_min_keep, residual_first, residual_ratio=residual_ratio):
        floors = group_floors(sizes, residual, inner, stream)
        key = tuple(floors)
        if key not in seen:
            seen[key] = cost(floors) <= limit
        if seen[key]:
            return floors, (inner, stream)
    return floors, (0.0, 0.0)


def first_channels(sizes: Sequence[int], counts: Sequence[int]) -> list[torch.Tensor]:
    """Masks keeping the first `counts[g]` channels of every group (for timing, where only the counts matter)."""
    return [torch.arange(size) < count for size, count in zip(sizes, counts, strict=True)]


def held_open(scores: torch.Tensor, floor: int) -> torch.Tensor:
    """Channels below the threshold that the floor keeps open: the best-scoring ones, up to `floor` open."""
    held = torch.zeros_like(scores, dtype=torch.bool)
    held[torch.topk(scores.detach(), max(1, floor)).indices] = True
    return held & (scores.detach() < 0)


def floored_gate(scores: torch.Tensor, floor: int = 1) -> torch.Tensor:
    """binary_gate, with the best-scoring `floor` channels held open (the straight-through gradient still flows)."""
    return binary_gate(scores) + held_open(scores, floor).to(scores.dtype)


def is_residual(model: nn.Module, group: ChannelGroup) -> bool:
    """Whether several layers produce the group's channels (a residual stream summed by skip connections)."""
    return len(producer_layers(model, group)) > 1


def producer_layers(model: nn.Module, group: ChannelGroup) -> list[nn.Module]:
    """The layers whose output filters are exactly the group's channels (the root and its residual partners)."""
    return [model.get_submodule(s.layer) for s in group.out_layers if s.channels == group.size]


def filter_vectors(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """vec(W_i) of every channel i of the group [size, d]: each producer's filters over its weights' RMS, joined."""
    parts = []
    for layer in producer_layers(model, group):
        weight = layer.weight.flatten(1)
        # Per-layer RMS (no gradient) makes the gate see the filters' shapes, not the layer's overall scale.
        parts.append(weight / weight.detach().pow(2).mean().sqrt().clamp_min(1e-8))
    return torch.cat(parts, dim=1)


class FilterGate(nn.Module):
    """h_g: a small MLP shared by a group's filters, vec(W_i) -> gate score s_i, plus a learnable L1-norm skip.

    The skip term (ours) adds norm_weight * (|W_i|_1 / mean_j |W_j|_1 - 1), so that before the MLP has learned
    anything the gates close in L1 order rather than in a random one.
    """

    def __init__(self, in_features: int, hidden: int = 32, init_score: float = 0.5, norm_weight: float = 1.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        # Every gate starts open and inside the straight-through window, so all of them learn from step one.
        nn.init.normal_(self.net[2].weight, std=0.1 / hidden ** 0.5)
        nn.init.constant_(self.net[2].bias, init_score)
        self.norm_weight = nn.Parameter(torch.tensor(float(norm_weight)))

    def forward(self, filters: torch.Tensor) -> torch.Tensor:
        norms = filters.abs().mean(1)
        relative = norms / norms.mean().clamp_min(1e-8)
        return self.net(filters).squeeze(1) + self.norm_weight * (relative - 1.0)


class GatedNetwork(nn.Module):
    """The model with every group's channels multiplied by its live weight-dependent gates (after the BN)."""

    def __init__(self, model: nn.Module, graph: ChannelGraph, hidden: int = 32, init_score: float = 0.5,
                 lambda_init: float = 1.0, norm_weight: float = 1.0, floors: Sequence[int] | None = None):
        super().__init__()
        self.model = model
        self.floors = list(floors) if floors is not None else [1] * len(graph.groups)
        self.groups = list(graph.groups)
        self.gates = nn.ModuleList(
            FilterGate(filter_vectors(model, g).shape[1], hidden, init_score, norm_weight) for g in self.groups)
        # Buffers, so that training checkpoints carry the adaptive penalty weight and the schedule's position.
        self.register_buffer("penalty_weight", torch.tensor(float(lambda_init)))
        self.register_buffer("steps_done", torch.tensor(0, dtype=torch.long))
        # Measured / predicted latency of the gates' configuration at the last on-device check (1: none yet).
        self.register_buffer("latency_correction", torch.tensor(1.0))
        self.current: list[torch.Tensor] = []
        self.last_scores: list[torch.Tensor] = []
        # The last forward pass's inputs and outputs, for losses that compare it with another network.
        self.last_inputs: torch.Tensor | None = None
        self.last_outputs: torch.Tensor | None = None
        self._handles: list = []
        self.attach()

    def attach(self) -> None:
        """Hook the gates onto every group's scale layers."""
        for index, group in enumerate(self.groups):
            for name in group.scale_layers:
                layer = self.model.get_submodule(name)
                self._handles.append(layer.register_forward_hook(self._gate_hook(index)))

    def detach(self) -> None:
        """Remove the gates' hooks (the bare model computes as if every gate were open)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def bare(self) -> Iterator[nn.Module]:
        """The model without its gate hooks for a moment (to copy or export it)."""
        self.detach()
        try:
            yield self.model
        finally:
            self.attach()

    def _gate_hook(self, index: int) -> Callable:
        def hook(_module, _inputs, output):
            gate = self.current[index]
            return output * gate.to(output.dtype).view([1, -1] + [1] * (output.dim() - 2))
        return hook

    def scores(self, through_filters: bool = True) -> list[torch.Tensor]:
        """Gate score s of every channel of every group (differentiable in the gates, and in the filters unless
        `through_filters` is false)."""
        vectors = (filter_vectors(self.model, group) for group in self.groups)
        return [gate(v if through_filters else v.detach()) for gate, v in zip(self.gates, vectors, strict=True)]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.last_scores = self.scores()
        self.current = [floored_gate(s, f) for s, f in zip(self.last_scores, self.floors, strict=True)]
        self.last_inputs = inputs
        self.last_outputs = self.model(inputs)
        return self.last_outputs

    def keep_counts(self, scores: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Soft keep count of every group: the sums of the gates of the last forward pass (straight-through), or
        of the floored gates of `scores` (such as scores(through_filters=False), to stop at the gate networks)."""
        if scores is None:
            return torch.stack([g.sum() for g in self.current])
        return torch.stack([floored_gate(s, f).sum() for s, f in zip(scores, self.floors, strict=True)])

    def gate_parameters(self) -> list[nn.Parameter]:
        return list(self.gates.parameters())

    def gate_param_groups(self, lr: float, by_width: bool = False) -> list[dict]:
        """SGD parameter groups of the gate networks (no momentum, no weight decay) at `lr`, or with `by_width`
        one per group at lr x mean group width / its width."""
        # No momentum: when the cost falls under the target, the gates' push stops at once.
        settings = {"weight_decay": 0.0, "momentum": 0.0}
        if not by_width:
            return [{"params": self.gate_parameters(), "lr": lr, **settings}]
        # A group's channels share one gate network, so its parameters take the sum of their channels'
        # gradients: at the same push per channel, a 64-wide group's gates would move four times as far as a
        # 16-wide group's.
        mean_width = sum(g.size for g in self.groups) / len(self.groups)
        return [{"params": list(gate.parameters()), "lr": lr * mean_width / group.size, **settings}
                for gate, group in zip(self.gates, self.groups, strict=True)]

    def remove(self) -> nn.Module:
        """Detach the gates' hooks and return the bare model (the gate modules are discarded)."""
        self.detach()
        self.current = []
        self.last_scores = []
        self.last_inputs = self.last_outputs = None
        return self.model


def final_masks(scores: Sequence[torch.Tensor], floors: Sequence[int]) -> list[torch.Tensor]:
    """Open gates (s >= 0) of every group, with its best `floors[g]` channels always kept."""
    return [floored_gate(s.detach(), f) > 0 for s, f in zip(scores, floors, strict=True)]


def finisher_scores(scores: Sequence[torch.Tensor], floors: Sequence[int]) -> list[torch.Tensor]:
    """Gate scores for the finisher's global ranking; each group's best `floors[g]` channels rank above all
    others, so the finisher goes below a group's floor only when nothing else is left, and then in proportion
    to the floors (the k-th best of a floor of f ranks at FLOOR_RANK + (f - k) / f)."""
    # Ranked by their own gate scores, the floors' channels went residual streams first: the budget pushes
    # hardest on the gates of a residual channel, which costs several layers. One resnet56 at 40% lost its
    # stage-3 stream from 40 to 17 channels that way (81% accuracy), while the floors, lowered by one common
    # factor to fit the budget, are meant to keep their shape.
    out = []
    for s, f in zip(scores, floors, strict=True):
        s = s.detach().float()
        keep = max(1, min(f, s.numel()))
        best = torch.topk(s, keep).indices
        ranked = s.clone()
        ranked[best] = FLOOR_RANK + (keep - torch.arange(keep, dtype=s.dtype)) / keep
        out.append(ranked)
    return out


def range_term(scores: Sequence[torch.Tensor], per_channel_mean: bool = True) -> torch.Tensor:
    """How far gate scores lie outside the straight-through window [-1, 1]: per group, the mean (or the sum) of
    max(0, |s| - 1) over its channels; summed over the groups."""
    # (ours) Scores outside the window get no gradient and could never change side again; pulling them back
    # keeps every gate revisable when the trade-off shifts. Linear, not squared, so the pull per channel is
    # bounded. A group's channels share one gate network, so a summed term pulls on it in proportion to the
    # group's width: on resnet56 (residual groups of 64 channels, each scored from ~5000 filter weights) the
    # loss reached 1e12 within 20 gate steps with the summed term and overflowed; with the mean it stayed under 6
    # (docs/methods.md).
    reduce = torch.mean if per_channel_mean else torch.sum
    return torch.stack([reduce(torch.relu(s.abs() - 1.0)) for s in scores]).sum()


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
    spec = getattr(ctx.budget.latency, "spec", None)
    return int(getattr(spec, "channel_multiple", 1) or 1)


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


def run(ctx: MethodContext) -> Selection:
    """Train weight-dependent gates and the weights against task loss + lambda * max(0, cost/target - 1)."""
    p = ctx.params
    model = ctx.model
    budget = ctx.budget
    latency = budget.latency if budget.budget.kind == "latency_ms" else None
    meters: list[DeviceMeter] = []

    def measure_on_device(bare: nn.Module, masks: Sequence[torch.Tensor]) -> tuple[float, float, float]:
        # (predicted ms, measured ms, measured / predicted) of `bare` materialized with `masks`.
        if not meters:
            meters.append(DeviceMeter(latency, bare, ctx.graph.input_shape))
        predicted = budget.hard([int(m.sum()) for m in masks])
        measured = meters[0].measure_masks(bare, ctx.graph, masks)["ms"]
        return predicted, measured, max(measured / max(predicted, 1e-9), 1e-3)

    sizes = [g.size for g in ctx.graph.groups]
    residual = [is_residual(model, g) for g in ctx.graph.groups]
    floors = group_floors(sizes, residual, p.min_keep, p.residual_min_keep)
    floor_info: dict[str, float] = {"floor_min_keep": p.min_keep, "floor_residual_min_keep": p.residual_min_keep}
    if p.floor_share > 0:
        # (ours) Floors that cost more than the budget pin every gate at its floor, and the finisher, not the
        # gates, then decides what goes (docs/methods.md, wgates item 8); lowered until they fit, they
        # let the gates reach the budget themselves.
        floor_cost = budget.hard
        if latency is not None:
            # LPNet's error near a tight budget can exceed the room the share leaves (on one CPU a wgates
            # configuration predicted at 0.616 ms measured 0.525 ms), so the floors are measured once and the
            # predictions scaled by measured / predicted.
            predicted, measured, bias = measure_on_device(model, first_channels(sizes, floors))
            floor_info.update(floor_predicted=predicted, floor_measured=measured)

            def floor_cost(counts: list[int]) -> float:
                return budget.hard(counts) * bias

        # Within the tolerance the device's timings cannot tell the floors from the budget (on a noisy CPU,
        # resnet20 floors measured 3.6% over one seed's budget and under another's), and lowering them there
        # cost accuracy for nothing: the finisher trims them if they do measure over.
        if floor_cost(floors) > (1 + p.floor_tolerance) * budget.target:
            floors, shares = budget_floors(sizes, residual, p.min_keep, p.residual_min_keep, floor_cost,
                                           p.floor_share * budget.target, p.floor_lowering == "residual_first",
                                           p.floor_residual_ratio)
            floor_info.update(floor_min_keep=shares[0], floor_residual_min_keep=shares[1])
    teacher = None
    if p.distill_weight > 0:
        # (ours) A converged dense model fits its training set, so cross-entropy barely moves when a gate
        # closes and the budget's gradient alone picks the channels (docs/methods.md, wgates item 5); the
        # distance to the dense model's softened outputs still tells which channels its function needs.
        teacher = copy.deepcopy(model).to(ctx.device).eval().requires_grad_(False)
    gated = GatedNetwork(model, ctx.graph, p.hidden, p.init_score, p.lambda_init, p.norm_weight, floors)
    dense_cost = budget.dense()
    # A small dataset gives the gates few steps per epoch; they need steps, not passes, to reach the target.
    loader = gate_loader(ctx.train_loader, ctx.epochs, p.min_gate_steps, ctx.seed)
    total_steps = ctx.epochs * len(loader)
    anneal_steps = max(1, int(p.anneal_share * total_steps))
    check_steps = latency_check_steps(anneal_steps, total_steps, p.latency_checks if latency is not None else 0)
    history: dict[str, list] = {"cost": [], "penalty_weight": [], "latency_checks": []}
    last: dict[str, float] = {"cost": float("nan"), "target": budget.target, "settling": 0.0}

    def final_target(net: GatedNetwork) -> float:
        # On-device checks scale the predicted-cost target by predicted/measured: the gates absorb LPNet's bias.
        return budget.target * (1.0 - p.target_margin) / float(net.latency_correction)

    def scheduled_target(net: GatedNetwork, step: int) -> float:
        # The target falls linearly from the dense cost, so gates close gradually while the task loss ranks them.
        share = min(1.0, step / anneal_steps)
        end = final_target(net)
        return min(dense_cost, max(end, dense_cost + (end - dense_cost) * share))

    def penalty(net: GatedNetwork) -> torch.Tensor:
        # Scores with the filters' gradient cut, computed once for the budget and the range terms that use them
        # (the filters have not changed since the forward pass, so their values are the forward pass's).
        use_range = p.range_weight > 0
        gate_only = (net.scores(through_filters=False)
                     if not p.cost_to_filters or (use_range and not p.range_to_filters) else None)
        counts = net.keep_counts() if p.cost_to_filters else net.keep_counts(gate_only)
        target = scheduled_target(net, int(net.steps_done) + 1)
        # The cost models live on the CPU; autograd carries the gradient back to the gates' device.
        cost = budget.soft(counts.cpu())
        settling = int(net.steps_done) + 1 > anneal_steps
        last.update(cost=float(cost.detach()), target=target, settling=float(settling))
        # (ours) Once the target stops falling, the penalty is two-sided, so that gates closed on the way
        # down reopen and the configuration settles at the target rather than below it.
        gap = cost / target - 1.0
        violation = gap.abs() if settling and p.two_sided else torch.relu(gap)
        term = (float(net.penalty_weight) * violation).float().to(counts.device)
        if use_range:
            scores = net.last_scores if p.range_to_filters else gate_only
            term = term + p.range_weight * range_term(scores, p.range_mean)
        if teacher is not None:
            with torch.no_grad():
                teacher_outputs = teacher(net.last_inputs)
            term = term + p.distill_weight * distillation_loss(net.last_outputs, teacher_outputs,
                                                               p.distill_temperature)
        return term

    def check_latency(net: GatedNetwork, step: int) -> None:
        masks = [g.detach().cpu() > 0 for g in net.current]
        with net.bare() as bare:
            predicted, measured, correction = measure_on_device(bare, masks)
        net.latency_correction.fill_(correction)
        history["latency_checks"].append({"step": step, "keep_counts": [int(m.sum()) for m in masks],
                                          "predicted_ms": predicted, "measured_ms": measured})

    def adapt(net: GatedNetwork, step: int) -> None:
        # Raise lambda while this step's gates cost more than the (scheduled) target, lower it when under;
        # while settling, raise it while the cost is off the target by more than the settling tolerance.
        gap = last["cost"] / last["target"] - 1.0
        missed = abs(gap) > p.settle_tolerance if last.get("settling") and p.two_sided else gap > 0
        factor = 1.0 + p.lambda_rate if missed else 1.0 / (1.0 + p.lambda_rate)
        value = min(max(float(net.penalty_weight) * factor, p.lambda_min), p.lambda_max)
        net.penalty_weight.fill_(value)
        net.steps_done += 1
        history["cost"].append(last["cost"])
        history["penalty_weight"].append(value)
        if step in check_steps:
            check_latency(net, step)

    def progress(event: dict) -> None:
        if ctx.progress is not None:
            ctx.progress({**event, "cost": None if last["cost"] != last["cost"] else last["cost"]})

    model_params = list(model.parameters())
    weight_lr = ctx.lr
    if p.scale_weight_lr:
        # Four times the steps at a quarter of the batch would move the weights four times as far from the
        # trained ones at the job's learning rate; the gates keep theirs.
        weight_lr = ctx.lr * int(loader.batch_size) / int(ctx.train_loader.batch_size)
    param_groups = [{"params": model_params, "lr": weight_lr},
                    *gated.gate_param_groups(p.gate_lr, p.gate_lr_by_width)]
    try:
        result = train(gated, loader, ctx.epochs, lr=ctx.lr, device=ctx.device, progress=progress,
                       should_cancel=ctx.should_cancel, checkpoint_dir=ctx.checkpoint_dir, stage="wgates",
                       extra_loss=penalty, on_step=adapt, seed=ctx.seed, params=param_groups)
        with torch.no_grad():
            scores = [s.detach().float().cpu() for s in gated.scores()]
    finally:
        gated.remove()
    masks = final_masks(scores, floors)
    counts = [int(m.sum()) for m in masks]
    info = {
        "gate_keep_counts": counts,
        "floors": floors,
        **floor_info,
        "gate_cost": budget.hard(counts),
        "target": budget.target,
        "penalty_weight": float(gated.penalty_weight),
        "steps": result.steps,
        "cost_trace": history["cost"][:: max(1, len(history["cost"]) // 50)],
        "latency_checks": history["latency_checks"],
        "latency_correction": float(gated.latency_correction),
    }
    # Gate scores share one threshold (0) across groups: the finisher ranks them as they are.
    return Selection(model, masks, finisher_scores(scores, floors), score_scale="global",
                     round_to=device_multiple(ctx), info=info)
