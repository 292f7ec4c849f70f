"""DAIS (Guan et al., TNNLS 2023): channel indicators sigmoid(alpha / T), annealed to binary, searched bi-level.

The weights train on the training split through pruning.train.train; after every weight step the IndicatorSearch
(a Regularizer) takes one alpha step on the next held-out batch (first-order alternation) against
val loss + mu1 * mean(I) + mu2 * band term of the budget's soft cost, and lowers T on a geometric schedule. Its
state (alpha, T, the alpha optimizer, the held-out batch position) is checkpointed with the training run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from pruning.budget import BudgetCost
from pruning.groups import ChannelGraph
from pruning.importance import L1Importance
from pruning.methods.api import MethodContext, NotApplicable, Selection
from pruning.methods.dais_params import DAISParams
from pruning.regularizer import Regularizer
from pruning.train import TrainingError, train

# At most this many (step, T, soft cost) points are kept for the report.
TRACE_POINTS = 200
# BatchNorm in training mode cannot normalise a batch of one sample (the ragged end of a held-out split).
MIN_VAL_BATCH = 2
# Bounds of the automatic alpha learning rate (alpha_learning_rate).
MIN_ALPHA_LR, MAX_ALPHA_LR = 0.005, 0.5


def temperature_at(step: int, total_steps: int, initial: float, factor: float) -> float:
    """T after `step` of `total_steps` alpha steps: falls geometrically from `initial` to `initial / factor`."""
    share = min(max(step, 0), total_steps) / max(total_steps, 1)
    return initial * factor ** (-share)


def band_term(cost: torch.Tensor, target: float, band: float) -> torch.Tensor:
    """0 while cost lies in [(1 - band), (1 + band)] x target; log(cost / nearest edge) outside (log-barrier-like:
    the push does not depend on the cost's unit, and grows without bound towards a zero cost)."""
    upper = target * (1.0 + band)
    lower = target * (1.0 - band)
    over = torch.relu(torch.log(cost / upper))
    under = torch.relu(torch.log(lower / cost.clamp_min(1e-12))) if lower > 0 else torch.zeros_like(cost)
    return over + under


def initial_alphas(model: nn.Module, graph: ChannelGraph, alpha_init: float, spread: float) -> torch.Tensor:
    """alpha_init + spread * clip(L1 / group mean L1 - 1, -1, 1) for every channel of every group, concatenated."""
    # (ours) From trained weights, equal alphas would leave the first steps' val-loss noise to pick which channels
    # cross zero; an L1 offset starts the search in the order of the dense model's filter magnitudes.
    parts = []
    for scores in L1Importance()(model, graph):
        relative = scores.detach().float() / scores.detach().float().mean().clamp_min(1e-12) - 1.0
        parts.append(alpha_init + spread * relative.clamp(-1.0, 1.0))
    return torch.cat(parts)


def alpha_learning_rate(params: DAISParams, total_steps: int) -> float:
    """params.alpha_lr, else one at which an alpha can travel alpha_travel x the initial span over the search."""
    if params.alpha_lr is not None:
        return params.alpha_lr
    # (ours) Adam moves an alpha by about its learning rate per step; a fixed rate that suits a 1000-step search
    # leaves a 20-step one unable to move any alpha across zero, so every indicator ends open.
    span = abs(params.alpha_init) + params.init_spread
    return min(max(params.alpha_travel * max(span, 0.1) / max(total_steps, 1), MIN_ALPHA_LR), MAX_ALPHA_LR)


def keep_masks(alphas: list[torch.Tensor]) -> list[torch.Tensor]:
    """I >= 0.5 (alpha >= 0) per group, with each group's highest alpha kept so no group vanishes."""
    masks = []
    for alpha in alphas:
        mask = alpha.detach() >= 0
        mask[int(torch.argmax(alpha))] = True
        masks.append(mask)
    return masks


class IndicatorHook:
    """Forward hook multiplying a scale layer's output by its group's live indicators."""

    def __init__(self, search: IndicatorSearch, index: int):
        self.search = search
        self.index = index

    def __call__(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        gate = self.search.indicators()[self.index].to(output.dtype)
        return output * gate.view([1, -1] + [1] * (output.dim() - 2))


class IndicatorSearch(Regularizer):
    """The indicators, their alpha steps on held-out batches and the temperature schedule.

    `phase` says which update a forward pass belongs to ("weights" or "alphas"), for tests and hooks.
    """

    state_fields = ("alpha", "temperature", "steps_done", "val_position", "soft_cost", "trace")

    def __init__(self, model: nn.Module, graph: ChannelGraph, budget: BudgetCost, val_loader: DataLoader,
                 params: DAISParams, total_steps: int, seed: int, device: torch.device):
        self.graph = graph
        self.budget = budget
        self.val_loader = val_loader
        self.params = params
        self.total_steps = total_steps
        self.seed = seed
        self.sizes = graph.sizes
        self.alpha = initial_alphas(model, graph, params.alpha_init, params.init_spread).to(device)
        self.optimizer = torch.optim.Adam([self.alpha], lr=alpha_learning_rate(params, total_steps))
        self.temperature = float(params.temperature_init)
        self.steps_done = 0
        self.val_position = 0
        self.soft_cost = float("nan")
        self.trace: list[list[float]] = []
        self.phase = "weights"
        self.trace_every = max(1, total_steps // TRACE_POINTS)
        self._handles: list = []
        self._batches: Iterator | None = None
        self._batches_at = -1
        self.forwarding: Callable[[dict], None] | None = None

    # ---- indicators --------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Hook the indicators onto every group's scale layers (each producer's BN, else the producer)."""
        for index, group in enumerate(self.graph.groups):
            for name in group.scale_layers:
                hook = IndicatorHook(self, index)
                self._handles.append(model.get_submodule(name).register_forward_hook(hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def indicators(self) -> list[torch.Tensor]:
        """sigmoid(alpha / T) per group (differentiable in alpha only during an alpha step)."""
        return list(torch.sigmoid(self.alpha / self.temperature).split(self.sizes))

    def alphas(self) -> list[torch.Tensor]:
        return [a.detach().cpu().clone() for a in self.alpha.split(self.sizes)]

    def binarized_share(self, tolerance: float = 0.05) -> float:
        """Share of indicators within `tolerance` of 0 or 1."""
        with torch.no_grad():
            values = torch.sigmoid(self.alpha / self.temperature)
            return float(((values <= tolerance) | (values >= 1 - tolerance)).float().mean())

    # ---- the alpha step ----------------------------------------------------------------------------------------
    def after_step(self, model: nn.Module, step: int) -> None:
        """One alpha step on the next held-out batch, then T moves to its value after `step` steps."""
        if self.total_steps > 0:
            self.alpha_step(model)
        self.steps_done = step
        self.temperature = temperature_at(step, self.total_steps, self.params.temperature_init,
                                          self.params.anneal_factor)
        if step % self.trace_every == 0 or step == self.total_steps:
            self.trace.append([step, self.temperature, self.soft_cost])

    def alpha_objective(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """val loss + mu1 * mean(I) + mu2 * band_term(soft cost of the soft keep counts)."""
        indicators = self.indicators()
        counts = torch.stack([i.sum() for i in indicators])
        # The cost models live on the CPU; autograd carries the gradient back to alpha's device.
        cost = self.budget.soft(counts.cpu())
        self.soft_cost = float(cost.detach())
        loss = nn.functional.cross_entropy(logits, targets)
        sparsity = torch.cat(indicators).mean()
        budget = band_term(cost.float(), self.budget.target, self.params.band).to(loss.device)
        return loss + self.params.l1_weight * sparsity + self.params.budget_weight * budget

    def alpha_step(self, model: nn.Module) -> None:
        """Gradient of the alpha objective on one held-out batch, w.r.t. alpha only; weights and BN statistics stay."""
        inputs, targets = self.next_val_batch()
        device = self.alpha.device
        saved = _norm_buffers(model)
        self.phase = "alphas"
        self.alpha.requires_grad_(True)
        try:
            logits = model(inputs.to(device))
            objective = self.alpha_objective(logits, torch.as_tensor(targets).to(device))
            (grad,) = torch.autograd.grad(objective, [self.alpha])
        finally:
            self.alpha.requires_grad_(False)
            self.phase = "weights"
            _restore(saved)
        if not torch.isfinite(grad).all():
            raise TrainingError("dais: the alpha gradient became non-finite; lower alpha_lr or budget_weight")
        self.alpha.grad = grad
        self.optimizer.step()
        self.alpha.grad = None

    def next_val_batch(self) -> tuple[torch.Tensor, Any]:
        """The held-out batch at `val_position` (then advanced): a function of (seed, position) only, drawn with
        the global CPU RNG forked, so the weights' RNG stream is the same with or without a resume in between."""
        batches_per_pass = len(self.val_loader)
        for _ in range(batches_per_pass):
            passes, offset = divmod(self.val_position, batches_per_pass)
            with torch.random.fork_rng(devices=[]):
                if self._batches is None or self._batches_at != self.val_position:
                    self._batches = self._pass_iterator(passes, offset)
                # Random transforms of this batch draw from a state that depends on its position only.
                torch.default_generator.manual_seed(_mix(self.seed, passes, offset))
                inputs, targets = next(self._batches)
            self.val_position += 1
            self._batches_at = self.val_position if offset + 1 < batches_per_pass else -1
            if len(inputs) >= MIN_VAL_BATCH:
                return inputs, targets
        raise TrainingError(f"dais: no held-out batch has {MIN_VAL_BATCH} or more samples")

    def _pass_iterator(self, passes: int, offset: int) -> Iterator:
        """An iterator over held-out pass `passes`, `offset` batches in (shuffling, if any, seeded by the pass)."""
        generator = getattr(self.val_loader, "generator", None)
        if generator is not None:
            generator.manual_seed(_mix(self.seed, passes, -1))
        torch.default_generator.manual_seed(_mix(self.seed, passes, -1))
        batches = iter(self.val_loader)
        for _ in range(offset):
            next(batches)
        return batches

    # ---- checkpoint and progress -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "alpha_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "alpha_optimizer" not in state:
            raise ValueError("regularizer state lacks ['alpha_optimizer']")
        super().load_state_dict(state)
        self.optimizer.load_state_dict(state["alpha_optimizer"])
        self._batches = None  # the held-out position changed: the next batch rebuilds its iterator

    def progress(self, event: dict) -> None:
        """train()'s progress events, with the soft cost and the temperature added."""
        if self.forwarding is not None:
            cost = None if math.isnan(self.soft_cost) else self.soft_cost
            self.forwarding({**event, "cost": cost, "temperature": self.temperature})


def _mix(seed: int, passes: int, offset: int) -> int:
    return (seed * 1_000_003 + passes * 7_919 + offset * 104_729 + 29) % 2**63


def _norm_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) of every BatchNorm running statistic, so a held-out forward leaves no trace in the model."""
    return [(b, b.detach().clone()) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in m.buffers()]


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for buffer, copy in saved:
            buffer.copy_(copy)


def check(model: nn.Module, graph: ChannelGraph, params: DAISParams) -> None:
    """Every architecture with prunable groups can carry indicators; one without any cannot be searched."""
    if not graph.groups:
        raise NotApplicable("dais: the model has no prunable channel groups to put indicators on")


def run(ctx: MethodContext) -> Selection:
    """Search indicators bi-level with an annealed temperature, keep I >= 0.5, rank the rest by alpha."""
    p = ctx.params
    if len(ctx.val_loader) == 0:
        raise TrainingError("dais needs a held-out split for its alphas, and the validation loader is empty")
    model = ctx.model.to(ctx.device)
    total_steps = ctx.epochs * len(ctx.train_loader)
    search = IndicatorSearch(model, ctx.graph, ctx.budget, ctx.val_loader, p, total_steps, ctx.seed, ctx.device)
    search.forwarding = ctx.progress
    search.attach(model)
    try:
        result = train(model, ctx.train_loader, ctx.epochs, lr=ctx.lr, device=ctx.device,
                       progress=search.progress, should_cancel=ctx.should_cancel,
                       checkpoint_dir=ctx.checkpoint_dir, stage="dais", seed=ctx.seed, regularizer=search)
    finally:
        search.detach()
    alphas = search.alphas()
    masks = keep_masks(alphas)
    counts = [int(m.sum()) for m in masks]
    info = {
        "indicator_keep_counts": counts,
        "indicator_cost": ctx.budget.hard(counts),
        "soft_cost": None if math.isnan(search.soft_cost) else search.soft_cost,
        "target": ctx.budget.target,
        "temperature": search.temperature,
        "binarized_share": search.binarized_share(),
        "steps": result.steps,
        "alpha_lr": search.optimizer.param_groups[0]["lr"],
        "val_batches": search.val_position,
        "trace": search.trace,
    }
    # One threshold (alpha = 0) for every group: the finisher ranks the alphas as they are.
    return Selection(model, masks, alphas, score_scale="global", round_to=p.round_to, info=info)
