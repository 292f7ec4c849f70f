"""SPP: the increment function, probabilities that move by exactly its increments and end at 0 or 1, the removed
set, the Bernoulli masks' statistics, the finisher's order, exact resume, the architectures, and whole jobs."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from pruning.budget import Budget, BudgetCost, parse_budget
from pruning.groups import ChannelGraph
from pruning.importance import L1Importance
from pruning.methods import spp
from pruning.methods.api import MethodContext, NotApplicable
from pruning.methods.spp_params import SPPParams
from pruning.pipeline import PruneRequest, run_prune
from pruning.registry import get_method
from pruning.train import Cancelled
from tests.pruning.helpers import CancelAfter, arch_setup
from tests.pruning.test_wgates import PipelineLatency, random_loader, tiny_setup

torch.set_num_threads(1)

# A schedule short enough for tests: one update per step, large increments (tiny_setup's groups finish in ~10).
FAST = {"interval_steps": 1, "increment_scale": 0.5, "fit_to_epochs": False}


def spp_context(budget_text: str = "flops=0.5", epochs: int = 3, setup=tiny_setup, loader=None, latency=None,
                **params) -> MethodContext:
    model, graph, cost = setup()
    budget = BudgetCost(parse_budget(budget_text), cost, latency(cost) if latency else None)
    loader = loader or random_loader()
    return MethodContext(model=model, graph=graph, cost_model=cost, budget=budget,
                         params=SPPParams(**{**FAST, **params}), train_loader=loader, val_loader=loader,
                         device=torch.device("cpu"), epochs=epochs, lr=0.01)


class RecordingSchedule(spp.ProbabilitySchedule):
    """The method's schedule, remembered so a test can read its final probabilities."""

    made: list[spp.ProbabilitySchedule] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingSchedule.made.append(self)


@pytest.fixture
def recorded(monkeypatch):
    RecordingSchedule.made = []
    monkeypatch.setattr(spp, "ProbabilitySchedule", RecordingSchedule)
    return RecordingSchedule.made


def test_spp_is_registered_as_a_training_method_with_the_papers_defaults():
    info = get_method("spp")
    assert info.target == "pruning.methods.spp:run" and info.trains
    p = info.validate_params({})
    assert (p.increment_scale, p.center_share, p.interval_steps) == (0.05, 0.25, 180)


@pytest.mark.parametrize("field, value", [("increment_scale", float("nan")), ("center_share", float("inf")),
                                          ("center_share", 0.5), ("interval_steps", 0), ("schedule_share", 0.0)])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        get_method("spp").validate_params({field: value})


@pytest.mark.parametrize("prune_count", [1, 3, 8, 20])
def test_increment_is_the_papers_center_symmetric_exponential(prune_count):
    scale, u = 0.05, 0.25
    a = math.log(2 / u) / prune_count
    center = -math.log(u) / a
    ranks = torch.arange(3 * prune_count + 2)
    delta = spp.increments(prune_count, ranks, scale, u)
    assert float(delta[0]) == pytest.approx(scale)
    assert float(spp.increments(prune_count, torch.tensor([center]), scale, u)[0]) == pytest.approx(u * scale)
    # Exactly the R*N_g weakest ranks gain, the rest lose; the rank R*N_g itself is the zero crossing.
    assert bool((delta[:prune_count] > 0).all()) and bool((delta[prune_count + 1:] < 0).all())
    assert abs(float(delta[prune_count])) < 1e-12
    # Center symmetry: Delta(N_c - x) + Delta(N_c + x) = 2uA.
    x = torch.linspace(0, center, 7, dtype=torch.float64)
    pair = spp.increments(prune_count, center - x, scale, u) + spp.increments(prune_count, center + x, scale, u)
    assert torch.allclose(pair, torch.full_like(pair, 2 * u * scale))
    expected = [scale * math.exp(-a * r) if r <= center else 2 * u * scale - scale * math.exp(-a * (2 * center - r))
                for r in ranks.tolist()]
    assert torch.allclose(delta, torch.tensor(expected, dtype=torch.float64))


