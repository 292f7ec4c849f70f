"""Parameters of lapp, and its registration.

Torch-free: the registry imports this module to list and validate the method (see pruning.registry).
"""

from __future__ import annotations

from pydantic import Field

from pruning.registry import MethodParams, register_method


@register_method("lapp", target="pruning.methods.lapp:run", trains=True, needs_dense=False)
class LappParams(MethodParams):
    """LAPP (Zhai et al., 2023): trains from scratch (or from given weights) while a learnable threshold per
    channel group prunes channels whose normalized BN scale falls below it, progressively over the first part of
    the run and never reviving a pruned channel, driven by the task loss plus mu * max(0, cost/target - 1)^2 on the
    budget's differentiable cost (the device's LPNet latency, or MACs/params); every foldable 3x3 conv trains with
    a 1x1 conv + BN bypass that is folded exactly into its kernel centre at the end; then the finisher and
    fine-tuning."""

    mu: float = Field(5.0, gt=0, le=1e4, description="weight of the budget penalty mu * max(0, cost/target - 1)^2")
    threshold_lr: float = Field(0.05, gt=0, le=10, description="SGD learning rate of the per-group thresholds "
                                                                "(no weight decay)")
    threshold_init: float = Field(0.5, ge=0, le=1, description="initial threshold on the normalized importance "
                                                               "(|BN gamma| / the group's mean: 1 for every "
                                                               "channel at the start from scratch)")
    surrogate_slope: float = Field(5.0, gt=0, le=1000, description="slope k of the sigmoid whose derivative "
                                                                     "stands in for the step's: "
                                                                     "d mask / d(s - t) = k * sigmoid'(k (s - t))")
    prune_share: float = Field(0.25, gt=0, le=1, description="share of the training steps during which the "
                                                              "thresholds prune (E_p); after it the masks are "
                                                              "frozen and the weights train on")
    min_keep: float = Field(0.05, ge=0, le=1, description="share of every group's channels (at least one) that "
                                                           "the thresholds never prune: the best-scoring ones")
    bypass: bool = Field(True, description="train every foldable 3x3 conv (groups 1, padding = dilation) with a "
                                           "parallel 1x1 conv + BN, folded into the kernel centre at the end")
    settle: bool = Field(True, description="at the end of the pruning phase, prune the channels closest to their "
                                           "threshold until the predicted cost fits the budget, so the rest of "
                                           "the run trains the final structure")
    train_lr: float | None = Field(None, gt=0, le=10, description="learning rate of the weights while training "
                                                                   "(None: the job's learning rate handed to the "
                                                                   "method)")
