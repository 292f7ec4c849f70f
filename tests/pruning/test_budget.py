import pytest
import torch

from pruning.allocation import global_ranking
from pruning.allocation import trim_masks as trim_to_budget
from pruning.budget import Budget, BudgetCost, BudgetError, parse_budget
from pruning.methods.api import MethodContext
from pruning.methods.l1 import run as run_l1
from pruning.methods.l1_params import L1Params


def l1_counts(model, graph, cost, budget, **params):
    ctx = MethodContext(model=model, graph=graph, cost_model=cost, budget=BudgetCost(budget, cost),
                        params=L1Params(**params), train_loader=None, val_loader=None, device=torch.device("cpu"),
                        epochs=0, lr=0.0)
    result = run_l1(ctx)
    return [int(m.sum()) for m in result.keep_masks], ctx.budget


@pytest.mark.parametrize("arch,resolution", [("resnet56", 32), ("vgg16_bn", 32), ("mobilenet_v2", 64)])
@pytest.mark.parametrize("budget", ["flops=0.5", "flops=0.3", "params=0.4"])
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_bisection_lands_within_two_percent_below(built, arch, resolution, budget, allocation):
    model, graph, cost = built(arch, resolution)
    counts, budget_cost = l1_counts(model, graph, cost, parse_budget(budget), allocation=allocation)
    achieved = budget_cost.hard(counts)
    assert achieved <= budget_cost.target
    assert achieved >= 0.98 * budget_cost.target


def test_rounding_keeps_multiples_and_fits(built):
    model, graph, cost = built("resnet56", 32)
    counts, budget_cost = l1_counts(model, graph, cost, parse_budget("flops=0.5"), round_to=8)
    assert all(c % 8 == 0 or c == s for c, s in zip(counts, graph.sizes, strict=True))
    assert budget_cost.hard(counts) <= budget_cost.target


def test_absolute_macs_budget(built):
    model, graph, cost = built("resnet20", 32)
    counts, budget_cost = l1_counts(model, graph, cost, parse_budget("macs=1e7"))
    assert 0.98e7 <= float(cost.macs(counts)) <= 1e7


def test_impossible_budget_is_a_clear_error(built):
    model, graph, cost = built("resnet20", 32)
    with pytest.raises(BudgetError, match="raise it"):
        l1_counts(model, graph, cost, parse_budget("macs=10"))
    # Rounding raises the smallest configuration: the message says so (it fits unrounded).
    one_each = float(cost.macs([1] * len(graph.sizes)))
    with pytest.raises(BudgetError, match="lower round_to"):
        l1_counts(model, graph, cost, parse_budget(f"macs={2 * one_each:.0f}"), round_to=16)
    assert l1_counts(model, graph, cost, parse_budget(f"macs={2 * one_each:.0f}"))[0]


def test_finisher_removes_least_important_until_fit(built):
    _, graph, cost = built("resnet20", 32)
    scores = [torch.arange(s, dtype=torch.float32) for s in graph.sizes]
    masks = [torch.ones(s, dtype=torch.bool) for s in graph.sizes]
    budget_cost = BudgetCost(parse_budget("flops=0.6"), cost)
    trimmed, removed = trim_to_budget(scores, masks, budget_cost.fits)
    counts = [int(m.sum()) for m in trimmed]
    assert budget_cost.fits(counts) and removed == sum(graph.sizes) - sum(counts) > 0
    # The lowest-scoring channel (index 0) goes first in every group that lost channels.
    for mask, size in zip(trimmed, graph.sizes, strict=True):
        if int(mask.sum()) < size:
            assert not bool(mask[0])
    untouched, zero = trim_to_budget(scores, trimmed, budget_cost.fits)
    assert zero == 0


def test_global_ranking_puts_each_groups_best_first():
    scores = [torch.tensor([0.1, 0.9]), torch.tensor([0.01, 0.02, 0.03])]
    ranking = global_ranking(scores)
    assert ranking[:2] == [(0, 1), (1, 2)]
    assert len(ranking) == 5


@pytest.mark.parametrize("text,expected", [
    ("flops=0.5", Budget("flops", 0.5)),
    ("macs=2e7", Budget("macs", 2e7)),
    ("latency_ms=3.5@cpu-1t", Budget("latency_ms", 3.5, "cpu-1t")),
])
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text,message", [
    ("flops=1.5", "fraction"), ("flops=0", "positive"), ("speed=3", "unknown budget kind"),
    ("latency_ms=3", "needs a device"), ("flops", "cannot parse"), ("flops=abc", "cannot parse"),
])
def test_parse_budget_rejects(text, message):
    with pytest.raises(BudgetError, match=message):
        parse_budget(text)


def test_latency_budget_without_predictor_is_an_error(built):
    _, _, cost = built("resnet20", 32)
    with pytest.raises(BudgetError, match="latency predictor"):
        BudgetCost(parse_budget("latency_ms=2@dev"), cost)
