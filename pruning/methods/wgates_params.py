"""Parameters of wgates, and its registration.

Torch-free: the registry imports this module to list and validate the method (see pruning.registry).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pruning.registry import MethodParams, register_method


@register_method("wgates", target="pruning.methods.wgates:run", trains=True)
class WGatesParams(MethodParams):
    """W-Gates (Li et al., ECCV-W 2020): binary channel gates computed from each filter's weights, trained with
    the task loss plus an adaptive penalty on the budget's cost (the device's LPNet latency, or MACs/params);
    then the finisher and fine-tuning."""

    hidden: int = Field(32, ge=1, le=1024, description="hidden width of each group's gate network")
    gate_lr: float = Field(0.05, gt=0, le=10, description="SGD learning rate of the gate networks")
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
    floor_tolerance: float = Field(0.05, ge=0, le=0.5, description="floor_share applies only to floors that cost "
                                                                "more than the target by more than this share "
                                                                "(within it, timings cannot tell them apart)")
    min_gate_steps: int = Field(100, ge=0, description="if the gate epochs hold fewer steps than this at the "
                                                     "job's batch size, the gates train on smaller batches (not "
                                                     "below 16) so that they get this many; 0: the job's batch")
    range_weight: float = Field(1.0, ge=0, description="weight of the term keeping gate scores inside the "
                                                       "straight-through window [-1, 1] (0: off)")
    two_sided: bool = Field(True, description="after the annealing, penalise being under the target too, so the "
                                              "gates settle at the budget instead of below it")
    settle_tolerance: float = Field(0.02, ge=0, le=0.5, description="relative distance to the target within "
                                                                    "which the penalty weight decays while settling")
    latency_checks: int = Field(2, ge=0, le=20, description="latency budgets: times the gates' configuration is "
                                                           "measured on the device during training, from the end "
                                                           "of the annealing on, to correct LPNet's bias")
    target_margin: float = Field(0.0, ge=0, lt=0.5, description="aim the gates this fraction under the target")
    device_rounding: bool = Field(True, description="with round_to=1, let the finisher round kept channels to "
                                                    "the latency device's channel_multiple if that measures faster")
