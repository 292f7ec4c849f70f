"""W-Gates' gated network: weight-dependent binary gates on every channel group, their floors, and the scores
the finisher ranks them by (pruning.methods.wgates trains them)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from pruning.groups import ChannelGraph, ChannelGroup

# Where the finisher ranks the channels within a floor: far above any score the range term lets a gate reach.
FLOOR_RANK = 100.0


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
                   steps: int = 256) -> Iterator[tuple[float, float]]:
    """(inner share, residual share) of the floors from the given ones down to (0, 0): with `residual_first` the
    residual share first falls to the inner one while the inner share stays, then both fall by one common
    factor (from the start without it)."""
    start = min(residual_min_keep, min_keep) if residual_first else residual_min_keep
    if start != residual_min_keep:
        for step in range(steps, 0, -1):
            yield min_keep, start + (residual_min_keep - start) * step / steps
    for step in range(steps, -1, -1):
        yield min_keep * step / steps, start * step / steps


def budget_floors(sizes: Sequence[int], residual: Sequence[bool], min_keep: float, residual_min_keep: float,
                  cost: Callable[[list[int]], float], limit: float, residual_first: bool = False,
                  ) -> tuple[list[int], tuple[float, float]]:
    """(floors, (inner share, residual share)): group_floors at the first shares of lowered_shares whose floors
    cost at most `limit` (one channel per group, shares 0, if none do)."""
    # A scan from the top, not a bisection: LPNet is not monotone in the channel counts (off-grid counts can
    # predict slower than larger ones), and a bisection took resnet56 floors 0.1% over a budget down to 0.75.
    seen: dict[tuple[int, ...], bool] = {}
    for inner, stream in lowered_shares(min_keep, residual_min_keep, residual_first):
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
        return self.model(inputs)

    def keep_counts(self, scores: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Soft keep count of every group: the sums of the gates of the last forward pass (straight-through), or
        of the floored gates of `scores` (such as scores(through_filters=False), to stop at the gate networks)."""
        if scores is None:
            return torch.stack([g.sum() for g in self.current])
        return torch.stack([floored_gate(s, f).sum() for s, f in zip(scores, self.floors, strict=True)])

    def gate_parameters(self) -> list[nn.Parameter]:
        return list(self.gates.parameters())

    def gate_param_groups(self, lr: float) -> list[dict]:
        """The SGD parameter group of the gate networks: `lr`, no momentum, no weight decay."""
        # No momentum: when the cost falls under the target, the gates' push stops at once.
        return [{"params": self.gate_parameters(), "lr": lr, "weight_decay": 0.0, "momentum": 0.0}]

    def remove(self) -> nn.Module:
        """Detach the gates' hooks and return the bare model (the gate modules are discarded)."""
        self.detach()
        self.current = []
        self.last_scores = []
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


def range_term(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """How far gate scores lie outside the straight-through window [-1, 1]: per group, the mean of
    max(0, |s| - 1) over its channels; summed over the groups."""
    # (ours) Scores outside the window get no gradient and could never change side again; pulling them back
    # keeps every gate revisable when the trade-off shifts. Linear, not squared, so the pull per channel is
    # bounded. A mean, not a sum: a group's channels share one gate network, and a summed term would pull on it
    # in proportion to the group's width (on resnet56's 64-wide residual groups the loss overflowed).
    return torch.stack([torch.mean(torch.relu(s.abs() - 1.0)) for s in scores]).sum()


