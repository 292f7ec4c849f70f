"""Training and evaluation loop: SGD + cosine schedule, progress events, cancellation, checkpoints and exact resume."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from pruning.regularizer import Regularizer
from pruning.train_checkpoint import (  # noqa: F401 - CheckpointError and checkpoint_path are part of this API
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    set_rng,
)

DEFAULT_PROGRESS_EVERY_STEPS = 10

ProgressCallback = Callable[[dict[str, Any]], None]


class Cancelled(Exception):
    """Raised by train() when should_cancel() returns True between steps."""


class TrainingError(RuntimeError):
    """Training cannot go on (empty data, non-finite loss)."""


@dataclass
class TrainResult:
    """What a train() call did; epoch_losses are mean total losses per finished epoch."""

    epochs: int
    steps: int
    epoch_losses: list[float] = field(default_factory=list)
    resumed_from_step: int | None = None
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def final_loss(self) -> float | None:
        """Mean loss of the last epoch, or None when no epoch ran."""
        return self.epoch_losses[-1] if self.epoch_losses else None


@dataclass
class EvalResult:
    """Accuracy in [0, 1], mean cross-entropy loss and the number of samples seen."""

    accuracy: float
    loss: float
    samples: int


def pick_device(prefer: str | None = None) -> torch.device:
    """The requested device if usable, else cuda when available, else cpu."""
    if prefer is None or prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(prefer)
    except RuntimeError as error:
        raise ValueError(f"unknown device {prefer!r}: use cpu, cuda, cuda:<index> or auto") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {prefer!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {prefer!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {prefer!r} requested but MPS is not available here")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) random generators."""
    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for the engine itself
        pass
    torch.manual_seed(seed)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL divergence of the student's softened outputs from the (detached) teacher's, scaled by temperature^2."""
    # The T^2 factor keeps the gradient's size independent of the temperature (Hinton et al., 2015).
    soft = nn.functional.softmax(teacher_logits.detach() / temperature, dim=1)
    student = nn.functional.log_softmax(student_logits / temperature, dim=1)
    return nn.functional.kl_div(student, soft, reduction="batchmean") * temperature ** 2


def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str | None = None) -> float:
    """Top-1 accuracy of model on loader, in [0, 1]."""
    return evaluate_metrics(model, loader, device).accuracy


@torch.no_grad()
def evaluate_metrics(model: nn.Module, loader: Iterable, device: torch.device | str | None = None) -> EvalResult:
    """Top-1 accuracy and mean cross-entropy of model on loader, in eval mode (the mode is restored after)."""
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    else:
        device = torch.device(device)
        model.to(device)
    was_training = model.training
    model.eval()
    correct, samples, loss_sum = 0, 0, 0.0
    try:
        for inputs, targets in loader:
            inputs = inputs.to(device, non_blocking=True)
            targets = torch.as_tensor(targets).to(device, non_blocking=True)
            logits = model(inputs)
            loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == targets).sum().item())
            samples += int(targets.numel())
    finally:
        model.train(was_training)
    if samples == 0:
        raise ValueError("cannot evaluate on an empty loader")
    return EvalResult(accuracy=correct / samples, loss=loss_sum / samples, samples=samples)


def train(
    model: nn.Module,
    train_loader: DataLoader,
    epochs: int,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    device: torch.device | str | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    checkpoint_dir: Path | str | None = None,
    checkpoint_every_steps: int | None = None,
    resume: bool = True,
    stage: str = "train",
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    on_step: Callable[[nn.Module, int], None] | None = None,
    seed: int = 0,
    params: Iterable[Any] | None = None,
    progress_every_steps: int = DEFAULT_PROGRESS_EVERY_STEPS,
    regularizer: Regularizer | None = None,
) -> TrainResult:
    """Train with SGD + per-step cosine LR, checkpointing to checkpoint_dir/<stage>.ckpt and resuming from it.

    The shuffling order of epoch e depends only on (seed, e) and the RNG state is checkpointed, so a run that
    is cancelled and resumed ends with the same weights as an uninterrupted one (for loaders made by
    make_loaders or any loader whose shuffling uses its own generator). A fresh run seeds torch's global RNG
    with `seed`; tensors in `params` that are not model parameters must already be on `device`. A `regularizer`
    adds its penalty to the loss, advances its schedule after every step, and is checkpointed with the run.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if checkpoint_every_steps is not None and checkpoint_every_steps < 1:
        raise ValueError(f"checkpoint_every_steps must be >= 1, got {checkpoint_every_steps}")
    if len(train_loader) == 0:
        raise TrainingError("the training loader yields no batches (empty training set?)")
    hooks = StepHooks(extra_loss, regularizer, on_step, should_cancel, progress, progress_every_steps,
                      checkpoint_every_steps)
    run = TrainingRun(model, train_loader, epochs, _as_device(device, model), stage, seed, hooks)
    run.prepare(params, lr, momentum, weight_decay)
    run.resume_or_start(checkpoint_dir, resume)
    return run.execute()


