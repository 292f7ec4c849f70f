"""DSA: keep probabilities whose mean is alpha, the budget projection against brute force, ADMM meeting the
budget, exact resume, architectures, and the pipeline end to end."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
import torch
from torch import nn

from pruning import zoo
from pruning.budget import Budget, BudgetCost, parse_budget
from pruning.cost import CostModel
from pruning.groups import ChannelGraph
from pruning.importance import group_bn_gammas
from pruning.methods import dsa
from pruning.methods.api import MethodContext, NotApplicable
from pruning.methods.dsa_params import DSAParams
from pruning.pipeline import PruneRequest, run_prune
from pruning.registry import get_method
from pruning.train import Cancelled
from tests.pruning.conftest import randomize_norms
from tests.pruning.test_wgates import FakeLatency, PipelineLatency, random_loader, resnet20_setup, tiny_setup


def method_context(budget_text: str, latency=None, epochs: int = 4, setup=resnet20_setup, samples: int = 64,
                   checkpoint_dir=None, should_cancel=None, **params) -> MethodContext:
    model, graph, cost = setup()
    randomize_norms(model)
    budget = BudgetCost(parse_budget(budget_text), cost, latency(cost) if latency else None)
    loader = random_loader(n=samples)
    return MethodContext(model=model, graph=graph, cost_model=cost, budget=budget, params=DSAParams(**params),
                         train_loader=loader, val_loader=loader, device=torch.device("cpu"), epochs=epochs,
                         lr=0.01, checkpoint_dir=checkpoint_dir, should_cancel=should_cancel)


# ---- params -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("beta2", -1.0), ("alpha_init", 1.5), ("rho_init", math.nan),
                                          ("alpha_lr", math.inf), ("admm_interval_steps", 0)])
def test_bad_params_name_the_field(field, value):
    info = get_method("dsa")
    assert info.trains and info.target == "pruning.methods.dsa:run"
    with pytest.raises(pydantic.ValidationError, match=field):
        info.validate_params({field: value})


def test_an_unstable_admm_step_is_refused():
    with pytest.raises(pydantic.ValidationError, match="alpha_lr x rho_final"):
        get_method("dsa").validate_params({"alpha_lr": 0.1, "rho_final": 40.0})
    assert get_method("dsa").validate_params({"alpha_lr": 0.1, "rho_final": 10.0}).rho_final == 10.0


def test_a_model_without_channel_groups_is_not_applicable():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    graph = ChannelGraph.build(model, (1, 3, 8, 8))
    with pytest.raises(NotApplicable, match="no prunable channel groups"):
        dsa.check(model, graph, DSAParams())
    dsa.check(*tiny_setup()[:2], DSAParams())


# ---- keep probabilities -------------------------------------------------------------------------------------------

def test_threshold_root_finding_gives_mean_p_alpha_and_the_implicit_gradient():
    gen = torch.Generator().manual_seed(0)
    scales = [torch.rand(8, generator=gen) * 2, torch.rand(12, generator=gen) + 0.01, torch.rand(64, generator=gen)]
    log_b, valid = dsa.padded_log_scales(scales)
    for beta2 in (1.0, 5.0, 20.0):
        for values in ([0.03, 0.5, 0.97], [0.25, 0.8, 0.1]):
            alpha = torch.tensor(values, dtype=torch.float64, requires_grad=True)
            p = dsa.keep_probabilities(log_b, valid, alpha, beta2)
            means = p.sum(1) / valid.sum(1)
            assert torch.allclose(means.detach(), alpha.detach(), atol=1e-8)
            assert float(p.detach().max()) <= 1.0 and float(p.detach()[valid].min()) >= dsa.P_FLOOR
            assert float(p.detach()[~valid].abs().max()) == 0.0
            # Through the threshold, d(mean p_k)/d alpha_j is the identity: the ratios move their means 1:1.
            jacobian = torch.stack([torch.autograd.grad(means[k], alpha, retain_graph=True)[0] for k in range(3)])
            assert torch.allclose(jacobian, torch.eye(3, dtype=torch.float64), atol=1e-6)
    # Within a group p follows |gamma|.
    p = dsa.keep_probabilities(log_b, valid, torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64), 5.0)[0, :8]
    by_gamma = p[scales[0].argsort()]
    assert bool((by_gamma[1:] >= by_gamma[:-1]).all()) and float(by_gamma[-1]) > float(by_gamma[0])


def test_straight_through_bernoulli_samples_p_and_passes_the_gradient():
    torch.manual_seed(0)
    p = torch.tensor([0.0, 0.2, 0.7, 1.0], requires_grad=True)
    draws = torch.stack([dsa.straight_through_bernoulli(p) for _ in range(4000)])
    assert set(draws.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(draws.detach().mean(0), p.detach(), atol=0.03)
    (dsa.straight_through_bernoulli(p) * torch.arange(1.0, 5.0)).sum().backward()
    assert p.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


# ---- the projection -----------------------------------------------------------------------------------------------

class Bilinear:
    """A tiny cost like a conv chain's MACs: (a z1 + b z1 z2 + c z2) / target."""

    def __init__(self, a: float, b: float, c: float, target: float):
        self.a, self.b, self.c, self.target = a, b, c, target

    def value(self, z: np.ndarray) -> float:
        return (self.a * z[..., 0] + self.b * z[..., 0] * z[..., 1] + self.c * z[..., 1]) / self.target

    def value_and_grad(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        grad = np.array([self.a + self.b * z[1], self.b * z[0] + self.c]) / self.target
        return float(self.value(z)), grad


def brute_force_projection(v: np.ndarray, lo: np.ndarray, cost, exact: bool, points: int = 801):
    """The grid point nearest to v in the feasible set (exact: within a grid cell's cost of the level set)."""
    axes = [np.linspace(lo[k], 1.0, points) for k in range(2)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    values = np.vectorize(lambda i, j: cost.value(grid[i, j]))(*np.indices(grid.shape[:2])) \
        if not isinstance(cost, Bilinear) else cost.value(grid)
    feasible = np.abs(values - 1.0) <= 2e-3 if exact else values <= 1.0
    distances = np.where(feasible, np.linalg.norm(grid - v, axis=-1), np.inf)
    best = np.unravel_index(np.argmin(distances), distances.shape)
    return grid[best], float(distances[best])


@pytest.mark.parametrize("exact", [False, True])
def test_projection_matches_brute_force_on_a_tiny_cost(exact):
    cost = Bilinear(1.0, 3.0, 0.5, target=1.6)
    lo = np.array([0.05, 0.1])
    for v in ([0.9, 0.9], [1.2, 0.3], [0.2, 1.1], [0.95, 0.05], [0.4, 0.3], [0.6, 0.45]):
        v = np.array(v)
        z, multiplier = dsa.project_to_budget(v, lo, np.ones(2), cost, tolerance=1e-7, exact=exact)
        best, distance = brute_force_projection(v, lo, cost, exact)
        assert cost.value(z) <= 1.0 + 1e-9 and np.all(z >= lo) and np.all(z <= 1.0)
        if exact or cost.value(np.clip(v, lo, 1.0)) > 1.0:
            assert cost.value(z) == pytest.approx(1.0, abs=1e-6)
        # The level-set band of the brute force (2e-3 in cost) lets its points sit up to ~2e-3 closer.
        slack = 3e-3 if exact else 1e-9
        assert float(np.linalg.norm(z - v)) <= distance + slack
        assert np.allclose(z, best, atol=5e-3 + slack)
        assert multiplier == 0.0 or cost.value(np.clip(v, lo, 1.0)) != pytest.approx(1.0)


def test_projection_of_the_real_macs_of_a_two_group_net_matches_brute_force():
    model, graph, cost_model = tiny_setup()
    budget = BudgetCost(parse_budget("flops=0.4"), cost_model)
    cost = dsa.SoftBudget(budget, graph.sizes)
    lo = dsa.ratio_floors(graph.sizes, 0.05).numpy()
    v = np.array([0.9, 0.8])
    z, _ = dsa.project_to_budget(v, lo, np.ones(2), cost, tolerance=1e-7)
    best, distance = brute_force_projection(v, lo, cost, exact=False, points=121)
    assert cost.value(z) == pytest.approx(1.0, abs=1e-6)
    # Nothing on the grid is nearer; along the boundary the distance is flat, so the grid's nearest point may sit
    # a few cells away.
    assert distance - 1e-2 <= float(np.linalg.norm(z - v)) <= distance + 1e-9
    assert np.allclose(z, best, atol=3e-2)


def test_an_infeasible_box_projects_to_its_floors():
    cost = Bilinear(1.0, 3.0, 0.5, target=0.1)
    lo = np.array([0.2, 0.2])
    z, multiplier = dsa.project_to_budget(np.array([0.9, 0.9]), lo, np.ones(2), cost)
    assert np.array_equal(z, lo) and multiplier == math.inf


# ---- ADMM and the method ------------------------------------------------------------------------------------------

def test_cost_rounding_stays_within_the_alphas_soft_cost():
    _, graph, cost_model = resnet20_setup()
    budget = BudgetCost(parse_budget("flops=0.5"), cost_model)
    alpha = torch.linspace(0.3, 0.9, len(graph.sizes), dtype=torch.float64)
    soft = float(budget.soft(alpha * cost_model.group_sizes))
    counts = dsa.cost_rounded_counts(alpha, graph.sizes, budget.hard, soft)
    assert budget.hard(counts) <= soft
    assert all(math.floor(a * s) <= c <= math.ceil(a * s) for a, s, c in zip(alpha.tolist(), graph.sizes, counts,
                                                                               strict=True))
    # Within one 64-wide channel's worth of MACs of the soft cost.
    assert budget.hard(counts) >= 0.99 * soft


@pytest.mark.parametrize("budget_text, latency", [("flops=0.5", None), ("params=0.4", None),
                                                  ("latency_ms=1.2@fake", FakeLatency)])
def test_admm_brings_the_alphas_hard_cost_within_2_percent_of_the_target(budget_text, latency):
    ctx = method_context(budget_text, latency=latency)
    dense_cost = ctx.budget.dense()
    assert ctx.budget.target < 0.65 * dense_cost  # alpha_init = 0.95 starts far over the budget
    result = dsa.run(ctx)
    info = result.info
    assert abs(info["alpha_cost_ratio"] - 1.0) <= 0.02
    assert info["alpha_cost_ratio"] == pytest.approx(ctx.budget.hard(result.keep_counts) / ctx.budget.target)
    assert info["primal_residual"] < 0.01 and info["admm_updates"] == info["steps"] // 5
    assert info["rho"] == pytest.approx(DSAParams().rho_final)
    trace = info["alpha_soft_cost_trace"]
    assert trace[0] > 1.2 * ctx.budget.target and trace[-1] == pytest.approx(ctx.budget.target, rel=0.02)
    # The kept channels are each group's top round(alpha C) by |gamma| after training.
    gammas = group_bn_gammas(ctx.model, ctx.graph)
    for mask, gamma, count in zip(result.keep_masks, gammas, info["alpha_keep_counts"], strict=True):
        assert int(mask.sum()) == count
        assert float(gamma[mask].min()) >= float(gamma[~mask].max()) if count < len(gamma) else True
    assert result.score_scale == "global" and [len(s) for s in result.scores] == ctx.graph.sizes
    assert not any(m._forward_hooks for m in ctx.model.modules())


def test_without_the_alpha_steps_the_ratios_do_not_meet_the_budget(monkeypatch):
    # The mechanism check: the same run with the ADMM step on alpha switched off ends where it started.
    monkeypatch.setattr(dsa.ADMMAllocation, "alpha_step", lambda self, grad: None)
    info = dsa.run(method_context("flops=0.5", epochs=2)).info
    assert info["alpha_cost_ratio"] > 1.5


def test_a_cancelled_run_resumes_to_the_same_masks_and_admm_state(tmp_path):
    straight = dsa.run(method_context("flops=0.5", epochs=2, checkpoint_dir=tmp_path / "a"))
    calls = {"n": 0}

    def cancel_after_five() -> bool:
        calls["n"] += 1
        return calls["n"] > 5

    with pytest.raises(Cancelled):
        dsa.run(method_context("flops=0.5", epochs=2, checkpoint_dir=tmp_path / "b", should_cancel=cancel_after_five))
    resumed = dsa.run(method_context("flops=0.5", epochs=2, checkpoint_dir=tmp_path / "b"))
    assert all(torch.equal(a, b) for a, b in zip(straight.keep_masks, resumed.keep_masks, strict=True))
    for key in ("alpha", "z", "u", "rho", "multiplier", "admm_updates", "alpha_soft_cost_trace", "steps"):
        assert resumed.info[key] == straight.info[key], key
    assert all(torch.equal(a, b) for a, b in zip(straight.scores, resumed.scores, strict=True))


def test_the_allocation_state_round_trips_through_its_state_dict():
    ctx = method_context("flops=0.5")
    cost = dsa.SoftBudget(ctx.budget, ctx.graph.sizes)
    floors = dsa.ratio_floors(ctx.graph.sizes, 0.05)
    first = dsa.ADMMAllocation(floors, cost, DSAParams(), total_steps=20)
    first.logits.grad = torch.randn_like(first.logits)
    first.after_step(ctx.model, 5)
    second = dsa.ADMMAllocation(floors, cost, DSAParams(), total_steps=20)
    second.load_state_dict(first.state_dict())
    for name in dsa.ADMMAllocation.state_fields:
        a, b = getattr(first, name), getattr(second, name)
        assert torch.equal(a.detach(), b.detach()) if isinstance(a, torch.Tensor) else a == b
    assert second.logits.requires_grad and second.updates == 1


def built_tiny(arch: str):
    def setup():
        torch.manual_seed(0)
        model = zoo.build_model(arch, 4, 3).eval()
        graph = ChannelGraph.build(model, (1, 3, 16, 16))
        return model, graph, CostModel(graph)
    return setup


@pytest.mark.parametrize("arch", ["resnet20", "resnet56", "resnet18", "mobilenet_v2"])
def test_architectures_at_tiny_size(arch):
    ctx = method_context("flops=0.5", epochs=1, setup=built_tiny(arch), samples=16, admm_interval_steps=1)
    ctx.train_loader = ctx.val_loader = random_loader(n=16, resolution=16)
    result = dsa.run(ctx)
    assert [len(m) for m in result.keep_masks] == ctx.graph.sizes
    assert all(1 <= int(m.sum()) <= len(m) for m in result.keep_masks)
    assert result.info["steps"] == 2 and result.info["admm_updates"] == 2
    # Two ADMM steps do not converge, but they do move the ratios towards the budget.
    assert result.info["alpha_soft_cost_trace"][-1] < 0.95 ** 1.5 * ctx.budget.dense()


# ---- the pipeline -------------------------------------------------------------------------------------------------

def test_pipeline_meets_a_flops_budget(tmp_path):
    request = PruneRequest(arch="resnet20", dataset="synthetic:4x16", method="dsa", budget=Budget("flops", 0.5),
                           epochs=1, finetune_epochs=1, params={"admm_interval_steps": 1})
    report = run_prune(request, tmp_path)
    assert report["pruned"]["macs"] <= 0.5 * report["dense"]["macs"]
    info = report["method_info"]
    assert "alpha_cost_ratio" in info and info["score_scale"] == "global"
    assert (tmp_path / "model.onnx").exists()


def test_pipeline_meets_a_latency_budget(tmp_path):
    latency = PipelineLatency("resnet20", 16, 3, bias=1.0)
    dense_ms = float(latency.cost_model.dense_macs) / 1e6
    request = PruneRequest(arch="resnet20", dataset="synthetic:4x16", method="dsa",
                           budget=Budget("latency_ms", 0.5 * dense_ms, "fake"), epochs=1, finetune_epochs=0,
                           resolution=16, params={"admm_interval_steps": 1})
    report = run_prune(request, tmp_path, latency=latency)
    assert report["latency_ms"]["pruned"]["measured"] <= 0.5 * dense_ms * 1.05
    assert report["method_info"]["alpha_soft_cost_trace"][0] > 0.5 * dense_ms
