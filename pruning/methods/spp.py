"""SPP (Wang et al., 2017): structured probabilistic pruning. Every channel has a pruning probability p; each
training step drops it with probability p, and every t steps the channels of each group are ranked by L1 and p
moves by a center-symmetric exponential increment, up for the weakest and down for the strongest, until each
group's share to remove sits at p = 1.

The paper's unit ("group") is a conv's input-channel column; ours is a channel of a coupled channel group (the
unit the engine removes physically), masked after its BN like the gates of wgates. The probabilities and the
schedule's position live in ProbabilitySchedule (a Regularizer, checkpointed by pruning.train); the masks are
drawn from torch's global RNG, which train() checkpoints too, so a resumed job draws the same masks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pruning.allocation import fit_scores
from pruning.groups import ChannelGraph
from pruning.importance import L1Importance
from pruning.methods.api import MethodContext, NotApplicable, Selection
from pruning.regularizer import Regularizer
from pruning.surgery import materialize
from pruning.train import evaluate, train

STAGE = "spp"


def increments(prune_count: int, ranks: torch.Tensor, scale: float, center_share: float) -> torch.Tensor:
    """The paper's Delta(r) for 0-based ascending L1 ranks `ranks`, with R*N_g = `prune_count`:
    A*exp(-a*r) for r <= N_c, else 2uA - A*exp(-a*(2N_c - r)), a = ln(2/u)/(R*N_g), N_c = -ln(u)/a.
    Delta is A at rank 0, u*A at N_c, and crosses 0 at rank R*N_g: exactly the R*N_g weakest channels gain."""
    r = ranks.to(torch.float64)
    a = math.log(2.0 / center_share) / prune_count
    center = -math.log(center_share) / a
    low = scale * torch.exp(-a * r)
    high = 2.0 * center_share * scale - scale * torch.exp(-a * (2.0 * center - r))
    return torch.where(r <= center, low, high)


def ascending_ranks(scores: torch.Tensor) -> torch.Tensor:
    """0-based rank of every channel by ascending score (ties in channel order, so ranks are reproducible)."""
    order = torch.argsort(scores.detach().cpu(), stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order))
    return ranks


def planned_updates(prune_counts: Sequence[int], scale: float, center_share: float) -> int:
    """Updates the slowest group needs to bring its R*N_g weakest channels to p = 1 if the ranks stay put (its
    last one, at rank R*N_g - 1, gains the least); 0 when nothing is to be removed."""
    needed = [math.ceil(1.0 / float(increments(k, torch.tensor([k - 1]), scale, center_share)[0]) - 1e-9)
              for k in prune_counts if k > 0]
    return max(needed, default=0)


def planned_schedule(params: Any, prune_counts: Sequence[int], total_steps: int) -> tuple[int, float]:
    """(interval in steps, increment scale A): the params' own, or (fit_to_epochs) the longest interval <= t that
    fits the planned updates into schedule_share of the training steps; where even one update per step is too few,
    A grows (to at most 1) so that the planned updates fit, the increments keeping their shape."""
    updates = planned_updates(prune_counts, params.increment_scale, params.center_share)
    if not params.fit_to_epochs or updates == 0:
        return params.interval_steps, params.increment_scale
    available = max(1, math.floor(params.schedule_share * total_steps))
    if updates <= available:
        return min(params.interval_steps, available // updates), params.increment_scale
    # The number of updates needed is ~1/A (Delta is proportional to A), so A scales by updates / available.
    return 1, min(1.0, params.increment_scale * updates / available)


class ProbabilitySchedule(Regularizer):
    """The pruning probabilities and their updates. No loss term: SPP acts through the masks only.

    Every `interval_steps` steps each unfinished group ranks its channels by L1 and adds `increments` to p
    (clipped to [0, 1]). A group is done when `prune_counts[g]` channels have p = 1: its other channels are set
    to p = 0 (kept; the paper retrains them unpruned) and it is not updated again."""

    # The scale and interval are fixed before training, but kept with the state so a checkpoint is self-contained.
    state_fields = ("probabilities", "prune_counts", "scale", "interval_steps", "updates_done", "done_at_step")

    def __init__(self, graph: ChannelGraph, prune_counts: Sequence[int], scale: float, center_share: float,
                 interval_steps: int):
        self.graph = graph
        self.scale, self.center_share, self.interval_steps = scale, center_share, interval_steps
        # float64: an update must move p by exactly its increment, and p must reach exactly 1.
        self.probabilities = [torch.zeros(size, dtype=torch.float64) for size in graph.sizes]
        self.prune_counts = [int(k) for k in prune_counts]
        self.updates_done = 0
        # -1: not done yet; groups with nothing to remove are done from the start (step 0).
        self.done_at_step = [0 if k == 0 else -1 for k in self.prune_counts]

    def after_step(self, model: nn.Module, step: int) -> None:
        if step % self.interval_steps or self.all_done():
            return
        self.update(L1Importance()(model, self.graph), step)

    def update(self, scores: Sequence[torch.Tensor], step: int) -> None:
        """One update of every unfinished group's probabilities from its channels' L1 `scores`."""
        for g, score in enumerate(scores):
            if self.done_at_step[g] >= 0:
                continue
            count, ranks = self.prune_counts[g], ascending_ranks(score)
            p = (self.probabilities[g] + increments(count, ranks, self.scale, self.center_share)).clamp(0.0, 1.0)
            at_one = p == 1
            if int(at_one.sum()) >= count:
                # Exactly `count` stay at 1: a channel already at 1 whose rank lands on the zero crossing (Delta = 0
                # up to rounding) could make one more; the weakest by rank are the ones removed.
                cutoff = ranks[at_one].sort().values[count - 1]
                p = (at_one & (ranks <= cutoff)).to(torch.float64)
                self.done_at_step[g] = step
            self.probabilities[g] = p
        self.updates_done += 1

    def all_done(self) -> bool:
        return all(step >= 0 for step in self.done_at_step)

    def removed(self) -> list[torch.Tensor]:
        """Per group, the channels at p = 1 (the ones SPP removes)."""
        return [p == 1 for p in self.probabilities]

    def finisher_scores(self, l1: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Scores on one scale for the finisher: every channel's place in one order over all groups, p = 1 channels
        first, then by descending p, ties by L1 normalized by its group's mean (the finisher trims the lowest)."""
        units = [(bool(p[c] < 1), -float(p[c]), float(rel[c]), g, c)
                 for g, (p, score) in enumerate(zip(self.probabilities, l1, strict=True))
                 for rel in [score.double() / score.double().mean().clamp_min(1e-12)] for c in range(len(p))]
        # Places, not values: a float32 score could not tell 1 - p apart from 1 - p' (or from an L1 tie-break)
        # for probabilities closer than its resolution.
        out = [torch.zeros(len(p)) for p in self.probabilities]
        for place, (*_, g, c) in enumerate(sorted(units)):
            out[g][c] = float(place)
        return out