@dataclass
class StepHooks:
    """What a caller adds to the loop: loss terms, per-step callbacks, cancellation, progress and checkpoints."""

    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None
    regularizer: Regularizer | None = None
    on_step: Callable[[nn.Module, int], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    progress: ProgressCallback | None = None
    progress_every_steps: int = DEFAULT_PROGRESS_EVERY_STEPS
    checkpoint_every_steps: int | None = None


class TrainingRun:
    """One train() call: the optimizer and schedule, the position in the run (`state`), its checkpoint, and the
    epoch loop that resumes exactly where a cancelled run stopped."""

    def __init__(self, model: nn.Module, loader: DataLoader, epochs: int, device: torch.device, stage: str,
                 seed: int, hooks: StepHooks):
        self.model, self.loader, self.epochs, self.device = model, loader, epochs, device
        self.stage, self.seed, self.hooks = stage, seed, hooks
        self.steps_per_epoch = len(loader)
        self.total_steps = epochs * self.steps_per_epoch
        self.started = time.monotonic()
        self.state: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "loss_sum": 0.0, "epoch_losses": []}
        self.saved_rng: dict[str, Any] | None = None
        self.resumed_from: int | None = None
        self.path: Path | None = None
        self.global_step = 0
        model.to(device)

    def prepare(self, params: Iterable[Any] | None, lr: float, momentum: float, weight_decay: float) -> None:
        groups = list(params) if params is not None else list(self.model.parameters())
        self.optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(self.total_steps, 1))
        self.extra_tensors = _tensors_outside(self.model, self.optimizer)
        self.identity = {"stage": self.stage, "epochs": self.epochs, "steps_per_epoch": self.steps_per_epoch,
                         "seed": self.seed, "lr": lr}

    def resume_or_start(self, checkpoint_dir: Path | str | None, resume: bool) -> None:
        self.path = checkpoint_path(checkpoint_dir, self.stage) if checkpoint_dir is not None else None
        if self.path is not None and resume and self.path.exists():
            self.state, self.saved_rng = load_checkpoint(self.path, self.model, self.optimizer, self.scheduler,
                                                          self.extra_tensors, self.identity, self.hooks.regularizer)
            self.resumed_from = self.state["epoch"] * self.steps_per_epoch + self.state["step_in_epoch"]
        else:
            torch.manual_seed(self.seed)
        self.global_step = self.state["epoch"] * self.steps_per_epoch + self.state["step_in_epoch"]

    def save(self) -> None:
        if self.path is not None:
            save_checkpoint(self.path, self.model, self.optimizer, self.scheduler, self.extra_tensors,
                             self.identity, self.state, self.hooks.regularizer)

    def emit(self, epoch_number: int, loss: float | None) -> None:
        if self.hooks.progress is not None:
            total = self.total_steps
            self.hooks.progress({"stage": self.stage, "epoch": epoch_number, "epochs": self.epochs,
                                 "step": self.global_step, "steps": total, "loss": loss,
                                 "lr": self.optimizer.param_groups[0]["lr"],
                                 "fraction": self.global_step / total if total else 1.0})

    def execute(self) -> TrainResult:
        state = self.state
        self.emit(min(state["epoch"] + 1, self.epochs), None)
        was_training = self.model.training
        self.model.train()
        try:
            while state["epoch"] < self.epochs:
                self.run_epoch(state["epoch"])
                state["epoch_losses"].append(state["loss_sum"] / max(state["step_in_epoch"], 1))
                self.emit(state["epoch"] + 1, state["epoch_losses"][-1])
                state["epoch"] += 1
                state["step_in_epoch"] = 0
                state["loss_sum"] = 0.0
                self.save()
            if self.saved_rng is not None:  # resumed from a finished run: leave the RNG where that run left it
                set_rng(self.saved_rng)
        finally:
            self.model.train(was_training)
        return TrainResult(epochs=self.epochs, steps=self.global_step, epoch_losses=list(state["epoch_losses"]),
                           resumed_from_step=self.resumed_from, seconds=time.monotonic() - self.started,
                           device=str(self.device))

    def run_epoch(self, epoch: int) -> None:
        """The rest of epoch `epoch`: its batches after the ones a resumed run already trained on."""
        state = self.state
        _seed_order(self.loader, self.seed, epoch)
        skip = state["step_in_epoch"]
        if self.saved_rng is not None and skip == 0:
            set_rng(self.saved_rng)
            self.saved_rng = None
        batches = None
        interval = [0.0, 0]  # loss sum and steps since the last progress event
        while state["step_in_epoch"] < self.steps_per_epoch:
            self.check_cancelled(epoch)
            if batches is None:
                batches = self.batches_after(skip)
            try:
                inputs, targets = next(batches)
            except StopIteration:
                break  # a loader shorter than its len(): end the epoch early rather than fail
            self.train_step(epoch, inputs, targets, interval)

    def check_cancelled(self, epoch: int) -> None:
        if self.hooks.should_cancel is not None and self.hooks.should_cancel():
            self.save()
            raise Cancelled(f"{self.stage} cancelled at epoch {epoch + 1}/{self.epochs}, "
                            f"step {self.global_step}/{self.total_steps}")

    def batches_after(self, skip: int) -> Iterator[Any]:
        batches = iter(self.loader)
        for _ in range(skip):
            next(batches)
        if self.saved_rng is not None:
            # Skipped batches may have drawn random augmentations; the saved state is the truth.
            set_rng(self.saved_rng)
            self.saved_rng = None
        return batches

    def train_step(self, epoch: int, inputs: Any, targets: Any, interval: list) -> None:
        hooks, state = self.hooks, self.state
        terms = _loss_terms(hooks.extra_loss, hooks.regularizer, self.global_step)
        loss = _step(self.model, self.optimizer, inputs, targets, self.device, terms)
        if loss is None:
            raise TrainingError(f"{self.stage}: the loss became non-finite at epoch {epoch + 1}, step "
                                f"{self.global_step + 1}; lower the learning rate")
        self.scheduler.step()
        self.global_step += 1
        state["step_in_epoch"] += 1
        state["loss_sum"] += loss
        interval[0] += loss
        interval[1] += 1
        if hooks.regularizer is not None:
            hooks.regularizer.after_step(self.model, self.global_step)
        if hooks.on_step is not None:
            hooks.on_step(self.model, self.global_step)
        if interval[1] >= hooks.progress_every_steps:
            self.emit(epoch + 1, interval[0] / interval[1])
            interval[0], interval[1] = 0.0, 0
        every = hooks.checkpoint_every_steps
        if every is not None and self.global_step % every == 0 and state["step_in_epoch"] < self.steps_per_epoch:
            self.save()


