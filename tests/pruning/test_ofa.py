"""OFARPruning: early-bird rule, threshold masks per resolution, sandwich sampling, member materialization."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from pruning import surgery
from pruning.budget import Budget, BudgetCost
from pruning.cohort import plan_cohort
from pruning.importance import group_bn_gammas
from pruning.methods import ofa
from pruning.methods.api import MethodContext
from pruning.pipeline import PruneRequest
from pruning.registry import get_method
from pruning.surgery import channel_scales, materialize


def randomize_gammas(model: torch.nn.Module) -> None:
    """Distinct BN gammas and statistics, so rankings and masked outputs are not trivially uniform."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) * 0.9 + 0.1)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def masks_of(*bits: str) -> list[torch.Tensor]:
    return [torch.tensor([c == "1" for c in b]) for b in bits]


def test_early_bird_needs_patience_consecutive_similar_epochs():
    assert not ofa.early_bird_reached([], 0.99, 3)
    assert not ofa.early_bird_reached([0.995, 0.999], 0.99, 3)
    assert ofa.early_bird_reached([0.5, 0.995, 0.99, 1.0], 0.99, 3)
    # A dip inside the window resets the count.
    assert not ofa.early_bird_reached([0.995, 0.999, 0.98, 0.999, 1.0], 0.99, 3)
    assert ofa.early_bird_reached([0.995, 0.999, 0.98, 0.999, 1.0, 0.991], 0.99, 3)
    assert ofa.early_bird_reached([0.9], 0.9, 1)
    with pytest.raises(ValueError):
        ofa.early_bird_reached([1.0], 0.99, 0)


def test_mask_similarity_is_cosine_and_the_worst_member_counts():
    a = [masks_of("1100", "10"), masks_of("1111", "11")]
    assert ofa.mask_similarity(a, a) == pytest.approx(1.0)
    b = [masks_of("1100", "10"), masks_of("0011", "11")]  # second member: 4 shared of 6 and 4 -> 4/sqrt(24)
    assert ofa.mask_similarity(a, b) == pytest.approx(4 / 24 ** 0.5)
    disjoint = [masks_of("0011", "01"), masks_of("1111", "11")]
    assert ofa.mask_similarity(a, disjoint) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        ofa.mask_similarity(a, a[:1])


def test_masks_roundtrip_through_json_encoding():
    structures = [masks_of("1010", "111"), masks_of("0001", "100")]
    decoded = ofa.decode_masks(ofa.encode_masks(structures))
    assert all(torch.equal(x, y) for a, b in zip(structures, decoded, strict=True) for x, y in zip(a, b, strict=True))


def test_sandwich_always_has_largest_first_and_smallest_and_samples_cover_the_rest():
    costs = [10.0, 3.0, 7.0, 1.0, 5.0, 9.0]
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        plan = ofa.sandwich_members(costs, 2, gen)
        assert plan[0] == 0 and plan[1] == 3  # largest, then smallest
        assert len(plan) == 4 and len(set(plan)) == 4
        seen.update(plan[2:])
    assert seen == {1, 2, 4, 5}
    assert ofa.sandwich_members(costs, 0, gen) == [0, 3]
    assert sorted(ofa.sandwich_members(costs, 50, gen)) == list(range(6))  # K larger than the cohort: everyone
    assert ofa.sandwich_members([4.0], 3, gen) == [0]
    with pytest.raises(ValueError):
        ofa.sandwich_members([], 1)


@functools.cache
def _graphs(resolutions: tuple[int, ...]):
    from pruning import zoo
    from pruning.cost import CostModel
    from pruning.groups import ChannelGraph

    torch.manual_seed(0)
    model = zoo.build_model("resnet20", num_classes=4, in_channels=3).eval()
    randomize_gammas(model)
    graphs = {r: ChannelGraph.build(model, (1, 3, r, r)) for r in resolutions}
    return model, graphs, {r: CostModel(g) for r, g in graphs.items()}


def test_threshold_masks_fit_each_budget_at_its_resolution_and_are_nested():
    model, graphs, costs = _graphs((32, 24))
    scores = group_bn_gammas(model, graphs[32])
    dense32 = costs[32].dense_macs
    budget_costs = [BudgetCost(Budget("macs", f * dense32), costs[r]) for f in (0.6, 0.3) for r in (32, 24)]
    structures = ofa.derive_masks(scores, budget_costs)
    counts = [[int(m.sum()) for m in masks] for masks in structures]
    for cost, c in zip(budget_costs, counts, strict=True):
        assert cost.fits(c)
        # The threshold is the lowest that fits: one more channel (the next in the ranking) would not.
        assert cost.hard(c) > 0.9 * cost.target or c == graphs[32].sizes
    # Same budget, lower resolution: each group keeps at least as many channels.
    assert all(a <= b for a, b in zip(counts[0], counts[1], strict=True))
    assert sum(counts[0]) < sum(counts[1])
    # One global ranking: the smaller budget's channels are a subset of the larger's.
    for small, large in zip(structures[2], structures[0], strict=True):
        assert bool((small & ~large).sum() == 0)