def test_every_update_moves_p_by_exactly_the_increment_of_its_l1_rank_clipped():
    ctx = spp_context(increment_scale=0.3)
    schedule = spp.ProbabilitySchedule(ctx.graph, [3, 4], 0.3, 0.25, interval_steps=2)
    schedule.after_step(ctx.model, 1)  # not an update step
    assert schedule.updates_done == 0 and all(float(p.abs().sum()) == 0 for p in schedule.probabilities)
    for update in range(1, 5):
        before = [p.clone() for p in schedule.probabilities]
        with torch.no_grad():  # new weights each time, so the ranks change between updates
            for layer in (ctx.model[0], ctx.model[3]):
                layer.weight.normal_()
        scores = L1Importance()(ctx.model, ctx.graph)
        schedule.after_step(ctx.model, 2 * update)
        assert schedule.updates_done == update
        for g, (old, new, score) in enumerate(zip(before, schedule.probabilities, scores, strict=True)):
            ranks = torch.argsort(torch.argsort(score, stable=True))
            expected = (old + spp.increments(schedule.prune_counts[g], ranks, 0.3, 0.25)).clamp(0, 1)
            if schedule.done_at_step[g] == 2 * update:  # finished now: the rest snap to p = 0
                expected = torch.where(expected == 1, expected, torch.zeros_like(expected))
            assert torch.equal(new, expected)


def test_probabilities_end_at_exactly_0_or_1_with_the_target_count_at_1_and_stop_moving():
    ctx = spp_context()
    schedule = spp.ProbabilitySchedule(ctx.graph, [3, 4], 0.5, 0.25, interval_steps=1)
    needed = spp.planned_updates([3, 4], 0.5, 0.25)
    for step in range(1, needed + 1):
        schedule.after_step(ctx.model, step)  # fixed weights: fixed ranks, the planned count is exact
    assert schedule.all_done() and schedule.updates_done == needed
    for p, count in zip(schedule.probabilities, [3, 4], strict=True):
        assert set(p.tolist()) == {0.0, 1.0} and int((p == 1).sum()) == count
    # The weakest channels by L1 are the ones at p = 1.
    for p, score, count in zip(schedule.probabilities, L1Importance()(ctx.model, ctx.graph), [3, 4], strict=True):
        assert torch.equal(p == 1, torch.zeros_like(p, dtype=torch.bool).index_fill(0, score.argsort()[:count],
                                                                                     True))
    frozen = [p.clone() for p in schedule.probabilities]
    schedule.after_step(ctx.model, needed + 1)
    assert all(torch.equal(a, b) for a, b in zip(frozen, schedule.probabilities, strict=True))


def test_a_finished_group_removes_exactly_its_count_even_when_the_zero_crossing_holds_one_more_at_1():
    ctx = spp_context()
    schedule = spp.ProbabilitySchedule(ctx.graph, [1, 4], 0.1, 0.25, interval_steps=1)
    # Rank 0 reaches 1 now; the channel at rank 1 = R*N_g already sits at 1 and gets Delta = 0 (up to rounding).
    assert abs(float(spp.increments(1, torch.tensor([1]), 0.1, 0.25)[0])) < 1e-15
    schedule.probabilities[0] = torch.tensor([0.9, 1, 0, 0, 0.5, 0, 0, 0], dtype=torch.float64)
    scores = [torch.arange(8.0), torch.arange(12.0)]
    schedule.update(scores, step=7)
    assert schedule.done_at_step[0] == 7
    assert schedule.probabilities[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]


def test_bernoulli_masks_keep_each_channel_with_probability_one_minus_p():
    ctx = spp_context()
    schedule = spp.ProbabilitySchedule(ctx.graph, [3, 4], 0.5, 0.25, interval_steps=1)
    schedule.probabilities = [torch.tensor([0, 0.1, 0.25, 0.5, 0.75, 0.9, 1, 0.5], dtype=torch.float64),
                              torch.linspace(0, 1, 12, dtype=torch.float64)]
    masks = spp.BernoulliMasks(ctx.model, schedule)
    torch.manual_seed(0)
    draws = 4000
    kept = [torch.zeros(n) for n in ctx.graph.sizes]
    for _ in range(draws):
        masks.draw(training=True)
        for total, current in zip(kept, masks.current, strict=True):
            total += current.float()
    for total, p in zip(kept, schedule.probabilities, strict=True):
        keep = 1 - p.float()
        share = total / draws
        sigma = (keep * (1 - keep) / draws).sqrt()
        assert bool(((share - keep).abs() <= 5 * sigma + 1e-9).all()), (share, keep)
    # p = 0 is always kept, p = 1 never: exact, not only statistical.
    assert kept[0][0] == draws and kept[0][6] == 0
    # The draws come from torch's global RNG: the same seed gives the same masks (what makes resume exact).
    torch.manual_seed(3)
    masks.draw(training=True)
    first = [m.clone() for m in masks.current]
    torch.manual_seed(3)
    masks.draw(training=True)
    assert all(torch.equal(a, b) for a, b in zip(first, masks.current, strict=True))
    masks.remove()


