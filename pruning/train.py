"""Training and evaluation loop: SGD + cosine schedule, progress events, cancellation, checkpoints and exact resume."""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from pruning.regularizer import Regularizer

CHECKPOINT_FORMAT = "latprune.train-checkpoint/1"
DEFAULT_PROGRESS_EVERY_STEPS = 10

ProgressCallback = Callable[[dict[str, Any]], None]


class Cancelled(Exception):
    """Raised by train() when should_cancel() returns True between steps."""


class CheckpointError(ValueError):
    """A training checkpoint that is unreadable or was written by a different run."""


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


def checkpoint_path(checkpoint_dir: Path | str, stage: str) -> Path:
    """Where train() keeps the checkpoint of one stage."""
    return Path(checkpoint_dir) / f"{stage}.ckpt"


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
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise TrainingError("the training loader yields no batches (empty training set?)")
    device = _as_device(device, model)
    model.to(device)
    started = time.monotonic()
    total_steps = epochs * steps_per_epoch

    param_groups = list(params) if params is not None else list(model.parameters())
    optimizer = torch.optim.SGD(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    extra_tensors = _tensors_outside(model, optimizer)
    run_identity = {
        "stage": stage,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "seed": seed,
        "lr": lr,
    }

    path = checkpoint_path(checkpoint_dir, stage) if checkpoint_dir is not None else None
    state = {"epoch": 0, "step_in_epoch": 0, "loss_sum": 0.0, "epoch_losses": []}
    saved_rng: dict[str, Any] | None = None
    resumed_from: int | None = None
    if path is not None and resume and path.exists():
        state, saved_rng = _load_checkpoint(path, model, optimizer, scheduler, extra_tensors, run_identity,
                                            regularizer)
        resumed_from = state["epoch"] * steps_per_epoch + state["step_in_epoch"]
    else:
        torch.manual_seed(seed)

    def save() -> None:
        if path is not None:
            _save_checkpoint(path, model, optimizer, scheduler, extra_tensors, run_identity, state, regularizer)

    def emit(epoch_number: int, step: int, loss: float | None) -> None:
        if progress is not None:
            progress(
                {
                    "stage": stage,
                    "epoch": epoch_number,
                    "epochs": epochs,
                    "step": step,
                    "steps": total_steps,
                    "loss": loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "fraction": step / total_steps if total_steps else 1.0,
                }
            )

    global_step = state["epoch"] * steps_per_epoch + state["step_in_epoch"]
    emit(min(state["epoch"] + 1, epochs), global_step, None)
    was_training = model.training
    model.train()
    try:
        while state["epoch"] < epochs:
            epoch = state["epoch"]
            _seed_order(train_loader, seed, epoch)
            skip = state["step_in_epoch"]
            if saved_rng is not None and skip == 0:
                _set_rng(saved_rng)
                saved_rng = None
            batches = None
            interval_loss, interval_steps = 0.0, 0
            while state["step_in_epoch"] < steps_per_epoch:
                if should_cancel is not None and should_cancel():
                    save()
                    raise Cancelled(
                        f"{stage} cancelled at epoch {epoch + 1}/{epochs}, step {global_step}/{total_steps}"
                    )
                if batches is None:
                    batches = iter(train_loader)
                    for _ in range(skip):
                        next(batches)
                    if saved_rng is not None:
                        # Skipped batches may have drawn random augmentations; the saved state is the truth.
                        _set_rng(saved_rng)
                        saved_rng = None
                try:
                    inputs, targets = next(batches)
                except StopIteration:
                    break  # a loader shorter than its len(): end the epoch early rather than fail
                terms = _loss_terms(extra_loss, regularizer, global_step)
                loss = _step(model, optimizer, inputs, targets, device, terms)
                if loss is None:
                    raise TrainingError(
                        f"{stage}: the loss became non-finite at epoch {epoch + 1}, step {global_step + 1}; "
                        "lower the learning rate"
                    )
                scheduler.step()
                global_step += 1
                state["step_in_epoch"] += 1
                state["loss_sum"] += loss
                interval_loss += loss
                interval_steps += 1
                if regularizer is not None:
                    regularizer.after_step(model, global_step)
                if on_step is not None:
                    on_step(model, global_step)
                if interval_steps >= progress_every_steps:
                    emit(epoch + 1, global_step, interval_loss / interval_steps)
                    interval_loss, interval_steps = 0.0, 0
                if (
                    checkpoint_every_steps is not None
                    and global_step % checkpoint_every_steps == 0
                    and state["step_in_epoch"] < steps_per_epoch
                ):
                    save()
            state["epoch_losses"].append(state["loss_sum"] / max(state["step_in_epoch"], 1))
            emit(epoch + 1, global_step, state["epoch_losses"][-1])
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            state["loss_sum"] = 0.0
            save()
        if saved_rng is not None:  # resumed from a finished run: leave the RNG where that run left it
            _set_rng(saved_rng)
    finally:
        model.train(was_training)
    return TrainResult(
        epochs=epochs,
        steps=global_step,
        epoch_losses=list(state["epoch_losses"]),
        resumed_from_step=resumed_from,
        seconds=time.monotonic() - started,
        device=str(device),
    )


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


def _get_rng() -> dict[str, Any]:
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["cpu"])
    cuda_states = rng.get("cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra_tensors: list[torch.Tensor],
    run_identity: dict[str, Any],
    state: dict[str, Any],
    regularizer: Regularizer | None = None,
) -> None:
    payload = {
        "regularizer": regularizer.state_dict() if regularizer is not None else None,
        "format": CHECKPOINT_FORMAT,
        "run": dict(run_identity),
        "state": {**state, "epoch_losses": list(state["epoch_losses"])},
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra_tensors": [t.detach().cpu() for t in extra_tensors],
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _get_rng(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra_tensors: list[torch.Tensor],
    run_identity: dict[str, Any],
    regularizer: Regularizer | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} is unreadable ({error}); delete it to start over") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a latprune training checkpoint; delete it to start over")
    if payload["run"] != run_identity:
        raise CheckpointError(
            f"checkpoint {path} belongs to a different run ({payload['run']} vs {run_identity}); "
            "delete it or pass resume=False"
        )
    model_state = model.state_dict()
    saved_state = payload["model"]
    shapes_differ = set(saved_state) != set(model_state) or any(
        saved_state[k].shape != model_state[k].shape for k in model_state
    )
    if shapes_differ or len(payload["extra_tensors"]) != len(extra_tensors):
        raise CheckpointError(f"checkpoint {path} was written for a different model; delete it to start over")
    model.load_state_dict(saved_state)
    with torch.no_grad():
        for tensor, saved in zip(extra_tensors, payload["extra_tensors"], strict=True):
            tensor.copy_(saved)
    if regularizer is not None:
        if payload.get("regularizer") is None:
            raise CheckpointError(f"checkpoint {path} holds no regularizer state; delete it to start over")
        regularizer.load_state_dict(payload["regularizer"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    state = dict(payload["state"])
    state["epoch_losses"] = list(state["epoch_losses"])
    return state, payload["rng"]
