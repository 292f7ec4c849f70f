"""Parameters of ofa (a cohort method), and its registration.

Torch-free: the registry imports this module to list and validate the method (see pruning.registry).
"""

from __future__ import annotations

from pydantic import Field, field_validator

from pruning.registry import CohortParams, register_method


@register_method("ofa", target="pruning.methods.ofa:run", trains=True)
class OFAParams(CohortParams):
    """OFARPruning (Sun et al.): once-for-all cohort over budgets x input resolutions. Structure search by L1 on
    BN gammas with an early-bird stop, then joint training of the shared weights (sandwich rule, in-place
    distillation); every member is materialized, BN-recalibrated and exported."""

    budgets: list[float] = Field(
        default_factory=list, max_length=32,
        description="the cohort's budgets, in the job budget's kind (flops/params: fractions of the dense model at "
                    "the base resolution; macs: absolute; latency_ms: ms on the budget's device); empty: the job's")
    resolutions: list[int] = Field(
        default_factory=list, max_length=16,
        description="input resolutions in pixels (every budget x every resolution is a member); empty: the job's")
    sparsity: float = Field(1e-4, ge=0, le=1, description="L1 weight on BN gammas during the structure search")
    early_bird_threshold: float = Field(0.99, gt=0, le=1, description="stop the search once consecutive epochs' "
                                                                      "masks have at least this cosine similarity")
    early_bird_patience: int = Field(3, ge=1, le=1000, description="... for this many epochs in a row")
    sampled_members: int = Field(2, ge=0, le=64, description="members sampled per joint-training step besides the "
                                                             "full network and the smallest member (K)")
    distill_temperature: float = Field(1.0, gt=0, le=100, description="temperature of the in-place distillation "
                                                                      "from the full network")
    recalibration_batches: int = Field(20, ge=1, le=100000, description="training batches per member to "
                                                                        "re-estimate its BN statistics")

    @field_validator("budgets")
    @classmethod
    def _positive_budgets(cls, values: list[float]) -> list[float]:
        if any(not v > 0 for v in values):
            raise ValueError("every budget must be positive")
        if len(set(values)) != len(values):
            raise ValueError("budgets must be distinct")
        return values

    @field_validator("resolutions")
    @classmethod
    def _sane_resolutions(cls, values: list[int]) -> list[int]:
        if any(not 4 <= v <= 1024 for v in values):
            raise ValueError("every resolution must be in 4..1024 pixels")
        if len(set(values)) != len(values):
            raise ValueError("resolutions must be distinct")
        return values

    def member_resolutions(self) -> list[int]:
        return [int(r) for r in self.resolutions]

    def member_budgets(self) -> list[float]:
        return list(self.budgets)