def test_the_mask_multiplies_the_scale_layers_output_drawn_in_training_and_p_below_1_in_eval():
    ctx = spp_context()
    model = ctx.model
    schedule = spp.ProbabilitySchedule(ctx.graph, [3, 4], 0.5, 0.25, interval_steps=1)
    schedule.probabilities[1] = torch.tensor([1, 0] * 6, dtype=torch.float64)
    schedule.probabilities[0] = torch.full((8,), 0.5, dtype=torch.float64)
    masks = spp.BernoulliMasks(model, schedule)
    seen = {}
    model[5].register_forward_hook(lambda _m, inputs, _o: seen.update(bn=inputs[0].detach()))
    model.train()
    torch.manual_seed(0)
    model(torch.randn(4, 3, 8, 8))
    # Group 1 at p in {0, 1}: its BN output is zero exactly where p = 1.
    zero = seen["bn"].abs().amax(dim=(0, 2, 3)) == 0
    assert torch.equal(zero, schedule.probabilities[1] == 1)
    assert not bool(masks.current[0].all()) and bool(masks.current[0].any())  # p = 0.5: a real draw
    model.eval()
    model(torch.randn(4, 3, 8, 8))
    assert bool(masks.current[0].all()) and torch.equal(masks.current[1], schedule.probabilities[1] < 1)
    masks.remove()
    model(torch.randn(4, 3, 8, 8))
    assert not bool((seen["bn"].abs().amax(dim=(0, 2, 3)) == 0).any())


def test_run_removes_exactly_the_p1_channels_and_meets_the_allocation(recorded):
    ctx = spp_context(epochs=3)
    selection = spp.run(ctx)
    schedule = recorded[0]
    assert schedule.all_done() and selection.info["all_done"]
    assert all(torch.equal(k, p < 1) for k, p in zip(selection.keep_masks, schedule.probabilities, strict=True))
    assert [int((p == 1).sum()) for p in schedule.probabilities] == schedule.prune_counts
    assert ctx.budget.fits(selection.keep_counts) and selection.score_scale == "global"
    # Eval-mode masks are the removal: the masked network and the materialized one agree.
    assert selection.info["accuracy_masked"] == selection.info["accuracy_after_removal"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in selection.model.modules())


def test_an_unfinished_schedule_leaves_the_finisher_scores_ranking_p1_last_then_by_1_minus_p(recorded):
    ctx = spp_context(epochs=1, increment_scale=0.3)  # 4 updates: group 1 cannot finish
    selection = spp.run(ctx)
    schedule = recorded[0]
    assert not selection.info["all_done"] and selection.info["updates_done"] == 4
    l1 = [s / s.mean() for s in L1Importance()(selection.model, ctx.graph)]
    flat = [(float(s), float(p), float(w)) for scores, ps, ws in zip(selection.scores, schedule.probabilities, l1,
                                                                     strict=True)
            for s, p, w in zip(scores, ps, ws, strict=True)]
    by_score = sorted(flat)
    assert len({s for s, _, _ in flat}) == len(flat)  # one order over all groups, no ties
    ones = sum(p == 1 for _, p, _ in flat)
    assert ones > 0 and all(p == 1 for _, p, _ in by_score[:ones])  # removed channels first
    assert 0 < sum(0 < p < 1 for _, p, _ in flat)
    # Then the most probable to be pruned, equal probabilities by ascending L1.
    rest = [(-p, w) for _, p, w in by_score[ones:]]
    assert rest == sorted(rest)
    assert all(torch.equal(k, p < 1) for k, p in zip(selection.keep_masks, schedule.probabilities, strict=True))


