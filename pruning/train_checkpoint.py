"""Training checkpoints: model, optimizer, schedule, RNG, the run's position and its regularizer's state, written
atomically and loaded only for the run that wrote them (torch.load with weights_only=True)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning.regularizer import Regularizer

CHECKPOINT_FORMAT = "latprune.train-checkpoint/1"


class CheckpointError(ValueError):
    """A training checkpoint that is unreadable or was written by a different run."""


def checkpoint_path(checkpoint_dir: Path | str, stage: str) -> Path:
    """Where train() keeps the checkpoint of one stage."""
    return Path(checkpoint_dir) / f"{stage}.ckpt"


def get_rng() -> dict[str, Any]:
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["cpu"])
    cuda_states = rng.get("cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def save_checkpoint(
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
        "rng": get_rng(),
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


def load_checkpoint(
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
