"""Method table: name -> description, params schema (pydantic) and a lazily imported runner.

Importing this module must stay cheap (no torch): the API process uses it for validation and /v1/methods.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class UnknownMethodError(ValueError):
    """A method name that is not registered."""


class MethodParams(BaseModel):
    """Parameters shared by every method."""

    model_config = ConfigDict(extra="forbid")

    round_to: int = Field(1, ge=1, le=64, description="round every group's kept channels to a multiple of this "
                                                      "(device block size; 1 = no rounding)")


class L1Params(MethodParams):
    allocation: Literal["global", "uniform"] = Field(
        "global", description="global ranking of layer-normalised L1 scores, or the same keep ratio per group")


class WGatesParams(MethodParams):
    hidden: int = Field(32, ge=1, le=1024, description="hidden width of each group's gate network")
    gate_lr: float = Field(0.05, gt=0, le=10, description="SGD learning rate of the gate networks")
    gate_lr_by_width: bool = Field(False, description="scale each group's gate learning rate by the mean group "
                                                      "width over its width, so that a wide group's gates do not "
                                                      "move faster because more channels push on them")
    lambda_init: float = Field(1.0, gt=0, description="initial weight of the budget penalty")
    lambda_rate: float = Field(0.05, ge=0, le=1, description="per-step relative change of the penalty weight "
                                                              "(up while over the target, down while under)")
    lambda_min: float = Field(1e-3, gt=0, description="lower bound of the penalty weight")
    lambda_max: float = Field(1e4, gt=0, description="upper bound of the penalty weight")
    init_score: float = Field(0.5, ge=0, le=1, description="initial gate score (>= 0: every gate starts open)")
    norm_weight: float = Field(1.0, ge=0, le=10, description="initial weight of the gate networks' L1-norm skip "
                                                             "term (0: gates start in random order)")
    anneal_share: float = Field(0.5, ge=0, le=1, description="share of the training steps over which the gates' "
                                                               "target falls from the dense cost to the budget")
    min_keep: float = Field(0.25, ge=0, le=1, description="share of a group's channels the gates keep open (the "
                                                        "best-scoring ones; floor_share may lower it); the "
                                                        "finisher may still go below")
    residual_min_keep: float = Field(1.0, ge=0, le=1, description="the same for residual streams (channels summed "
                                                                 "by skip connections); 1: the gates leave them "
                                                                 "whole unless floor_share lowers the floors")
    floor_share: float = Field(0.9, ge=0, le=1, description="if > 0, floors (min_keep, residual_min_keep) that "
                                                         "cost more than the target by more than floor_tolerance "
                                                         "(measured once on the device for latency budgets) are "
                                                         "lowered (see floor_lowering) until they cost at most "
                                                         "this share of the target, so that the gates can reach "
                                                         "the budget; 0: fixed floors")
    floor_lowering: Literal["together", "residual_first"] = Field(
        "residual_first", description="how floor_share lowers the floors: residual_first lowers "
                                      "residual_min_keep to min_keep before both fall together; together scales "
                                      "both by one factor")
    floor_residual_ratio: float | None = Field(
        None, ge=1, description="the residual streams' floor share first falls to this many times the inner one "
                                "(inner floors stay), then both fall together, whatever floor_lowering says; "
                                "None: as floor_lowering says (residual_first: 1)")
    floor_tolerance: float = Field(0.05, ge=0, le=0.5, description="floor_share applies only to floors that cost "
                                                                "more than the target by more than this share "
                                                                "(within it, timings cannot tell them apart)")
    min_gate_steps: int = Field(100, ge=0, description="if the gate epochs hold fewer steps than this at the "
                                                     "job's batch size, the gates train on smaller batches (not "
                                                     "below 16) so that they get this many; 0: the job's batch")
    scale_weight_lr: bool = Field(False, description="when min_gate_steps makes the gates train on smaller batches "
                                                    "than the job's, scale the weights' learning rate by the same "
                                                    "factor (linear scaling rule)")
    range_weight: float = Field(1.0, ge=0, description="weight of the term keeping gate scores inside the "
                                                       "straight-through window [-1, 1] (0: off)")
    range_to_filters: bool = Field(False, description="whether the range term also pulls on the filter weights "
                                                    "(the gate scores are functions of them); false: on the gate "
                                                    "networks only")
    cost_to_filters: bool = Field(True, description="whether the budget penalty also pulls on the filter weights "
                                                   "(as in W-Gates); false: it trains the gate networks only and "
                                                   "the weights learn from the task loss alone")
    range_mean: bool = Field(True, description="average the range term over each group's channels instead of "
                                                "summing it (a pull that does not grow with the group's width)")
    two_sided: bool = Field(True, description="after the annealing, penalise being under the target too, so the "
                                              "gates settle at the budget instead of below it")
    settle_tolerance: float = Field(0.02, ge=0, le=0.5, description="relative distance to the target within "
                                                                    "which the penalty weight decays while settling")
    latency_checks: int = Field(2, ge=0, le=20, description="latency budgets: times the gates' configuration is "
                                                           "measured on the device during training, from the end "
                                                           "of the annealing on, to correct LPNet's bias")
    target_margin: float = Field(0.0, ge=0, lt=0.5, description="aim the gates this fraction under the target")
    distill_weight: float = Field(0.0, ge=0, le=100, description="weight of a distillation term in the gate "
                                                                 "training: the KL divergence of the gated model's "
                                                                 "softened outputs from the dense model's (0: off)")
    distill_temperature: float = Field(4.0, gt=0, le=100, description="temperature of that distillation term")
    device_rounding: bool = Field(True, description="with round_to=1, let the finisher round kept channels to "
                                                    "the latency device's channel_multiple if that measures faster")


class OFAParams(MethodParams):
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


@dataclass(frozen=True)
class MethodInfo:
    """A registered method."""

    name: str
    description: str
    params_model: type[MethodParams]
    target: str  # "module:function", imported only when the method runs
    # A cohort method yields many subnets (pruning.cohort.run_cohort), not one (pipeline.run_prune).
    produces_cohort: bool = False

    def params_schema(self) -> dict[str, Any]:
        return self.params_model.model_json_schema()

    def validate_params(self, params: dict[str, Any] | None) -> MethodParams:
        """Parsed params; raises pydantic.ValidationError naming the wrong field."""
        return self.params_model.model_validate(params or {})


METHODS: dict[str, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo("l1", "L1-norm filter pruning (Li et al., ICLR 2017): prune the smallest-L1 filters to the "
                   "budget (bisection), then fine-tune. The baseline.", L1Params, "pruning.methods.l1:run"),
        MethodInfo("wgates", "W-Gates (Li et al., ECCV-W 2020): binary channel gates computed from each filter's "
                   "weights, trained with the task loss plus an adaptive penalty on the budget's cost (the "
                   "device's LPNet latency, or MACs/params); then the finisher and fine-tuning.", WGatesParams,
                   "pruning.methods.wgates:run"),
        MethodInfo("ofa", "OFARPruning (Sun et al.): once-for-all cohort over budgets x input resolutions. Structure "
                   "search by L1 on BN gammas with an early-bird stop, then joint training of the shared weights "
                   "(sandwich rule, in-place distillation); every member is materialized, BN-recalibrated and "
                   "exported.", OFAParams, "pruning.methods.ofa:run", produces_cohort=True),
    )
}


def get_method(name: str) -> MethodInfo:
    """The method called `name`, or UnknownMethodError listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None


def load_runner(name: str) -> Callable[..., Any]:
    """Import and return the method's run function."""
    module_name, _, attr = get_method(name).target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
