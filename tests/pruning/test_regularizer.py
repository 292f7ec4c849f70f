"""Regularizers: the penalty reaches the loss, the schedule advances every step, and a resumed run continues the
schedule where the cancelled one stopped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pruning.regularizer import Regularizer
from pruning.train import Cancelled, CheckpointError, train
from tests.pruning.test_train import assert_same_state, cancel_after, loaders, state_of, tiny_net


class GrowingL2(Regularizer):
    """weight * sum of squared parameters, the weight multiplied by `growth` after every step (a schedule)."""

    state_fields = ("weight", "steps", "trace")

    def __init__(self, weight: float = 1e-3, growth: float = 1.5):
        self.weight, self.growth, self.steps, self.trace = weight, growth, 0, []

    def penalty(self, model: nn.Module, step: int) -> torch.Tensor:
        self.trace.append(step)
        return self.weight * sum(p.pow(2).sum() for p in model.parameters())

    def after_step(self, model: nn.Module, step: int) -> None:
        self.weight *= self.growth
        self.steps = step


def run(model: nn.Module, regularizer: Regularizer | None, checkpoint_dir, **kwargs):
    train_loader, _, _ = loaders()
    return train(model, train_loader, 2, lr=0.05, checkpoint_dir=checkpoint_dir, stage="reg", seed=3,
                 regularizer=regularizer, **kwargs)


def test_the_penalty_reaches_the_loss_and_the_schedule_advances_every_step(tmp_path):
    plain, regular = tiny_net(), tiny_net()
    run(plain, None, None)
    schedule = GrowingL2(weight=0.05)
    result = run(regular, schedule, None)
    assert schedule.steps == result.steps and schedule.trace == list(range(result.steps))
    assert schedule.weight == pytest.approx(0.05 * 1.5 ** result.steps)
    norm = {name: sum(float(p.pow(2).sum()) for p in m.parameters()) for name, m in (("plain", plain),
                                                                                      ("regular", regular))}
    assert norm["regular"] < norm["plain"]  # the growing penalty shrank the weights


@pytest.mark.parametrize("stop_after", [3, 5])
def test_a_resumed_run_continues_the_schedule_exactly(tmp_path, stop_after):
    reference, reference_schedule = tiny_net(), GrowingL2()
    run(reference, reference_schedule, tmp_path / "full")
    model, schedule = tiny_net(), GrowingL2()
    with pytest.raises(Cancelled):
        run(model, schedule, tmp_path / "cut", should_cancel=cancel_after(stop_after))
    resumed_model, resumed_schedule = tiny_net(seed=5), GrowingL2()
    run(resumed_model, resumed_schedule, tmp_path / "cut")
    assert resumed_schedule.weight == pytest.approx(reference_schedule.weight)
    assert resumed_schedule.steps == reference_schedule.steps
    assert resumed_schedule.trace == reference_schedule.trace  # the steps before the cut come from the checkpoint
    assert_same_state(state_of(resumed_model), state_of(reference))


def test_a_checkpoint_without_the_regularizer_state_is_refused(tmp_path):
    run(tiny_net(), None, tmp_path)
    with pytest.raises(CheckpointError, match="regularizer"):
        run(tiny_net(), GrowingL2(), tmp_path)


def test_tensor_state_is_restored_in_place():
    class Dual(Regularizer):
        state_fields = ("dual",)

        def __init__(self):
            self.dual = torch.zeros(3)

    source, target = Dual(), Dual()
    source.dual += torch.tensor([1.0, 2.0, 3.0])
    saved = source.state_dict()
    source.dual.zero_()  # the saved state is a copy
    held = target.dual
    target.load_state_dict(saved)
    assert torch.equal(held, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="dual"):
        target.load_state_dict({})