class DrawHook:
    """Forward pre-hook on the model: draws this pass's Bernoulli(1 - p) keep masks while training."""

    def __init__(self, masks: BernoulliMasks):
        self.masks = masks

    def __call__(self, module: nn.Module, _inputs: Any) -> None:
        self.masks.draw(module.training)


class ScaleHook:
    """Forward hook on a scale layer (the BN after a group's producer): multiplies its output by the group's mask."""

    def __init__(self, masks: BernoulliMasks, index: int):
        self.masks, self.index = masks, index

    def __call__(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        keep = self.masks.current[self.index].to(output.device, output.dtype)
        return output * keep.view([1, -1] + [1] * (output.dim() - 2))


class BernoulliMasks:
    """The per-channel masks of the schedule's probabilities, hooked onto every group's scale layers. In train
    mode each forward pass draws keep ~ Bernoulli(1 - p) from torch's global RNG; in eval mode keep = (p < 1),
    the network as it will be after the removal."""

    def __init__(self, model: nn.Module, schedule: ProbabilitySchedule):
        self.schedule = schedule
        self.current: list[torch.Tensor] = []
        self.handles = [model.register_forward_pre_hook(DrawHook(self))]
        for index, group in enumerate(schedule.graph.groups):
            for name in group.scale_layers:
                self.handles.append(model.get_submodule(name).register_forward_hook(ScaleHook(self, index)))

    def draw(self, training: bool) -> None:
        probabilities = self.schedule.probabilities
        if not training:
            self.current = [p < 1 for p in probabilities]
            return
        # One draw for all groups, so the number of random values per step is fixed by the architecture.
        uniform = torch.rand(sum(len(p) for p in probabilities), dtype=torch.float64)
        self.current = [u >= p for u, p in zip(uniform.split([len(p) for p in probabilities]), probabilities,
                                               strict=True)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.current = []


class ScheduleProgress:
    """Forwards training progress events with the schedule's position added."""

    def __init__(self, progress: Callable[[dict], None] | None, schedule: ProbabilitySchedule):
        self.progress, self.schedule = progress, schedule

    def __call__(self, event: dict) -> None:
        if self.progress is not None:
            s = self.schedule
            self.progress({**event, "groups_done": sum(d >= 0 for d in s.done_at_step),
                           "channels_at_p1": sum(int(m.sum()) for m in s.removed())})


def check(model: nn.Module, graph: ChannelGraph, params: Any) -> None:
    """spp masks channels at their groups' scale layers: it needs a group that has one."""
    if not any(group.scale_layers for group in graph.groups):
        raise NotApplicable("spp: no channel group has a layer to mask its channels at")


def allocate(ctx: MethodContext, model: nn.Module) -> list[int]:
    """Channels each group removes: L1 allocated to the budget (through ctx.budget.fits, so a latency budget is
    read from the device's LPNet), once, before the schedule starts."""
    p = ctx.params
    counts = fit_scores(L1Importance()(model, ctx.graph), ctx.graph.sizes, ctx.budget.fits, p.round_to,
                        p.allocation)
    return [size - kept for size, kept in zip(ctx.graph.sizes, counts, strict=True)]


def run(ctx: MethodContext) -> Selection:
    """Train with Bernoulli channel masks whose probabilities follow the schedule; remove the p = 1 channels."""
    p = ctx.params
    model = copy.deepcopy(ctx.model).to(ctx.device)
    prune_counts = allocate(ctx, model)
    interval, scale = planned_schedule(p, prune_counts, ctx.epochs * len(ctx.train_loader))
    schedule = ProbabilitySchedule(ctx.graph, prune_counts, scale, p.center_share, interval)
    masks = BernoulliMasks(model, schedule)
    try:
        result = train(model, ctx.train_loader, ctx.epochs, lr=ctx.lr, weight_decay=p.weight_decay,
                       device=ctx.device, progress=ScheduleProgress(ctx.progress, schedule),
                       should_cancel=ctx.should_cancel, checkpoint_dir=ctx.checkpoint_dir, stage=STAGE,
                       seed=ctx.seed, regularizer=schedule)
        accuracy_masked = evaluate(model, ctx.val_loader, ctx.device)
    finally:
        masks.remove()
    model.eval()
    keep = [~m for m in schedule.removed()]
    info = {
        "prune_counts": schedule.prune_counts,
        "keep_counts": [int(m.sum()) for m in keep],
        "interval_steps": interval,
        "increment_scale": scale,
        "planned_updates": planned_updates(prune_counts, scale, p.center_share),
        "updates_done": schedule.updates_done,
        "done_at_step": schedule.done_at_step,
        "groups_done": sum(d >= 0 for d in schedule.done_at_step),
        "all_done": schedule.all_done(),
        "steps": result.steps,
        "accuracy_masked": accuracy_masked,
        "accuracy_after_removal": evaluate(materialize(model, ctx.graph, keep), ctx.val_loader, ctx.device),
    }
    scores = schedule.finisher_scores(L1Importance()(model, ctx.graph))
    return Selection(model, keep, scores, score_scale="global", round_to=p.round_to, info=info)