def test_threshold_counts_round_to_a_multiple():
    model, graphs, costs = _graphs((32, 24))
    scores = group_bn_gammas(model, graphs[32])
    cost = BudgetCost(Budget("macs", 0.5 * costs[32].dense_macs), costs[32])
    counts = ofa.threshold_counts(scores, cost.fits, round_to=8)
    assert cost.fits(counts) and all(c % 8 == 0 for c in counts)


def test_gamma_scores_average_over_a_groups_norms():
    model, graphs, _ = _graphs((32, 24))
    scores = group_bn_gammas(model, graphs[32])
    group = next(g for g in graphs[32].groups if len(g.scale_layers) > 1)
    expected = torch.stack([model.get_submodule(n).weight.detach().abs() for n in group.scale_layers]).mean(0)
    assert torch.allclose(scores[group.index], expected)


def test_sandwich_forward_trains_teacher_and_leaves_distillation_pending():
    model, graphs, costs = _graphs((32, 24))
    net_model = copy.deepcopy(model)
    small = [torch.zeros(s, dtype=torch.bool) for s in graphs[32].sizes]
    for m in small:
        m[:2] = True
    candidates = [(None, 32), (small, 24)]
    net = ofa.SandwichNet(net_model, graphs[32], candidates, [2.0, 1.0], sampled=1).train()
    x = torch.randn(4, 3, 32, 32)
    logits = net(x)
    assert net.last_plan == [0, 1]
    loss = net.take_distillation()
    assert loss.item() > 0 and loss.requires_grad
    assert net.take_distillation().item() == 0.0  # taken once
    (torch.nn.functional.cross_entropy(logits, torch.zeros(4, dtype=torch.long)) + loss).backward()
    assert net_model.conv1.weight.grad is not None
    net.eval()
    assert torch.equal(net(x), net_model.eval()(x))


def test_sliced_subnet_trains_like_the_masked_full_network():
    model, graphs, costs = _graphs((32, 24))
    graph = graphs[32]
    scores = group_bn_gammas(model, graph)
    masks = ofa.derive_masks(scores, [BudgetCost(Budget("macs", 0.3 * costs[32].dense_macs), costs[32])])[0]
    masked_model, sliced_model = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    x = torch.randn(6, 3, 24, 24)  # a member's resolution need not be the graph's
    with channel_scales(masked_model, graph, [m.float() for m in masks]):
        expected = masked_model(x)
    expected.pow(2).sum().backward()
    subnet = ofa.SlicedSubnet(sliced_model, graph, masks)
    out = subnet(dict(sliced_model.named_parameters()), x)
    out.pow(2).sum().backward()
    assert (out - expected).abs().max().item() <= 1e-4  # training mode: batch statistics per kept channel
    for (name, a), b in zip(masked_model.named_parameters(), sliced_model.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-4), name
    # The compact network really is smaller, and only the shared network holds trainable weights.
    assert sum(p.numel() for p in subnet.module.parameters()) < 0.5 * sum(p.numel() for p in model.parameters())
    assert not any(p.requires_grad for p in subnet.module.parameters())


def test_slice_indices_follow_the_masks():
    model, graphs, _ = _graphs((32, 24))
    graph = graphs[32]
    masks = [torch.ones(s, dtype=torch.bool) for s in graph.sizes]
    assert all(i is None for idx in surgery.slice_indices(model, graph, masks).values() for i in idx)
    group = graph.groups[0]
    masks[0] = torch.zeros(group.size, dtype=torch.bool)
    masks[0][[1, 4, 5]] = True
    indices = surgery.slice_indices(model, graph, masks)
    root = indices[f"{group.root}.weight"]
    assert root[0].tolist() == [1, 4, 5] and root[1:] == [None] * (len(root) - 1)
    consumers = [n for n, idx in indices.items() if len(idx) > 1 and idx[1] is not None]
    assert consumers and all(indices[n][1].tolist() == [1, 4, 5] for n in consumers)
    compact = materialize(model, graph, masks)
    gathered = surgery.gather_params(dict(model.named_parameters()), indices)
    assert all(torch.equal(gathered[n], p) for n, p in compact.named_parameters())


def test_resize_changes_only_spatial_size():
    x = torch.randn(2, 3, 32, 32)
    assert ofa.resize(x, 32) is x
    assert ofa.resize(x, 24).shape == (2, 3, 24, 24)


