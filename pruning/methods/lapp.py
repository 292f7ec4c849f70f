"""LAPP, Layer Adaptive Progressive Pruning (Zhai et al., 2023): learnable per-group thresholds on normalized
importance prune channels progressively while the network trains from scratch; 3x3 convs train with a 1x1
bypass that is folded exactly into the kernel centre at the end, so the result is the plain architecture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from pruning.allocation import largest_true, trim_masks
from pruning.budget import BudgetCost
from pruning.groups import ChannelGraph, ChannelGroup
from pruning.methods.api import MethodContext, NotApplicable, Selection
from pruning.methods.lapp_params import LappParams
from pruning.regularizer import Regularizer
from pruning.train import train

_BatchNorm = nn.modules.batchnorm._BatchNorm


# ---- bypasses ------------------------------------------------------------------------------------------------------

def bypass_plan(model: nn.Module, graph: ChannelGraph) -> tuple[dict[str, str], dict[str, str]]:
    """({3x3 conv: its BN} for the convs that take a bypass, {3x3 conv: why not} for those that cannot)."""
    planned, skipped = {}, {}
    for group in graph.groups:
        for share, scale in zip(group.out_layers, group.scale_layers, strict=True):
            conv = model.get_submodule(share.layer)
            if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (3, 3):
                continue
            reason = _unfoldable(conv, model.get_submodule(scale), scale != share.layer)
            if reason:
                skipped[share.layer] = reason
            else:
                planned[share.layer] = scale
    return planned, skipped


def _unfoldable(conv: nn.Conv2d, scale: nn.Module, has_norm: bool) -> str | None:
    # A 1x1 conv with the 3x3's stride and no padding reads exactly the centre tap's inputs when padding equals
    # dilation; a depthwise or grouped conv would need a grouped bypass to fold, which adds next to nothing.
    if conv.groups != 1:
        return "depthwise" if conv.groups == conv.in_channels else "grouped"
    if conv.padding != conv.dilation or conv.padding_mode != "zeros":
        return "padding is not the dilation"
    if not has_norm or not isinstance(scale, _BatchNorm) or not scale.affine or scale.running_var is None:
        return "not followed by an affine BN with running statistics"
    return None


class Bypass(nn.Module):
    """1x1 conv + BN in parallel with a 3x3 conv + BN: same stride, same output channels."""

    def __init__(self, conv: nn.Conv2d, norm: _BatchNorm):
        super().__init__()
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, 1, conv.stride, 0, bias=False)
        self.norm = nn.BatchNorm2d(conv.out_channels, eps=norm.eps, momentum=norm.momentum)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def _affine(norm: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with eval-mode norm(x) = a * x + b per channel, in float64."""
    a = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    return a, norm.bias.double() - a * norm.running_mean.double()


