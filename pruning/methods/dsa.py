"""DSA, Differentiable Sparsity Allocation (Ning et al., ECCV 2020): learned per-group keep ratios under a budget
constraint solved by ADMM.

Every group k has a keep ratio alpha_k = lo_k + (1 - lo_k) sigmoid(a_k). Its channels are kept with probabilities
p_i = min(1, 0.01 + sigmoid(beta2 (ln b_i - ln beta1))), b_i = |BN gamma|, ln beta1 found by bisection so that
mean p = alpha_k, and masks ~ Bernoulli(p) pass the gradient straight through to p and, implicitly through
beta1, to alpha. The budget F(alpha) <= target (F: the budget's soft cost of the counts alpha_k C_k) is handled
by ADMM: a gradient step on a for task + rho/2 ||alpha - z + u||^2, z = the Euclidean projection of alpha + u onto
the budget set, u += alpha - z.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from torch import nn

from pruning.allocation import masks_from_counts
from pruning.budget import BudgetCost
from pruning.groups import ChannelGraph
from pruning.importance import group_bn_gammas
from pruning.methods.api import MethodContext, NotApplicable, Selection
from pruning.methods.dsa_params import DSAParams
from pruning.regularizer import Regularizer
from pruning.train import train

# p_i never falls below this (the paper's 0.01), so mean p cannot reach a ratio under it.
P_FLOOR = 0.01
# Lowest ratio alpha may take in any group: a margin above P_FLOOR, where the threshold still exists.
ALPHA_FLOOR = 0.02
# Multipliers tried before a projection gives up and returns the box's lower corner (the budget set is empty).
MAX_MULTIPLIER = 1e12


def check(model: nn.Module, graph: ChannelGraph, params: DSAParams) -> None:
    """DSA allocates over channel groups: a model without any has nothing to allocate."""
    if not graph.groups:
        raise NotApplicable("dsa: the model has no prunable channel groups")


# ---- keep probabilities ---------------------------------------------------------------------------------------

def padded_log_scales(scales: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ln b [groups, widest], valid [groups, widest]) in float64: each group's log-magnitudes, zero-padded."""
    widest = max(len(s) for s in scales)
    log_b = torch.zeros(len(scales), widest, dtype=torch.float64)
    valid = torch.zeros(len(scales), widest, dtype=torch.bool)
    for k, s in enumerate(scales):
        # A zero gamma would be ln 0 = -inf; 1e-12 puts it below every live channel instead.
        log_b[k, : len(s)] = s.detach().double().clamp_min(1e-12).log()
        valid[k, : len(s)] = True
    return log_b, valid


def probabilities_at(log_b: torch.Tensor, valid: torch.Tensor, log_beta1: torch.Tensor, beta2: float):
    """p = min(1, P_FLOOR + sigmoid(beta2 (ln b - ln beta1))) per channel, 0 on padding."""
    p = (P_FLOOR + torch.sigmoid(beta2 * (log_b - log_beta1.unsqueeze(1)))).clamp(max=1.0)
    return p * valid


@torch.no_grad()
def solve_log_threshold(log_b: torch.Tensor, valid: torch.Tensor, alpha: torch.Tensor, beta2: float,
                        iterations: int = 64) -> torch.Tensor:
    """ln beta1 of every group such that the mean p over its channels is alpha (bisection: mean p falls in t)."""
    width = valid.sum(1).to(log_b.dtype)
    big = torch.finfo(log_b.dtype).max
    lowest = torch.where(valid, log_b, torch.full_like(log_b, big)).min(1).values
    highest = torch.where(valid, log_b, torch.full_like(log_b, -big)).max(1).values
    # 12/beta2 past the extremes every sigmoid is within 1e-5 of 1 (mean p = 1) or of 0 (mean p ~ P_FLOOR).
    lo, hi = lowest - 12.0 / beta2 - 1.0, highest + 12.0 / beta2 + 1.0
    target = alpha.detach().to(log_b.dtype)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        above = probabilities_at(log_b, valid, mid, beta2).sum(1) / width > target
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def keep_probabilities(log_b: torch.Tensor, valid: torch.Tensor, alpha: torch.Tensor, beta2: float) -> torch.Tensor:
    """p of every channel [groups, widest], mean alpha per group, differentiable in alpha through the threshold."""
    t0 = solve_log_threshold(log_b, valid, alpha, beta2)
    width = valid.sum(1).to(log_b.dtype)
    s = torch.sigmoid(beta2 * (log_b - t0.unsqueeze(1)))
    free = valid & (P_FLOOR + s < 1.0)
    # Implicit function theorem on mean p(t) = alpha: dt/dalpha = 1 / (d mean p / dt); clipped channels have no slope.
    slope = -(beta2 / width) * (s * (1 - s) * free).sum(1)
    slope = torch.minimum(slope, torch.full_like(slope, -1e-12))
    alpha64 = alpha.to(log_b.dtype)
    # Equal to t0 in value; carries dt/dalpha into the graph.
    threshold = t0 + (alpha64 - alpha64.detach()) / slope
    return probabilities_at(log_b, valid, threshold, beta2)