def test_recalibrate_bn_estimates_statistics_from_batches():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    batches = [(torch.full((4, 1, 2, 2), 3.0) + torch.randn(4, 1, 2, 2) * 0.01, None) for _ in range(3)]
    used = ofa.recalibrate_bn(model, batches, 2)
    assert used == 2 and not model.training
    assert torch.allclose(model[1].running_mean, torch.full((2,), 3.0), atol=0.01)
    assert model[1].momentum == 0.1  # restored
    with pytest.raises(ValueError):
        ofa.recalibrate_bn(model, [], 2)


def test_registry_entry_and_single_subnet_use_is_refused():
    info = get_method("ofa")
    assert info.produces_cohort and not get_method("l1").produces_cohort
    params = info.validate_params({"budgets": [0.75, 0.5], "resolutions": [32, 24]})
    assert params.budgets == [0.75, 0.5] and params.early_bird_patience == 3
    for bad in ({"budgets": [0.5, -1]}, {"resolutions": [2]}, {"budgets": [0.5, 0.5]}, {"bogus": 1}):
        with pytest.raises(ValueError):
            info.validate_params(bad)
    model, graphs, costs = _graphs((32, 24))
    ctx = MethodContext(model=model, graph=graphs[32], cost_model=costs[32], budget=None, params=params,
                        train_loader=None, val_loader=None, device=torch.device("cpu"), epochs=1, lr=0.01)
    with pytest.raises(ValueError, match="cohort"):
        ofa.run(ctx)


@pytest.fixture(scope="module")
def trained_cohort(tmp_path_factory):
    request = PruneRequest(arch="resnet20", dataset="synthetic:4x16", method="ofa", budget=Budget("flops", 0.5),
                           epochs=2, finetune_epochs=1, batch_size=32,
                           params={"budgets": [0.6, 0.3], "resolutions": [16, 12], "recalibration_batches": 2})
    plan = plan_cohort(request, checkpoint_dir=tmp_path_factory.mktemp("ofa-ckpt"))
    return plan, ofa.run(plan.ctx)


def test_every_member_materializes_to_the_shared_networks_masked_outputs(trained_cohort):
    plan, result = trained_cohort
    shared = result.model.eval()
    assert len(result.structures) == len(plan.ctx.members) == 4
    torch.manual_seed(1)
    for spec, masks in zip(plan.ctx.members, result.structures, strict=True):
        x = torch.randn(3, 3, spec.resolution, spec.resolution)
        graph = plan.ctx.graphs[spec.resolution]
        with torch.no_grad(), channel_scales(shared, graph, [m.float() for m in masks]):
            masked = shared(x)
        compact = materialize(shared, graph, masks).eval()
        with torch.no_grad():
            out = compact(x)
        assert (masked - out).abs().max().item() <= 1e-4
        assert sum(p.numel() for p in compact.parameters()) <= sum(p.numel() for p in shared.parameters())


def test_search_records_similarities_and_members_fit_their_budgets(trained_cohort):
    plan, result = trained_cohort
    search = result.info["search"]
    assert search["epochs_run"] == 2 and len(search["similarities"]) == 1
    assert result.info["joint"]["steps"] > 0
    dense16 = plan.ctx.cost_models[16].dense_macs
    for spec, masks in zip(plan.ctx.members, result.structures, strict=True):
        macs = float(plan.ctx.cost_models[spec.resolution].macs([int(m.sum()) for m in masks]))
        assert macs <= spec.value * dense16


def test_search_stops_early_once_masks_settle(tmp_path):
    # Zero learning rate: the gammas never move, so every epoch's masks equal the last ones.
    request = PruneRequest(arch="resnet20", dataset="synthetic:4x16", method="ofa", budget=Budget("flops", 0.5),
                           epochs=8, finetune_epochs=0, batch_size=64, lr=1e-12,
                           params={"budgets": [0.5], "resolutions": [16], "early_bird_patience": 2,
                                   "recalibration_batches": 1})
    events = []
    plan = plan_cohort(request, progress=events.append, checkpoint_dir=tmp_path)
    result = ofa.run(plan.ctx)
    assert result.info["search"]["early_bird_epoch"] == 3  # similarities at epochs 2 and 3
    assert result.info["search"]["similarities"] == pytest.approx([1.0, 1.0])
    assert max(e.get("epoch") or 0 for e in events if e.get("stage") == "search") == 3
    # Resuming a stopped search does not train again.
    events.clear()
    again = ofa.run(plan_cohort(request, progress=events.append, checkpoint_dir=tmp_path).ctx)
    assert again.info["search"] == result.info["search"]
    assert not [e for e in events if e.get("loss") is not None]
