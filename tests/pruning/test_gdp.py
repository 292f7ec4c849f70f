"""GDP: polarized gates, exact snapping, eps annealing across a resume, exact folding at materialization, and the
pipeline under flops and latency budgets."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from pruning import zoo
from pruning.budget import Budget, BudgetCost, parse_budget
from pruning.cost import CostModel
from pruning.groups import ChannelGraph
from pruning.methods import gdp
from pruning.methods.api import MethodContext
from pruning.methods.gdp_params import GDPParams
from pruning.pipeline import PruneRequest, run_prune
from pruning.registry import get_method
from pruning.surgery import channel_scales, materialize
from pruning.train import Cancelled
from tests.pruning.conftest import randomize_norms
from tests.pruning.helpers import arch_setup
from tests.pruning.test_wgates import FakeLatency, random_loader, tiny_setup

# Few steps, so the tests push hard: lambda grows fast and theta may fall by 90% in a step.
FAST = {"lambda_init": 5.0, "lambda_rate": 0.3, "anneal_share": 0.5, "max_step_share": 0.9}


def method_context(budget_text: str = "flops=0.5", latency=None, epochs: int = 3, setup=tiny_setup, samples: int = 64,
                   resolution: int = 8, checkpoint_dir=None, should_cancel=None, **params) -> MethodContext:
    model, graph, cost = setup()
    budget = BudgetCost(parse_budget(budget_text), cost, latency(cost) if latency else None)
    loader = random_loader(n=samples, resolution=resolution)
    return MethodContext(model=model, graph=graph, cost_model=cost, budget=budget, params=GDPParams(**params),
                         train_loader=loader, val_loader=loader, device=torch.device("cpu"), epochs=epochs,
                         lr=0.01, checkpoint_dir=checkpoint_dir, should_cancel=should_cancel)


def test_gdp_is_registered_and_rejects_bad_params():
    info = get_method("gdp")
    assert info.target == "pruning.methods.gdp:run" and info.trains
    assert info.validate_params({"eps_end": 1e-5}).eps_end == 1e-5
    for field, value in [("gate_lr", -1.0), ("eps_start", float("nan")), ("lambda_max", float("inf")),
                         ("max_step_share", 1.0)]:
        with pytest.raises(ValidationError, match=field):
            info.validate_params({field: value})
    with pytest.raises(ValidationError, match="eps_end"):
        info.validate_params({"eps_start": 1e-4, "eps_end": 1e-3})


def test_gate_is_exactly_zero_at_zero_and_eps_falls_on_a_log_scale():
    theta = torch.tensor([0.0, 1e-4, 1e-2, 1.0])
    assert gdp.polarized_gate(theta, 1e-6)[0] == 0.0
    assert gdp.polarized_gate(theta, 1e-6).tolist() == pytest.approx([0.0, 1e-8 / (1e-8 + 1e-6), 1e-4 / (1e-4 + 1e-6),
                                                                       1 / (1 + 1e-6)])
    assert gdp.annealed_eps(0, 10, 1e-2, 1e-6) == pytest.approx(1e-2)
    assert gdp.annealed_eps(5, 10, 1e-2, 1e-6) == pytest.approx(1e-4)
    assert gdp.annealed_eps(10, 10, 1e-2, 1e-6) == gdp.annealed_eps(30, 10, 1e-2, 1e-6) == pytest.approx(1e-6)


def test_gated_model_equals_the_materialized_model_with_folded_gates():
    torch.manual_seed(0)
    model = zoo.build_model("resnet20", 10, 3).eval()
    randomize_norms(model)
    graph = ChannelGraph.build(model, (1, 3, 16, 16))
    gated = gdp.GatedNetwork(model, graph, 1.0, 1e-6, 0.1, 0.5).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for theta in gated.thetas:
            # About a third of the gates exactly 0, the rest anywhere in (0, 1).
            theta.copy_(torch.rand(theta.shape, generator=generator) * 2e-3)
            theta[torch.rand(theta.shape, generator=generator) < 0.35] = 0.0
            theta[0] = 1.0  # no group loses every channel
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        gated_out = gated(x)
        gates = [g.detach() for g in gated.gates()]
    bare = gated.remove()
    masks = [g > 0 for g in gates]
    assert all(0 < int(m.sum()) < m.numel() for m in masks)
    pruned = materialize(bare, graph, masks, gates).eval()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in bare.parameters())
    with torch.no_grad():
        assert float((pruned(x) - gated_out).abs().max()) <= 1e-4
        assert float((bare(x) - gated_out).abs().max()) > 1e-2  # the gates did change the function


def test_snapped_gates_are_held_at_exactly_zero_and_never_come_back(monkeypatch):
    records = []  # per step: closed_step and theta of every group, after the schedule's step
    real_after_step = gdp.PolarizationSchedule.after_step

    def recording_after_step(self, model, step):
        real_after_step(self, model, step)
        records.append(([c.clone() for c in self.closed_step], [t.detach().clone() for t in model.thetas]))

    monkeypatch.setattr(gdp.PolarizationSchedule, "after_step", recording_after_step)
    result = gdp.run(method_context(**FAST))
    assert len(records) == result.info["steps"] == 24
    final_closed, _ = records[-1]
    assert sum(int((c >= 0).sum()) for c in final_closed) > 0  # the mechanism did close gates
    for closed, thetas in records:
        for group_closed, theta, final in zip(closed, thetas, final_closed, strict=True):
            shut = group_closed >= 0
            assert bool((theta[shut] == 0).all())  # exactly 0, frozen
            assert bool((final[shut] == group_closed[shut]).all())  # never reopened, never re-dated
    assert [bool(m.any()) for m in result.keep_masks] == [True] * len(result.keep_masks)
    assert [torch.equal(m, c < 0) for m, c in zip(result.keep_masks, final_closed, strict=True)] == [True, True]


def test_a_pushed_snapped_gate_is_put_back_to_zero():
    model, graph, cost = tiny_setup()
    budget = BudgetCost(parse_budget("flops=0.5"), cost)
    params = GDPParams()
    schedule = gdp.PolarizationSchedule(params, budget, graph.sizes, anneal_steps=10, total_steps=20)
    gated = gdp.GatedNetwork(model, graph, 1.0, schedule.eps, params.gate_lr, params.max_step_share)
    gated(torch.randn(2, 3, 8, 8))
    schedule.penalty(gated, 0)
    with torch.no_grad():
        gated.thetas[0][2] = 1e-5  # g ~ 1e-6 at eps 1e-2: under snap_below
    schedule.after_step(gated, 1)
    assert int(schedule.closed_step[0][2]) == 1 and float(gated.thetas[0][2].detach()) == 0.0
    with torch.no_grad():
        gated.thetas[0][2] = 0.7  # whatever moved it, the schedule holds a closed gate at 0
    schedule.penalty(gated, 1)
    schedule.after_step(gated, 2)
    assert float(gated.thetas[0][2].detach()) == 0.0 and int(schedule.closed_step[0][2]) == 1
    gated.remove()


def test_gates_end_polarized_at_exactly_zero_or_at_least_a_half():
    result = gdp.run(method_context(**FAST))
    gates = torch.cat(list(result.scales))
    assert bool(((gates == 0) | (gates >= 0.5)).all()), gates
    assert int((gates == 0).sum()) > 0 and int((gates >= 0.5).sum()) > 0
    assert result.info["undecided_gates"] == 0
    assert [torch.equal(m, s > 0) for m, s in zip(result.keep_masks, result.scales, strict=True)] == [True, True]
    # Every closed gate ranks below every open one, for the finisher.
    scores = torch.cat(list(result.scores))
    assert float(scores[gates == 0].max()) < 0 < float(scores[gates > 0].min())
    assert result.score_scale == "global"


@pytest.mark.parametrize("eps_end", [1e-6, 1e-2])
def test_without_snapping_the_falling_gates_never_reach_zero(eps_end):
    # The control for the test above: with a snap threshold no gate reaches, the gates pushed down get small but
    # stay non-zero, annealed or not, and no channel can be removed.
    result = gdp.run(method_context(**{**FAST, "snap_below": 1e-30, "eps_end": eps_end}))
    gates = torch.cat(list(result.scales))
    assert bool(((gates > 0) & (gates < 0.5)).any()) and not bool((gates == 0).any())


def test_a_cancelled_run_resumes_to_the_uninterrupted_result_and_eps_schedule(tmp_path):
    whole = gdp.run(method_context(checkpoint_dir=tmp_path / "whole", **FAST))
    calls = {"n": 0}

    def cancel_after_seven_steps() -> bool:
        calls["n"] += 1
        return calls["n"] > 7

    with pytest.raises(Cancelled):
        gdp.run(method_context(checkpoint_dir=tmp_path / "cut", should_cancel=cancel_after_seven_steps, **FAST))
    resumed = gdp.run(method_context(checkpoint_dir=tmp_path / "cut", **FAST))
    assert resumed.info["resumed_from_step"] == 7 and whole.info["resumed_from_step"] is None
    assert [torch.equal(a, b) for a, b in zip(whole.keep_masks, resumed.keep_masks, strict=True)] == [True, True]
    assert all(torch.allclose(a, b) for a, b in zip(whole.scales, resumed.scales, strict=True))
    assert resumed.info["gate_keep_counts"] == whole.info["gate_keep_counts"]
    for key in ("eps_trace", "penalty_weight_trace", "cost_trace", "penalty_weight", "eps_final", "steps"):
        assert resumed.info[key] == pytest.approx(whole.info[key]), key
    steps, anneal = whole.info["steps"], 12
    assert resumed.info["eps_trace"] == pytest.approx([gdp.annealed_eps(s, anneal, 1e-2, 1e-6) for s in range(steps)])
    assert math.isclose(resumed.info["eps_final"], 1e-6, rel_tol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch,resolution", [("resnet20", 8), ("resnet56", 8), ("resnet18", 16),
                                             ("mobilenet_v2", 16)])
def test_gdp_runs_on_every_family_and_folds_exactly(arch, resolution):
    ctx = method_context(setup=arch_setup(arch, resolution), epochs=1, samples=16, resolution=resolution, **FAST)
    result = gdp.run(ctx)
    assert [len(m) for m in result.keep_masks] == ctx.graph.sizes and result.info["steps"] == 2
    x = torch.randn(2, 3, resolution, resolution)
    model = result.model.eval()
    with torch.no_grad(), channel_scales(model, ctx.graph, result.scales):
        gated_out = model(x)
    pruned = materialize(model, ctx.graph, result.keep_masks, result.scales).eval()
    with torch.no_grad():
        assert float((pruned(x) - gated_out).abs().max()) <= 1e-4


def test_check_rejects_a_model_without_prunable_groups():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    graph = ChannelGraph.build(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 2)), (1, 3, 8, 8))
    with pytest.raises(gdp.NotApplicable, match="gdp"):
        gdp.check(model, graph, GDPParams())


class PipelineLatency(FakeLatency):
    """FakeLatency over the cost model of the pipeline's resnet20 (4 classes, 8x8)."""

    def __init__(self):
        model = zoo.build_model("resnet20", 4, 3).eval()
        super().__init__(CostModel(ChannelGraph.build(model, (1, 3, 8, 8))), ms_per_mmac=1.0, bias=1.0)


@pytest.mark.slow
def test_pipeline_meets_a_flops_budget(tmp_path):
    request = PruneRequest(arch="resnet20", dataset="synthetic:4x8", method="gdp", budget=Budget("flops", 0.5),
                           epochs=1, finetune_epochs=0, batch_size=16, params=FAST)
    report = run_prune(request, tmp_path)
    assert report["pruned"]["macs"] <= 0.5 * report["dense"]["macs"]
    assert report["method_info"]["score_scale"] == "global" and "gate_keep_counts" in report["method_info"]


@pytest.mark.slow
def test_pipeline_meets_a_latency_budget(tmp_path):
    latency = PipelineLatency()
    target = 0.5 * float(latency.cost_model.dense_macs) / 1e6
    request = PruneRequest(arch="resnet20", dataset="synthetic:4x8", method="gdp",
                           budget=Budget("latency_ms", target, "fake"), epochs=1, finetune_epochs=0, batch_size=16,
                           params=FAST)
    report = run_prune(request, tmp_path, latency=latency)
    assert report["latency_ms"]["pruned"]["measured"] <= target * 1.05
    assert report["method_info"]["target"] == pytest.approx(target)