@torch.no_grad()
def fold_bypass(conv: nn.Conv2d, norm: _BatchNorm, bypass: Bypass) -> None:
    """Fold `bypass` into `conv` + `norm` in place so that eval-mode norm(conv(x)) equals the old
    norm(conv(x)) + bypass(x) (exact up to rounding).

    With a3, b3 and a1, b1 the eval-mode affine maps of the two BNs, the sum is a3*W3 x + a1*W1 x + b3 + b1; keeping
    the 3x3 BN's statistics and picking a new scale a (gamma = a * sqrt(var + eps)), the kernel becomes
    (a3*W3 + a1*W1 at the centre) / a and beta = b3 + b1 + a * mean. a = a3 keeps the trained kernel as it is;
    where the 3x3 path's scale is negligible next to the bypass's, a = a1 keeps the division well conditioned.
    """
    a3, b3 = _affine(norm)
    a1, b1 = _affine(bypass.norm)
    use_own = (a3.abs() >= 1e-3 * a1.abs()) & (a3 != 0)
    a = torch.where(use_own, a3, torch.where(a1 != 0, a1, torch.ones_like(a1)))
    weight = conv.weight.double() * a3.view(-1, 1, 1, 1)
    centre = tuple(k // 2 for k in conv.kernel_size)
    weight[:, :, centre[0], centre[1]] += bypass.conv.weight.double()[:, :, 0, 0] * a1.view(-1, 1)
    conv.weight.copy_(weight / a.view(-1, 1, 1, 1))
    scale = torch.sqrt(norm.running_var.double() + norm.eps)
    norm.bias.copy_(b3 + b1 + a * norm.running_mean.double())
    norm.weight.copy_(a * scale)


# ---- the pruned network ------------------------------------------------------------------------------------------

class _SaveInput:
    """Forward pre-hook on a bypassed conv: keeps its input for the bypass, which runs at the conv's BN."""

    def __init__(self, net: LappNetwork, conv_name: str):
        self.net, self.conv_name = net, conv_name

    def __call__(self, _module: nn.Module, inputs: tuple) -> None:
        self.net.bypass_inputs[self.conv_name] = inputs[0]


class _MaskOutput:
    """Forward hook on a group's scale layer: adds the bypass (if any), then multiplies by the group's mask."""

    def __init__(self, net: LappNetwork, group_index: int, conv_name: str | None):
        self.net, self.group_index, self.conv_name = net, group_index, conv_name

    def __call__(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.conv_name is not None:
            bypass = self.net.bypasses[_key(self.conv_name)]
            output = output + bypass(self.net.bypass_inputs.pop(self.conv_name))
        mask = self.net.current[self.group_index].to(output.dtype)
        return output * mask.view([1, -1] + [1] * (output.dim() - 2))


def _key(name: str) -> str:
    return name.replace(".", "__")


class LappNetwork(nn.Module):
    """The model with its bypasses, a learnable threshold per group, and masks that the schedule's monotone
    `alive` state decides (hooks on the model's own modules, so its names and shapes stay as they are)."""

    def __init__(self, model: nn.Module, graph: ChannelGraph, plan: dict[str, str], threshold_init: float,
                 slope: float):
        super().__init__()
        self.net, self.graph, self.slope = model, graph, slope
        self.bypasses = nn.ModuleDict({_key(conv): Bypass(model.get_submodule(conv), model.get_submodule(norm))
                                       for conv, norm in plan.items()})
        self.thresholds = nn.Parameter(torch.full((len(graph.groups),), float(threshold_init)))
        self.bypass_of_norm = {norm: conv for conv, norm in plan.items()}
        self.bypass_inputs: dict[str, torch.Tensor] = {}
        self.current: list[torch.Tensor] = []
        self.soft_counts = torch.zeros(len(graph.groups))
        self.schedule: LappSchedule | None = None
        self.handles = []
        for g, group in enumerate(graph.groups):
            for name in group.scale_layers:
                conv = self.bypass_of_norm.get(name)
                if conv is not None:
                    self.handles.append(model.get_submodule(conv).register_forward_pre_hook(_SaveInput(self, conv)))
                hook = _MaskOutput(self, g, conv)
                self.handles.append(model.get_submodule(name).register_forward_hook(hook))

    def importance(self, group: ChannelGroup) -> torch.Tensor:
        """Normalized importance s of a group's channels: mean |BN gamma| over its scale layers (plus the bypass
        BN's where there is one) divided by its mean; filter L1 where no BN scales the group."""
        parts = []
        for name in group.scale_layers:
            layer = self.net.get_submodule(name)
            if isinstance(layer, _BatchNorm) and layer.affine and layer.weight.numel() == group.size:
                value = layer.weight.abs()
                if name in self.bypass_of_norm:
                    value = value + self.bypasses[_key(self.bypass_of_norm[name])].norm.weight.abs()
                parts.append(value)
        if not parts:
            parts = [self.net.get_submodule(s.layer).weight.abs().flatten(1).sum(1)
                     for s in group.out_layers if s.channels == group.size]
        raw = torch.stack(parts).mean(0).float()
        # The mean is detached: s is a ranking within the group, its scale is the threshold's business.
        return raw / raw.detach().mean().clamp_min(1e-12)

    def scores(self) -> list[torch.Tensor]:
        return [self.importance(group) for group in self.graph.groups]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alive = self.schedule.group_alive()
        if self.schedule.searching:
            masks = []
            for g, s in enumerate(self.scores()):
                keep = alive[g].to(s.device, s.dtype)
                # The value is the monotone mask itself (the schedule keeps alive within 1[s > t] and the floor);
                # the sigmoid's derivative carries the gradient to s and t.
                soft = torch.sigmoid(self.slope * (s - self.thresholds[g]))
                masks.append(keep + keep * (soft - soft.detach()))
        else:
            masks = [a.to(x.device, torch.float32) for a in alive]
        self.current = masks
        self.soft_counts = torch.stack([m.sum() for m in masks])
        return self.net(x)

    def remove(self) -> None:
        """Take the hooks off: the model is the bare network again (its bypasses not folded yet)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.bypass_inputs.clear()

    def fold(self) -> None:
        """Fold every bypass into its 3x3 conv and BN (call after remove())."""
        for conv, norm in {c: n for n, c in self.bypass_of_norm.items()}.items():
            fold_bypass(self.net.get_submodule(conv), self.net.get_submodule(norm), self.bypasses[_key(conv)])


# ---- the schedule ------------------------------------------------------------------------------------------------

def floor_counts(sizes: Sequence[int], min_keep: float) -> list[int]:
    """Channels per group the thresholds never prune: min_keep of the group, at least one."""
    return [max(1, math.ceil(min_keep * size)) for size in sizes]


def margins(scores: Sequence[torch.Tensor], thresholds: torch.Tensor, alive: Sequence[torch.Tensor],
            ) -> list[torch.Tensor]:
    """Finisher scores on one scale: s - t (how far above its group's threshold), every pruned channel below
    every live one, so the finisher trims the closest to their threshold first and grows back the best pruned."""
    raw = [s.detach().float().cpu() - float(t) for s, t in zip(scores, thresholds.detach().cpu(), strict=True)]
    values = torch.cat(raw)
    drop = float(values.max() - values.min()) + 1.0
    return [torch.where(a, r, r - drop) for r, a in zip(raw, alive, strict=True)]


def counts_after(counts: Sequence[int], deaths: Sequence[tuple[float, int, int]]) -> list[int]:
    """Keep counts once the (margin, group, channel) `deaths` are pruned."""
    out = list(counts)
    for _, g, _ in deaths:
        out[g] -= 1
    return out


class LappSchedule(Regularizer):
    """The budget penalty mu * max(0, cost/target - 1)^2 on the soft keep counts, with the target falling from
    the dense cost to the budget over the pruning steps, and the monotone masks: after every pruning step a live
    channel dies when its importance is under its group's threshold (unless it is among the group's floor; the
    lowest margins first, and no more once the hard cost reaches the step's target), and never comes back. `alive`
    (one flat bool tensor), the step count and the history are checkpointed."""

    state_fields = ("alive", "steps_done", "history")

    def __init__(self, params: LappParams, budget: BudgetCost, sizes: Sequence[int], prune_steps: int):
        self.p, self.budget, self.sizes, self.prune_steps = params, budget, list(sizes), prune_steps
        self.floors = floor_counts(sizes, params.min_keep)
        self.dense_cost = budget.dense()
        self.alive = torch.ones(sum(sizes), dtype=torch.bool)
        self.steps_done = 0
        self.history: dict[str, list] = {"cost": [], "kept": [], "settle_trimmed": []}
        self.last_cost = float("nan")

    @property
    def searching(self) -> bool:
        """Whether the thresholds still prune (the first prune_steps steps)."""
        return self.steps_done < self.prune_steps

    def group_alive(self) -> list[torch.Tensor]:
        return list(torch.split(self.alive, self.sizes))

    def target_at(self, step: int) -> float:
        # Progressive: the target falls linearly, so channels go a few at a time while the weights adapt.
        share = min(1.0, step / self.prune_steps)
        return self.dense_cost + (self.budget.target - self.dense_cost) * share

    def penalty(self, net: LappNetwork, step: int) -> torch.Tensor | None:
        if not self.searching:
            return None
        counts = net.soft_counts
        # The cost models live on the CPU; autograd carries the gradient back to the thresholds' device.
        cost = self.budget.soft(counts.cpu())
        self.last_cost = float(cost.detach())
        gap = torch.relu(cost / self.target_at(self.steps_done + 1) - 1.0)
        return (self.p.mu * gap ** 2).float().to(counts.device)

    @torch.no_grad()
    def prune(self, net: LappNetwork) -> None:
        """Kill the live channels whose importance is under their group's threshold (floors excepted), lowest
        margin first, while the hard cost is still above this step's scheduled target."""
        alive = self.group_alive()
        candidates = []
        for g, s in enumerate(net.scores()):
            s, t = s.detach().float().cpu(), float(net.thresholds[g])
            under = alive[g] & (s <= t)
            floor = torch.topk(torch.where(alive[g], s, torch.full_like(s, -math.inf)), self.floors[g]).indices
            under[floor] = False
            values = s.tolist()
            candidates += [(values[c] - t, g, c) for c in torch.nonzero(under).flatten().tolist()]
        candidates.sort()
        counts = [int(a.sum()) for a in alive]
        target = self.target_at(self.steps_done + 1)
        # (ours) From scratch every gamma starts at 1, so a threshold crossing its group's tied importances would
        # take the whole group at once; capping each step's deaths at the falling target keeps pruning gradual.
        k = largest_true(len(candidates), lambda k: k == 0 or self.budget.hard(
            counts_after(counts, candidates[:k - 1])) > target)
        for _, g, c in candidates[:k]:
            alive[g][c] = False
        self.alive.copy_(torch.cat(alive))

    @torch.no_grad()
    def settle(self, net: LappNetwork) -> None:
        """Prune the live channels closest to their threshold until the hard cost fits the budget."""
        alive = self.group_alive()
        masks, trimmed = trim_masks(margins(net.scores(), net.thresholds, alive), alive, self.budget.fits,
                                    normalize=False)
        self.alive.copy_(torch.cat(masks))
        self.history["settle_trimmed"].append(trimmed)

    def after_step(self, net: LappNetwork, step: int) -> None:
        if not self.searching:
            return
        self.prune(net)
        self.steps_done += 1
        self.history["cost"].append(self.last_cost)
        self.history["kept"].append(int(self.alive.sum()))
        if not self.searching and self.p.settle:
            self.settle(net)


class ProgressWithCost:
    """The method's progress callback with the soft cost of the last pruning step added to every event."""

    def __init__(self, progress, schedule: LappSchedule):  # noqa: ANN001 - Callable[[dict], None] | None
        self.progress, self.schedule = progress, schedule

    def __call__(self, event: dict) -> None:
        if self.progress is not None:
            cost = self.schedule.last_cost
            self.progress({**event, "cost": None if cost != cost else cost,
                           "searching": self.schedule.searching})


# ---- the method ----------------------------------------------------------------------------------------------------

def check(model: nn.Module, graph: ChannelGraph, params: LappParams) -> None:
    """LAPP needs at least one prunable group; a model without foldable 3x3 convs trains without bypasses."""
    if not graph.groups:
        raise NotApplicable(f"lapp: {type(model).__name__} has no prunable channel group")


def prune_steps_of(total_steps: int, share: float) -> int:
    """Steps of the pruning phase (E_p): `share` of the run, at least one."""
    return max(1, min(total_steps, round(share * total_steps))) if total_steps else 0


def run(ctx: MethodContext) -> Selection:
    """Train from the given weights for ctx.epochs while the thresholds prune; fold the bypasses; select."""
    p, model = ctx.params, ctx.model
    plan, skipped = bypass_plan(model, ctx.graph) if p.bypass else ({}, {})
    net = LappNetwork(model, ctx.graph, plan, p.threshold_init, p.surrogate_slope)
    total_steps = ctx.epochs * len(ctx.train_loader)
    schedule = LappSchedule(p, ctx.budget, ctx.graph.sizes, prune_steps_of(total_steps, p.prune_share))
    net.schedule = schedule
    if schedule.searching:
        schedule.prune(net)  # channels already under threshold_init start pruned (a resume overwrites this)
    weights = [q for name, q in net.named_parameters() if name != "thresholds"]
    param_groups = [{"params": weights}, {"params": [net.thresholds], "lr": p.threshold_lr, "weight_decay": 0.0}]
    lr = p.train_lr if p.train_lr is not None else ctx.lr
    try:
        result = train(net, ctx.train_loader, ctx.epochs, lr=lr, device=ctx.device,
                       progress=ProgressWithCost(ctx.progress, schedule), should_cancel=ctx.should_cancel,
                       checkpoint_dir=ctx.checkpoint_dir, stage="lapp", seed=ctx.seed, params=param_groups,
                       regularizer=schedule)
    finally:
        net.remove()
    net.cpu().eval()
    alive = [a.clone() for a in schedule.group_alive()]
    with torch.no_grad():
        scores = margins(net.scores(), net.thresholds, alive)
        thresholds = [round(float(t), 4) for t in net.thresholds]
    net.fold()
    counts = [int(a.sum()) for a in alive]
    info = {"keep_counts": counts, "cost": ctx.budget.hard(counts), "target": ctx.budget.target,
            "prune_steps": schedule.prune_steps, "steps": result.steps, "thresholds": thresholds,
            "bypassed_convs": sorted(plan), "bypass_skipped": skipped,
            "settle_channels_removed": sum(schedule.history["settle_trimmed"]),
            "cost_trace": schedule.history["cost"][:: max(1, len(schedule.history["cost"]) // 50)]}
    # Margins over each group's own threshold share one scale: the finisher ranks them as they are.
    return Selection(model, alive, scores, score_scale="global", round_to=p.round_to, info=info)
