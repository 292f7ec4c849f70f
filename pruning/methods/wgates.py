"""W-Gates (Li et al., ECCV-W 2020): binary channel gates computed from the filters' own weights, trained
against a differentiable cost (the device's LPNet latency, or MACs/params) with an adaptive penalty weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from pruning.groups import ChannelGraph, ChannelGroup
from pruning.methods.context import MethodContext, MethodResult
from pruning.train import train


def binary_gate(scores: torch.Tensor) -> torch.Tensor:
    """1[s >= 0] in the forward pass; straight-through gradient dg/ds = 1[|s| <= 1]."""
    hard = (scores >= 0).to(scores.dtype)
    window = (scores.detach().abs() <= 1).to(scores.dtype)
    passed = scores * window
    return hard + passed - passed.detach()


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
                 lambda_init: float = 1.0, norm_weight: float = 1.0):
        super().__init__()
        self.model = model
        self.groups = list(graph.groups)
        self.gates = nn.ModuleList(
            FilterGate(filter_vectors(model, g).shape[1], hidden, init_score, norm_weight) for g in self.groups)
        # Buffers, so that training checkpoints carry the adaptive penalty weight and the schedule's position.
        self.register_buffer("penalty_weight", torch.tensor(float(lambda_init)))
        self.register_buffer("steps_done", torch.tensor(0, dtype=torch.long))
        self.current: list[torch.Tensor] = []
        self._handles = []
        for index, group in enumerate(self.groups):
            for name in group.scale_layers:
                self._handles.append(model.get_submodule(name).register_forward_hook(self._gate_hook(index)))

    def _gate_hook(self, index: int) -> Callable:
        def hook(_module, _inputs, output):
            gate = self.current[index]
            return output * gate.to(output.dtype).view([1, -1] + [1] * (output.dim() - 2))
        return hook

    def scores(self) -> list[torch.Tensor]:
        """Gate score s of every channel of every group (differentiable in the gates and the filters)."""
        return [gate(filter_vectors(self.model, group)) for gate, group in zip(self.gates, self.groups, strict=True)]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.current = [binary_gate(s) for s in self.scores()]
        return self.model(inputs)

    def keep_counts(self) -> torch.Tensor:
        """Soft keep count of every group: the sums of the gates of the last forward pass (straight-through)."""
        return torch.stack([g.sum() for g in self.current])

    def gate_parameters(self) -> list[nn.Parameter]:
        return list(self.gates.parameters())

    def remove(self) -> nn.Module:
        """Detach the gates' hooks and return the bare model (the gate modules are discarded)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.current = []
        return self.model


def final_masks(scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Open gates (s >= 0) of every group, keeping at least the best channel of a fully closed group."""
    masks = []
    for s in scores:
        mask = s >= 0
        if not bool(mask.any()):
            mask[int(torch.argmax(s))] = True
        masks.append(mask)
    return masks


def device_multiple(ctx: MethodContext) -> int:
    """The channel multiple the finisher may round to: params.round_to, else the latency device's preference."""
    if ctx.params.round_to > 1:
        return int(ctx.params.round_to)
    if not ctx.params.device_rounding:
        return 1
    spec = getattr(ctx.budget.latency, "spec", None)
    return int(getattr(spec, "channel_multiple", 1) or 1)


def run(ctx: MethodContext) -> MethodResult:
    """Train weight-dependent gates and the weights against task loss + lambda * max(0, cost/target - 1)."""
    p = ctx.params
    model = ctx.model
    gated = GatedNetwork(model, ctx.graph, p.hidden, p.init_score, p.lambda_init, p.norm_weight)
    budget = ctx.budget
    final_target = budget.target * (1.0 - p.target_margin)
    dense_cost = budget.dense()
    anneal_steps = max(1, int(p.anneal_share * ctx.epochs * len(ctx.train_loader)))
    history: dict[str, list[float]] = {"cost": [], "penalty_weight": []}
    last: dict[str, float] = {"cost": float("nan"), "target": final_target}

    def scheduled_target(step: int) -> float:
        # The target falls linearly from the dense cost, so gates close gradually while the task loss ranks them.
        share = min(1.0, step / anneal_steps)
        return max(final_target, dense_cost + (final_target - dense_cost) * share)

    def penalty(net: GatedNetwork) -> torch.Tensor:
        counts = net.keep_counts()
        target = scheduled_target(int(net.steps_done) + 1)
        # The cost models live on the CPU; autograd carries the gradient back to the gates' device.
        cost = budget.soft(counts.cpu())
        last.update(cost=float(cost.detach()), target=target)
        term = float(net.penalty_weight) * torch.relu(cost / target - 1.0)
        return term.float().to(counts.device)

    def adapt(net: GatedNetwork, _step: int) -> None:
        # Raise lambda while this step's gates cost more than the (scheduled) target, lower it when under.
        factor = 1.0 + p.lambda_rate if last["cost"] > last["target"] else 1.0 / (1.0 + p.lambda_rate)
        value = min(max(float(net.penalty_weight) * factor, p.lambda_min), p.lambda_max)
        net.penalty_weight.fill_(value)
        net.steps_done += 1
        history["cost"].append(last["cost"])
        history["penalty_weight"].append(value)

    def progress(event: dict) -> None:
        if ctx.progress is not None:
            ctx.progress({**event, "cost": None if last["cost"] != last["cost"] else last["cost"]})

    model_params = list(model.parameters())
    param_groups = [{"params": model_params},
                    # No momentum on the gates: when the cost falls under the target their push stops at once.
                    {"params": gated.gate_parameters(), "lr": p.gate_lr, "weight_decay": 0.0, "momentum": 0.0}]
    try:
        result = train(gated, ctx.train_loader, ctx.epochs, lr=ctx.lr, device=ctx.device, progress=progress,
                       should_cancel=ctx.should_cancel, checkpoint_dir=ctx.checkpoint_dir, stage="wgates",
                       extra_loss=penalty, on_step=adapt, seed=ctx.seed, params=param_groups)
        with torch.no_grad():
            scores = [s.detach().float().cpu() for s in gated.scores()]
    finally:
        gated.remove()
    masks = final_masks(scores)
    counts = [int(m.sum()) for m in masks]
    info = {
        "gate_keep_counts": counts,
        "gate_cost": budget.hard(counts),
        "target": budget.target,
        "penalty_weight": float(gated.penalty_weight),
        "steps": result.steps,
        "cost_trace": history["cost"][:: max(1, len(history["cost"]) // 50)],
        # Gate scores share one threshold (0) across groups: the finisher ranks them as they are.
        "comparable_scores": True,
        "finisher_round_to": device_multiple(ctx),
    }
    return MethodResult(model, masks, scores, None, info)
