"""Training loop: learns, reports progress, cancels, checkpoints and resumes to the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pruning.data import load_dataset, make_loaders
from pruning.train import (
    Cancelled,
    CheckpointError,
    TrainingError,
    checkpoint_path,
    distillation_loss,
    evaluate,
    evaluate_metrics,
    pick_device,
    seed_everything,
    train,
)

CPU = torch.device("cpu")


def tiny_net(num_classes: int = 4, seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(32, num_classes),
    )


def loaders(augment: bool = False, batch_size: int = 32):
    splits = load_dataset("synthetic:4x8", augment=augment)  # 128 train images -> 4 steps per epoch
    return make_loaders(splits, batch_size=batch_size, seed=0)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6, rtol=1e-5), key


def cancel_after(checks: int):
    calls = {"n": 0}

    def should_cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > checks

    return should_cancel


def test_training_reduces_loss_and_learns_synthetic_data():
    train_loader, val_loader, _ = loaders()
    model = tiny_net()
    before = evaluate_metrics(model, val_loader, CPU)
    result = train(model, train_loader, epochs=4, lr=0.1, device=CPU)
    after = evaluate_metrics(model, val_loader, CPU)
    assert result.steps == 16 and len(result.epoch_losses) == 4
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert after.loss < 0.7 * before.loss
    assert after.accuracy > 0.8


def test_progress_events_cover_the_run():
    train_loader, _, _ = loaders()
    events: list[dict] = []
    train(tiny_net(), train_loader, epochs=2, device=CPU, progress=events.append, progress_every_steps=1, stage="dense")
    required = {"stage", "epoch", "epochs", "step", "steps", "loss", "fraction"}
    assert all(required <= set(event) for event in events)
    assert all(event["stage"] == "dense" and event["epochs"] == 2 and event["steps"] == 8 for event in events)
    fractions = [event["fraction"] for event in events]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert [event["epoch"] for event in events][-1] == 2
    assert all(event["loss"] > 0 for event in events[1:])


def test_cancellation_raises_and_leaves_a_checkpoint(tmp_path):
    train_loader, _, _ = loaders()
    with pytest.raises(Cancelled):
        train(tiny_net(), train_loader, epochs=3, device=CPU, should_cancel=cancel_after(5), checkpoint_dir=tmp_path)
    assert checkpoint_path(tmp_path, "train").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def external_gate() -> torch.Tensor:
    return torch.zeros(3, requires_grad=True)


def run_with_gate(model, gate, train_loader, tmp_path, **kwargs):
    """Train a model plus an optimised tensor outside it, with an extra loss and a per-step hook."""
    calls: list[int] = []
    return train(
        model,
        train_loader,
        epochs=3,
        lr=0.05,
        device=CPU,
        params=[{"params": list(model.parameters())}, {"params": [gate], "weight_decay": 0.0}],
        extra_loss=lambda m: ((gate - 1.0) ** 2).sum() + 1e-3 * m[-1].weight.abs().sum(),
        on_step=lambda m, step: calls.append(step),
        checkpoint_dir=tmp_path,
        seed=7,
        **kwargs,
    ), calls


@pytest.mark.parametrize("stop_after", [2, 4, 7])
def test_resume_after_cancel_equals_uninterrupted(tmp_path, stop_after):
    train_loader, _, _ = loaders(augment=True)
    reference, reference_gate = tiny_net(dropout=0.2), external_gate()
    full, steps_seen = run_with_gate(reference, reference_gate, train_loader, tmp_path / "full")
    assert steps_seen == list(range(1, 13))

    model, gate = tiny_net(dropout=0.2), external_gate()
    with pytest.raises(Cancelled):
        run_with_gate(model, gate, train_loader, tmp_path / "cut", should_cancel=cancel_after(stop_after))
    torch.manual_seed(12345)  # whatever happens in between must not matter
    resumed_model, resumed_gate = tiny_net(seed=99, dropout=0.2), external_gate()
    resumed, resumed_steps = run_with_gate(resumed_model, resumed_gate, train_loader, tmp_path / "cut")
    assert resumed.resumed_from_step == stop_after
    assert resumed_steps == list(range(stop_after + 1, 13))
    assert_same_state(state_of(resumed_model), state_of(reference))
    assert torch.allclose(resumed_gate, reference_gate, atol=1e-6)
    assert resumed.epoch_losses == pytest.approx(full.epoch_losses, rel=1e-5)


def test_resume_from_periodic_checkpoint_after_a_crash(tmp_path):
    train_loader, _, _ = loaders()
    reference = tiny_net()
    train(reference, train_loader, epochs=3, device=CPU, seed=3)

    def crash_after_seven_steps():
        crash_after_seven_steps.calls += 1
        if crash_after_seven_steps.calls > 7:
            raise RuntimeError("worker killed")
        return False

    crash_after_seven_steps.calls = 0
    kwargs = dict(epochs=3, device=CPU, seed=3, checkpoint_dir=tmp_path, checkpoint_every_steps=3)
    with pytest.raises(RuntimeError, match="worker killed"):
        train(tiny_net(), train_loader, should_cancel=crash_after_seven_steps, **kwargs)
    resumed_model = tiny_net(seed=5)
    result = train(resumed_model, train_loader, **kwargs)
    assert result.resumed_from_step == 6  # the last periodic checkpoint before the crash
    assert_same_state(state_of(resumed_model), state_of(reference))


def test_finished_checkpoint_restores_final_weights_without_training(tmp_path):
    train_loader, _, _ = loaders()
    trained = tiny_net()
    train(trained, train_loader, epochs=1, device=CPU, checkpoint_dir=tmp_path)
    restored = tiny_net(seed=42)
    steps: list[int] = []
    result = train(
        restored, train_loader, epochs=1, device=CPU, checkpoint_dir=tmp_path, on_step=lambda m, s: steps.append(s)
    )
    assert steps == [] and result.resumed_from_step == 4
    assert_same_state(state_of(restored), state_of(trained))


def test_resume_false_ignores_checkpoint_and_mismatched_runs_are_refused(tmp_path):
    train_loader, _, _ = loaders()
    with pytest.raises(Cancelled):
        train(tiny_net(), train_loader, epochs=2, device=CPU, should_cancel=cancel_after(3), checkpoint_dir=tmp_path)
    fresh = train(tiny_net(), train_loader, epochs=2, device=CPU, checkpoint_dir=tmp_path, resume=False)
    assert fresh.resumed_from_step is None and fresh.steps == 8
    with pytest.raises(CheckpointError, match="different run"):
        train(tiny_net(), train_loader, epochs=5, device=CPU, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="different model"):
        train(
            tiny_net(num_classes=4, seed=0)[:-1].append(nn.Linear(32, 4, bias=False)),
            train_loader,
            epochs=2,
            device=CPU,
            checkpoint_dir=tmp_path,
        )
    checkpoint_path(tmp_path, "train").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        train(tiny_net(), train_loader, epochs=2, device=CPU, checkpoint_dir=tmp_path)


def test_non_finite_loss_is_a_clear_error():
    train_loader, _, _ = loaders()
    with pytest.raises(TrainingError, match="non-finite"):
        train(tiny_net(), train_loader, epochs=1, device=CPU, extra_loss=lambda m: torch.tensor(float("nan")))


def test_empty_loader_is_a_clear_error():
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(TrainingError, match="no batches"):
        train(tiny_net(), empty, epochs=1, device=CPU)
    with pytest.raises(ValueError, match="empty"):
        evaluate(tiny_net(), empty, CPU)


def test_evaluate_accuracy_and_loss_on_a_handcrafted_model():
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))  # logits are the inputs: the prediction is the argmax feature
    inputs = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0], [0, 5.0, 0]])
    targets = torch.tensor([0, 1, 2, 1, 1])  # the fourth is wrong: 4 of 5 correct
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=2)
    model.train()
    assert evaluate(model, loader) == pytest.approx(0.8)
    metrics = evaluate_metrics(model, loader)
    expected_loss = nn.functional.cross_entropy(inputs, targets).item()
    assert metrics.samples == 5 and metrics.loss == pytest.approx(expected_loss, rel=1e-6)
    assert model.training  # evaluation restores the mode it found


def test_pick_device_and_seed_everything():
    assert pick_device("cpu") == CPU
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("warp-drive")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")
    seed_everything(11)
    first = torch.rand(4)
    seed_everything(11)
    assert torch.equal(first, torch.rand(4))


def test_distillation_loss_is_the_temperature_scaled_kl_from_the_teacher_and_trains_only_the_student():
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], requires_grad=True)
    student = torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]], requires_grad=True)
    assert float(distillation_loss(teacher.detach(), teacher, 4.0)) == pytest.approx(0.0, abs=1e-5)
    loss = distillation_loss(student, teacher, 2.0)
    p = torch.softmax(teacher.detach() / 2, dim=1)
    q = torch.softmax(student.detach() / 2, dim=1)
    expected = float((p * (p.log() - q.log())).sum(dim=1).mean()) * 4
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5) and float(loss.detach()) > 0
    loss.backward()
    assert teacher.grad is None and float(student.grad.abs().sum()) > 0
