import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode


def test_dense_cost_matches_independent_count(engine_case):
    arch, resolution, model, graph, cost = engine_case
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, resolution, resolution))
    assert cost.dense_macs == pytest.approx(counter.get_total_flops() / 2, rel=0.005)
    assert cost.dense_params == sum(p.numel() for p in model.parameters())
    assert float(cost.macs(cost.group_sizes)) == pytest.approx(cost.dense_macs)


def test_soft_cost_gradient_points_the_right_way(engine_case):
    _, _, _, graph, cost = engine_case
    counts = (cost.group_sizes * 0.6).clone().requires_grad_(True)
    macs = cost.macs(counts)
    macs.backward()
    grad = counts.grad
    assert bool((grad > 0).all()), "removing channels from any group must lower MACs"
    with torch.no_grad():
        stepped = counts - 0.5 * grad / grad.norm() * cost.group_sizes.mean()
        assert float(cost.macs(stepped)) < float(macs)
    params_counts = (cost.group_sizes * 0.6).clone().requires_grad_(True)
    cost.params(params_counts).backward()
    assert bool((params_counts.grad > 0).all())


def test_soft_cost_is_bilinear_between_integers(built):
    _, graph, cost = built("resnet20", 32)
    a = cost.group_sizes * 0.5
    b = cost.group_sizes * 0.75
    mid = cost.macs((a + b) / 2)
    # A bilinear function is not linear: the midpoint differs from the mean of the ends by the cross term.
    assert float(mid) < (float(cost.macs(a)) + float(cost.macs(b))) / 2
    assert float(cost.macs(a)) < float(mid) < float(cost.macs(b))


def test_wrong_count_length_is_an_error(built):
    _, _, cost = built("resnet20", 32)
    with pytest.raises(ValueError, match="keep counts"):
        cost.macs(torch.ones(3))