def test_fit_to_epochs_shortens_the_interval_then_scales_the_increments_to_the_planned_updates():
    params = SPPParams()
    counts = [3, 16]
    updates = spp.planned_updates(counts, 0.05, 0.25)
    assert updates == max(math.ceil(1 / float(spp.increments(k, torch.tensor([k - 1]), 0.05, 0.25)[0]))
                          for k in counts)
    assert spp.planned_schedule(params, counts, 10**7) == (180, 0.05)
    assert spp.planned_schedule(params, counts, 4 * updates) == (3, 0.05)  # 3 * updates <= 0.75 * steps
    # Fewer steps than updates: one update per step, and A grows so the updates fit in 0.75 * 100 steps.
    interval, scale = spp.planned_schedule(params, counts, 100)
    assert interval == 1 and scale == pytest.approx(0.05 * updates / 75)
    assert 70 <= spp.planned_updates(counts, scale, 0.25) <= 75
    assert spp.planned_schedule(params, counts, 10) == (1, 1.0)  # A is at most 1
    assert spp.planned_schedule(SPPParams(fit_to_epochs=False), counts, 10) == (180, 0.05)
    assert spp.planned_schedule(params, [0, 0], 10) == (180, 0.05)


def test_a_cancelled_run_resumes_to_the_uninterrupted_result(tmp_path, recorded):
    params = {"increment_scale": 0.2, "interval_steps": 2}
    whole = spp.run(spp_context(epochs=4, **params))
    ctx = spp_context(epochs=4, **params)
    ctx.checkpoint_dir = tmp_path
    ctx.should_cancel = CancelAfter(5)  # mid-epoch, between two updates, with probabilities in (0, 1)
    with pytest.raises(Cancelled):
        spp.run(ctx)
    assert any(bool(((p > 0) & (p < 1)).any()) for p in recorded[1].probabilities)
    ctx.should_cancel = None
    resumed = spp.run(ctx)
    assert all(torch.equal(a, b) for a, b in zip(whole.keep_masks, resumed.keep_masks, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(recorded[0].probabilities, recorded[2].probabilities, strict=True))
    for key in ("updates_done", "done_at_step", "steps", "accuracy_after_removal"):
        assert resumed.info[key] == whole.info[key]
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet20", "resnet56", "resnet18", "mobilenet_v2"])
def test_spp_prunes_every_architecture_family(arch):
    resolution = 8 if arch.startswith("resnet") and arch != "resnet18" else 16
    loader = random_loader(n=16, batch=8, resolution=resolution)
    ctx = spp_context("flops=0.6", epochs=1, setup=arch_setup(arch, resolution), loader=loader,
                      increment_scale=1.0)
    spp.check(ctx.model, ctx.graph, ctx.params)
    selection = spp.run(ctx)
    # A = 1 puts the weakest channel of each group at p = 1 on the first update; the rest move on the second.
    assert selection.info["updates_done"] == 2 and selection.info["groups_done"] >= 1
    assert [len(s) for s in selection.scores] == ctx.graph.sizes
    assert all(bool(m.any()) for m in selection.keep_masks)
    assert selection.info["accuracy_masked"] == pytest.approx(selection.info["accuracy_after_removal"], abs=0.07)


def test_check_refuses_a_model_without_maskable_groups():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    graph = ChannelGraph.build(model, (1, 3, 2, 2))
    with pytest.raises(NotApplicable, match="spp"):
        spp.check(model, graph, SPPParams())


def test_pipeline_prunes_resnet20_to_a_flops_budget(tmp_path):
    request = PruneRequest(arch="resnet20", dataset="synthetic:10x8", method="spp", budget=Budget("flops", 0.5),
                           epochs=1, finetune_epochs=0, resolution=8, params=FAST)
    report = run_prune(request, tmp_path)
    assert report["pruned"]["macs"] <= 0.5 * report["dense"]["macs"]
    info = report["method_info"]
    assert info["score_scale"] == "global" and info["updates_done"] >= 1


@pytest.mark.slow
def test_pipeline_meets_a_latency_budget_measured_on_the_device(tmp_path):
    latency = PipelineLatency("resnet20", 8, 3, bias=1.3)
    target = 0.5 * float(latency.cost_model.dense_macs) / 1e6
    request = PruneRequest(arch="resnet20", dataset="synthetic:10x8", method="spp",
                           budget=Budget("latency_ms", target, "fake"), epochs=1, finetune_epochs=0,
                           resolution=8, params=FAST)
    report = run_prune(request, tmp_path, latency=latency)
    assert report["latency_ms"]["pruned"]["measured"] <= target * 1.05
    assert report["method_info"]["keep_counts"] != report["group_sizes"]
