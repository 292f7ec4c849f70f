"""Parameters of gdp, and its registration.

Torch-free: the registry imports this module to list and validate the method (see pruning.registry).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from pruning.registry import MethodParams, register_method


@register_method("gdp", target="pruning.methods.gdp:run", trains=True)
class GDPParams(MethodParams):
    """Gates with Differentiable Polarization (Guo et al., ICCV 2021): every channel group gets gates
    g = theta^2 / (theta^2 + eps), trained with the weights against the task loss plus an adaptive penalty on the
    budget's cost of the soft keep counts (the device's LPNet latency, or MACs/params); eps is annealed so that the
    gates polarize to exactly 0 or towards 1. Zero gates are removed, the others folded into the layers (no
    accuracy change at removal); then the finisher and fine-tuning."""

    theta_init: float = Field(1.0, gt=0, le=10, description="initial value of every gate parameter theta")
    eps_start: float = Field(1e-2, gt=0, le=1, description="eps of g = theta^2/(theta^2+eps) at the first step")
    eps_end: float = Field(1e-6, gt=0, le=1, description="eps at the end of the annealing (<= eps_start); it "
                                                         "falls on a log scale and stays there afterwards")
    anneal_share: float = Field(0.75, gt=0, le=1, description="share of the training steps over which eps falls "
                                                              "from eps_start to eps_end")
    snap_below: float = Field(1e-4, gt=0, lt=0.5, description="a gate below this value is snapped to exactly 0 "
                                                              "(theta = 0) and frozen for the rest of the run")
    max_step_share: float = Field(0.5, gt=0, lt=1, description="largest change of |theta| in one step, as a "
                                                                "share of |theta| (theta's gradient is divided "
                                                                "by 2 eps, then clipped to this)")
    gate_lr: float = Field(0.1, gt=0, le=100, description="SGD learning rate of the gate parameters theta (no "
                                                          "momentum, no weight decay)")
    lambda_init: float = Field(1.0, gt=0, le=1e12, description="initial weight of the budget penalty "
                                                                "lambda * soft cost / target")
    lambda_rate: float = Field(0.05, ge=0, le=1, description="per-step relative change of lambda: up while the "
                                                              "soft cost is over the target, down while under")
    lambda_min: float = Field(1e-3, gt=0, le=1e12, description="lower bound of lambda")
    lambda_max: float = Field(1e9, gt=0, le=1e12, description="upper bound of lambda")
    min_keep: float = Field(0.05, ge=0, le=1, description="share of each group's channels (at least one): its "
                                                          "largest gates are never snapped shut but held at "
                                                          ">= 0.5; the finisher may still go below")
    device_rounding: bool = Field(True, description="with round_to=1, let the finisher round kept channels to "
                                                    "the latency device's channel_multiple if that measures faster")

    @model_validator(mode="after")
    def _ordered(self) -> GDPParams:
        if self.eps_end > self.eps_start:
            raise ValueError(f"eps_end ({self.eps_end}) must not exceed eps_start ({self.eps_start})")
        if self.lambda_min > self.lambda_max:
            raise ValueError(f"lambda_min ({self.lambda_min}) must not exceed lambda_max ({self.lambda_max})")
        if not self.lambda_min <= self.lambda_init <= self.lambda_max:
            raise ValueError(f"lambda_init ({self.lambda_init}) must lie in [lambda_min, lambda_max]")
        return self
