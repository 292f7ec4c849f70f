"""Parameters of greg, and its registration.

Torch-free: the registry imports this module to list and validate the method (see pruning.registry).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pruning.registry import MethodParams, register_method


@register_method("greg", target="pruning.methods.greg:run", trains=True)
class GRegParams(MethodParams):
    """Growing regularization (Wang et al., ICLR 2021): the channels to remove are chosen by L1 and allocated to
    the budget (GReg-1), or re-chosen by L1 after a small penalty has grown uniformly on every filter (GReg-2);
    an L2 penalty on every coupled parameter of the chosen channels (producing filters, BN) then grows in steps
    to a ceiling and is held there while the network stabilizes, so that removing them costs (almost) no
    accuracy; then the finisher and fine-tuning."""

    variant: Literal["greg1", "greg2"] = Field(
        "greg1", description="greg1: choose the channels by L1 up front; greg2: grow a penalty on every filter "
                             "first (pick_delta_lambda up to pick_ceiling), then choose by L1 and go on as greg1")
    allocation: Literal["global", "uniform"] = Field(
        "global", description="how the budget is spread over the groups: a global ranking of layer-normalised "
                              "L1 scores, or the same keep ratio in every group")
    update_interval_steps: int = Field(10, ge=1, le=100_000, description="K_u: training steps between two "
                                                                         "increments of the penalty")
    delta_lambda: float = Field(1e-4, gt=0, le=10, description="increment of the chosen channels' penalty "
                                                               "factor every update_interval_steps")
    tau: float = Field(1.0, gt=0, le=100, description="ceiling of the chosen channels' penalty factor")
    stabilize_steps: int = Field(40_000, ge=0, le=10_000_000, description="K_s: training steps with the penalty "
                                                                         "held at tau before the removal")
    pick_delta_lambda: float = Field(1e-5, gt=0, le=1, description="greg2: increment of every filter's penalty "
                                                                  "during the uniform phase")
    pick_ceiling: float = Field(1e-2, gt=0, le=10, description="greg2: the uniform phase ends, and the channels "
                                                               "are chosen again by L1, when every filter's "
                                                               "penalty reaches this")
    cancel_decay_on_kept: bool = Field(True, description="greg2: after the re-selection the kept channels get "
                                                         "the penalty -weight_decay, which cancels weight decay "
                                                         "on them (their magnitude shrank in the uniform phase)")
    reg_lr: float | None = Field(1e-3, gt=0, le=1, description="learning rate while regularizing (the paper's "
                                                               "1e-3 on CIFAR); None: the job's fine-tuning rate")
    weight_decay: float = Field(5e-4, ge=0, le=0.1, description="SGD weight decay while regularizing")
    fit_to_epochs: bool = Field(True, description="if the schedule needs more steps than the job's epochs hold, "
                                                  "shrink it to fit (fewer, larger penalty increments; stabilize "
                                                  "and uniform phases shortened in proportion); false: train as "
                                                  "many epochs as the schedule needs")

    @model_validator(mode="after")
    def _ceilings_in_order(self) -> GRegParams:
        if self.variant == "greg2" and self.pick_ceiling >= self.tau:
            raise ValueError(f"pick_ceiling ({self.pick_ceiling}) must be below tau ({self.tau}) for greg2")
        return self
