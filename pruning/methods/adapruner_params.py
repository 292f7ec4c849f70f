"""Parameters of adapruner, and its registration.

Torch-free: the registry imports this module to list and validate the method (see pruning.registry).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pruning.registry import MethodParams, register_method

Criterion = Literal["l1", "l2", "bn_gamma", "fpgm", "random"]
CRITERIA: tuple[str, ...] = ("l1", "l2", "bn_gamma", "fpgm", "random")


@register_method("adapruner", target="pruning.methods.adapruner:run", trains=False)
class AdaPrunerParams(MethodParams):
    """AdaPruner (Liu et al., 2021): every channel group's width follows its mean |BN gamma| relative to the
    network's (c = C * clip(kappa * I / mean I, rho_min, 1), kappa bisected until the cost is within 2% under
    the budget); then the subnet is built from the trained weights under each inheritance criterion (L1, L2,
    BN gamma, FPGM, random), its BN statistics recalibrated on training batches and its accuracy measured on the
    held-out split, and the best criterion's channels are kept for fine-tuning."""

    criteria: list[Criterion] = Field(
        default_factory=lambda: list(CRITERIA), min_length=1, max_length=len(CRITERIA),
        description="weight-inheritance criteria to try, each scored on the held-out split after BN "
                    "recalibration (ties: lower loss, then this order)")
    rho_min: float = Field(0.1, gt=0.0, le=1.0,
                           description="smallest share of a group's channels any group keeps (the clip's floor)")
    band: float = Field(0.02, ge=0.0, le=0.5,
                        description="the allocation's cost must land in [(1 - band) x target, target]; channels "
                                    "are topped up by largest rounding remainder when the bisection falls short")
    recal_batches: int = Field(100, ge=1, le=10_000,
                               description="training batches that re-estimate BN statistics of each candidate")
    val_batches: int = Field(0, ge=0, le=100_000,
                             description="held-out batches each candidate is scored on (0: the whole split)")

    @field_validator("criteria")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"criteria must not repeat, got {value}")
        return value