def straight_through_bernoulli(p: torch.Tensor) -> torch.Tensor:
    """Masks ~ Bernoulli(p) in value (exactly 0/1), with gradient d mask / d p = 1."""
    sample = torch.bernoulli(p.detach())
    return sample + (p - p.detach())


# ---- the budget constraint and its projection -----------------------------------------------------------------

class SoftBudget:
    """F(z) / target for keep ratios z (float64 numpy), with its gradient: the budget's soft cost of z x widths."""

    def __init__(self, budget: BudgetCost, sizes: Sequence[int]):
        self.budget = budget
        self.sizes = torch.tensor([float(s) for s in sizes], dtype=torch.float64)

    def value_and_grad(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        # ADMM updates run under no_grad; this gradient is the projection's own.
        with torch.enable_grad():
            ratios = torch.tensor(z, dtype=torch.float64, requires_grad=True)
            cost = self.budget.soft(ratios * self.sizes) / self.budget.target
            (grad,) = torch.autograd.grad(cost, ratios)
        return float(cost.detach()), grad.double().numpy()

    def value(self, z: np.ndarray) -> float:
        with torch.no_grad():
            return float(self.budget.soft(torch.tensor(z, dtype=torch.float64) * self.sizes)) / self.budget.target


def penalized_minimum(v: np.ndarray, lo: np.ndarray, hi: np.ndarray, cost, multiplier: float,
                      start: np.ndarray) -> np.ndarray:
    """argmin over the box [lo, hi] of 1/2 ||z - v||^2 + multiplier * cost(z) (L-BFGS-B from `start`)."""
    def objective(z: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = cost.value_and_grad(z)
        return 0.5 * float(np.dot(z - v, z - v)) + multiplier * value, (z - v) + multiplier * grad

    result = minimize(objective, np.clip(start, lo, hi), jac=True, method="L-BFGS-B",
                      bounds=list(zip(lo.tolist(), hi.tolist(), strict=True)),
                      options={"maxiter": 500, "ftol": 1e-13, "gtol": 1e-9})
    return np.clip(result.x, lo, hi)


def project_to_budget(v: np.ndarray, lo: np.ndarray, hi: np.ndarray, cost, tolerance: float = 1e-3,
                      exact: bool = False, guess: float = 1.0) -> tuple[np.ndarray, float]:
    """(z, multiplier): the point of {z in [lo, hi]: cost(z) <= 1} nearest to v (`exact`: of the level set
    cost(z) = 1, to `tolerance` below it), by a bracketing search over the Lagrange multiplier of the cost.

    z(multiplier) = penalized_minimum; its cost falls as the multiplier grows (a negative one, exact only, raises
    the cost of a point under the level set), so the multiplier where it crosses 1 is bracketed from `guess` (the
    last projection's) and then found by false position with the Illinois step, a bisection that converges in a
    few solves where halving would take a dozen.
    """
    z = np.clip(v, lo, hi)
    start = cost.value(z)
    if start <= 1.0 and (not exact or start >= 1.0 - tolerance):
        return z, 0.0
    if start > 1.0 and cost.value(lo) > 1.0:
        return lo.copy(), math.inf  # nothing in the box fits: the finisher must go below the floors
    if start < 1.0 and cost.value(hi) <= 1.0:
        return hi.copy(), -math.inf  # even the whole box is under the level set
    sign = 1.0 if start > 1.0 else -1.0
    # Sides of the bracket as (multiplier, cost - 1, z): `ok` fits (<= 0), `over` does not.
    known = (0.0, start - 1.0, z)
    step = guess if math.isfinite(guess) and guess * sign > 0 else sign
    while True:
        z_step = penalized_minimum(v, lo, hi, cost, step, known[2])
        trial = (step, cost.value(z_step) - 1.0, z_step)
        if (trial[1] <= 0) != (known[1] <= 0):
            break
        if abs(step) >= MAX_MULTIPLIER:
            return (lo.copy(), math.inf) if sign > 0 else (z, 0.0)
        known, step = trial, step * 4.0
    ok, over = (trial, known) if trial[1] <= 0 else (known, trial)
    # False position on (multiplier, cost - 1); Illinois: an end kept twice in a row has its value halved in
    # the interpolation (weights), so that it does not stall the search.
    weights, last = {"ok": 1.0, "over": 1.0}, None
    for _ in range(60):
        # A float32 cost (LPNet) makes z(multiplier) noisy near the crossing: a closed bracket ends the search too.
        if ok[1] >= -tolerance or abs(over[0] - ok[0]) <= 1e-7 * max(1.0, abs(ok[0])):
            break
        g_ok, g_over = ok[1] * weights["ok"], over[1] * weights["over"]
        middle = ok[0] - g_ok * (over[0] - ok[0]) / (g_over - g_ok)
        z_middle = penalized_minimum(v, lo, hi, cost, middle, ok[2])
        point = (middle, cost.value(z_middle) - 1.0, z_middle)
        side = "ok" if point[1] <= 0 else "over"
        other = "over" if side == "ok" else "ok"
        weights[side] = 1.0
        weights[other] = weights[other] / 2 if last == side else 1.0
        ok, over = (point, over) if side == "ok" else (ok, point)
        last = side
    return ok[2], ok[0]


# ---- ADMM state -----------------------------------------------------------------------------------------------

def ratio_floors(sizes: Sequence[int], min_keep: float) -> torch.Tensor:
    """Lowest alpha of every group: min_keep, one channel, and ALPHA_FLOOR, whichever is highest (below 1)."""
    return torch.tensor([min(max(min_keep, 1.0 / s, ALPHA_FLOOR), 1.0 - 1e-6) for s in sizes], dtype=torch.float64)


def rho_growth(params: DSAParams, updates: int) -> float:
    """Per-update factor taking rho from rho_init to rho_final in rho_share of `updates` ADMM updates."""
    growing = max(1, round(params.rho_share * updates))
    return (params.rho_final / params.rho_init) ** (1.0 / growing)


class ADMMAllocation(Regularizer):
    """The ratio logits a and ADMM's z, u, rho: penalty rho/2 ||alpha - z + u||^2, a plain gradient step on a
    after every training step, and every `admm_interval_steps` the z and u updates and rho's growth."""

    state_fields = ("logits", "z", "u", "rho", "multiplier", "updates", "cost_trace", "residual_trace")

    def __init__(self, floors: torch.Tensor, cost: SoftBudget, params: DSAParams, total_steps: int):
        self.floors = floors
        self.cost = cost
        self.params = params
        self.growth = rho_growth(params, total_steps // params.admm_interval_steps)
        share = ((params.alpha_init - floors) / (1.0 - floors)).clamp(0.01, 0.99)
        self.logits = torch.logit(share).requires_grad_(True)
        self.u = torch.zeros_like(floors)
        self.z = torch.zeros_like(floors)
        self.rho = float(params.rho_init)
        self.updates = 0
        self.cost_trace: list[float] = []
        self.residual_trace: list[float] = []
        self.multiplier = 1.0  # the first projection's bracket starts here
        projected, self.multiplier = self.project(self.alpha().detach())
        self.z.copy_(projected)

    def alpha(self) -> torch.Tensor:
        """Keep ratio of every group (float64, differentiable in the logits)."""
        return self.floors + (1.0 - self.floors) * torch.sigmoid(self.logits)

    def project(self, v: torch.Tensor) -> tuple[torch.Tensor, float]:
        z, multiplier = project_to_budget(v.numpy(), self.floors.numpy(), np.ones(len(v)), self.cost,
                                          self.params.projection_tolerance, self.params.spend_budget,
                                          self.multiplier if math.isfinite(self.multiplier) else 1.0)
        return torch.from_numpy(z), float(multiplier)

    def penalty(self, model: nn.Module, step: int) -> torch.Tensor:
        gap = self.alpha() - self.z + self.u
        device = next(model.parameters()).device
        return (0.5 * self.rho * gap.pow(2).sum()).float().to(device)

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.logits.grad is not None:
            self.alpha_step(self.logits.grad)
        self.logits.grad = None
        if step % self.params.admm_interval_steps == 0:
            self.admm_update()

    @torch.no_grad()
    def alpha_step(self, logits_grad: torch.Tensor) -> None:
        """alpha -= alpha_lr x d(task + penalty)/d alpha, taken in ratio space (the sigmoid only keeps alpha in
        (floor, 1)): a step in a would shrink where sigmoid saturates and, with rho, overshoot where it does not."""
        share = torch.sigmoid(self.logits)
        slope = ((1.0 - self.floors) * share * (1.0 - share)).clamp_min(1e-12)
        alpha = self.alpha() - self.params.alpha_lr * logits_grad / slope
        share = ((alpha - self.floors) / (1.0 - self.floors)).clamp(1e-6, 1.0 - 1e-6)
        self.logits.copy_(torch.logit(share))

    @torch.no_grad()
    def admm_update(self) -> None:
        alpha = self.alpha().detach()
        projected, self.multiplier = self.project(alpha + self.u)
        self.z.copy_(projected)
        self.u += alpha - self.z
        rho = min(self.rho * self.growth, self.params.rho_final)
        # u is the dual scaled by 1/rho: it keeps the unscaled dual when rho changes.
        self.u *= self.rho / rho
        self.rho = rho
        self.updates += 1
        self.cost_trace.append(self.cost.value(alpha.numpy()))
        self.residual_trace.append(float((alpha - self.z).abs().max()))


# ---- the sampled network --------------------------------------------------------------------------------------

class SampledNetwork(nn.Module):
    """The model with every group's channels multiplied by masks drawn from the allocation's keep probabilities
    (after the BN)."""

    def __init__(self, model: nn.Module, graph: ChannelGraph, allocation: ADMMAllocation, beta2: float):
        super().__init__()
        self.model = model
        self.graph = graph
        self.allocation = allocation
        self.beta2 = beta2
        self.current: list[torch.Tensor] = []
        self._handles = [self.model.get_submodule(name).register_forward_hook(self._mask_hook(index))
                         for index, group in enumerate(graph.groups) for name in group.scale_layers]

    def _mask_hook(self, index: int) -> Callable:
        def hook(_module, _inputs, output):
            mask = self.current[index].to(output.device, output.dtype)
            return output * mask.view([1, -1] + [1] * (output.dim() - 2))
        return hook

    def probabilities(self) -> list[torch.Tensor]:
        log_b, valid = padded_log_scales(group_bn_gammas(self.model, self.graph))
        p = keep_probabilities(log_b, valid, self.allocation.alpha(), self.beta2)
        return [row[: size] for row, size in zip(p, self.graph.sizes, strict=True)]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        probabilities = self.probabilities()
        # Evaluation sees the expected masks; only training samples them.
        self.current = [straight_through_bernoulli(p) for p in probabilities] if self.training else probabilities
        return self.model(inputs)

    def remove(self) -> nn.Module:
        for handle in self._handles:
            handle.remove()
        self._handles, self.current = [], []
        return self.model


def keep_counts(alpha: torch.Tensor, sizes: Sequence[int]) -> list[int]:
    """round(alpha_k C_k) of every group, at least one channel."""
    return [min(size, max(1, round(float(a) * size))) for a, size in zip(alpha, sizes, strict=True)]


def cost_rounded_counts(alpha: torch.Tensor, sizes: Sequence[int], hard: Callable[[list[int]], float],
                        limit: float) -> list[int]:
    """alpha_k C_k rounded down or up per group so that the hard cost stays within `limit` (alpha's own soft cost):
    from the floors, groups round up in the order of their fractional parts while the cost fits."""
    # Nearest rounding misses alpha's cost by up to half a channel per group, all in one direction by chance: on
    # resnet20's 16-channel groups that was 2.9% over at flops=0.5.
    exact = [float(a) * size for a, size in zip(alpha, sizes, strict=True)]
    counts = [min(size, max(1, math.floor(x + 1e-9))) for x, size in zip(exact, sizes, strict=True)]
    order = sorted(range(len(sizes)), key=lambda k: counts[k] - exact[k])
    for k in order:
        if counts[k] < sizes[k] and exact[k] > counts[k]:
            trial = counts[:k] + [counts[k] + 1] + counts[k + 1:]
            if hard(trial) <= limit:
                counts = trial
    return counts


# ---- the method -----------------------------------------------------------------------------------------------

@dataclass
class _Progress:
    """Forwards train()'s events with the alphas' current soft cost."""

    ctx: MethodContext
    allocation: ADMMAllocation

    def __call__(self, event: dict) -> None:
        if self.ctx.progress is not None:
            trace = self.allocation.cost_trace
            cost = trace[-1] * self.ctx.budget.target if trace else None
            self.ctx.progress({**event, "cost": cost})


def finisher_scores(p: Sequence[torch.Tensor], gammas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Keep probabilities (one scale across groups), ties among the clipped p = 1 broken by relative |gamma|."""
    return [pk.detach().float() + 1e-3 * g / g.max().clamp_min(1e-12) for pk, g in zip(p, gammas, strict=True)]


def run(ctx: MethodContext) -> Selection:
    """Learn the ratios with ADMM while the weights train, then keep each group's top round(alpha C) by |gamma|."""
    p: DSAParams = ctx.params
    sizes = ctx.graph.sizes
    total_steps = ctx.epochs * len(ctx.train_loader)
    allocation = ADMMAllocation(ratio_floors(sizes, p.min_keep), SoftBudget(ctx.budget, sizes), p, total_steps)
    network = SampledNetwork(ctx.model, ctx.graph, allocation, p.beta2)
    try:
        result = train(network, ctx.train_loader, ctx.epochs, lr=ctx.lr, device=ctx.device,
                       progress=_Progress(ctx, allocation), should_cancel=ctx.should_cancel,
                       checkpoint_dir=ctx.checkpoint_dir, stage="dsa", seed=ctx.seed,
                       params=list(ctx.model.parameters()), regularizer=allocation)
        with torch.no_grad():
            probabilities = network.probabilities()
    finally:
        network.remove()
    alpha = allocation.alpha().detach()
    soft_cost = allocation.cost.value(alpha.numpy()) * ctx.budget.target
    counts = (cost_rounded_counts(alpha, sizes, ctx.budget.hard, soft_cost) if p.cost_rounding
              else keep_counts(alpha, sizes))
    gammas = group_bn_gammas(ctx.model, ctx.graph)
    masks = masks_from_counts(gammas, counts)
    trace = allocation.cost_trace
    info = {
        "alpha_cost_ratio": ctx.budget.hard(counts) / ctx.budget.target,
        "alpha_soft_cost_ratio": soft_cost / ctx.budget.target,
        "alpha_keep_counts": counts,
        "alpha": [round(float(a), 6) for a in alpha],
        "z": [round(float(v), 6) for v in allocation.z],
        "u": [round(float(v), 6) for v in allocation.u],
        "rho": allocation.rho,
        # None: the budget set was empty (floors over the budget) and z sat at the floors.
        "multiplier": allocation.multiplier if math.isfinite(allocation.multiplier) else None,
        "primal_residual": float((alpha - allocation.z).abs().max()),
        "admm_updates": allocation.updates,
        "steps": result.steps,
        "target": ctx.budget.target,
        "alpha_soft_cost_trace": [c * ctx.budget.target for c in trace[:: max(1, len(trace) // 50)]],
    }
    return Selection(ctx.model, masks, finisher_scores(probabilities, gammas), score_scale="global",
                     round_to=p.round_to, info=info)