def _loss_terms(extra_loss: Callable[[nn.Module], torch.Tensor] | None, regularizer: Regularizer | None,
                step: int) -> Callable[[nn.Module], torch.Tensor] | None:
    """extra_loss and the regularizer's penalty at `step` as one term (None when neither adds anything)."""
    if regularizer is None:
        return extra_loss

    def terms(model: nn.Module) -> torch.Tensor:
        penalty = regularizer.penalty(model, step)
        extra = extra_loss(model) if extra_loss is not None else None
        parts = [t for t in (extra, penalty) if t is not None]
        return sum(parts[1:], parts[0]) if parts else torch.zeros(())

    return terms


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: Any,
    device: torch.device,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None,
) -> float | None:
    """One optimizer step; None (and no update) when the loss is not finite."""
    inputs = inputs.to(device, non_blocking=True)
    targets = torch.as_tensor(targets).to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(inputs), targets)
    if extra_loss is not None:
        loss = loss + extra_loss(model)
    value = float(loss.detach())
    if not math.isfinite(value):
        return None
    loss.backward()
    optimizer.step()
    return value


def _as_device(device: torch.device | str | None, model: nn.Module) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(model.parameters(), None)
    if first is not None and first.device.type != "cpu":
        return first.device
    return pick_device()


def _seed_order(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make epoch `epoch`'s shuffling a function of (seed, epoch) only."""
    epoch_seed = (seed * 1_000_003 + epoch * 7_919 + 17) % 2**63
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(epoch_seed)
        return
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, RandomSampler):
        if sampler.generator is None:
            sampler.generator = torch.Generator()
        sampler.generator.manual_seed(epoch_seed)


def _tensors_outside(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Optimised tensors that are not model parameters (e.g. a method's own gates), which checkpoints must carry."""
    inside = {id(p) for p in model.parameters()}
    return [p for group in optimizer.param_groups for p in group["params"] if id(p) not in inside]
