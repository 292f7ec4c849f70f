"""Parameters of functional, and its registration.

Torch-free: the registry imports this module to list and validate the method (see pruning.registry).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pruning.registry import MethodParams, register_method


@register_method("functional", target="pruning.methods.functional:run", trains=False)
class FunctionalParams(MethodParams):
    """Functionality-oriented filter pruning (Qin et al., 2018): channels are represented by what their consumers
    receive on a calibration batch, clustered per group by cosine similarity (agglomerative, one distance
    threshold bisected to the budget); each cluster keeps its largest-L1 channel and the removed channels'
    outgoing weights are added onto it, scaled by the ratio of mean activations, so the pruned network is usable
    without fine-tuning. No training."""

    calibration_samples: int = Field(256, ge=8, le=65536, description="training images whose activations "
                                                                      "represent the channels")
    linkage: Literal["complete", "average", "single"] = Field(
        "complete", description="agglomerative linkage: complete keeps every member within the threshold of "
                                "every other one (so of its representative)")
    scale: Literal["mean_ratio", "least_squares"] = Field(
        "mean_ratio", description="scale of a removed channel's outgoing weights added onto its representative: "
                                  "mean_ratio keeps each consumer's mean input, least_squares minimises the "
                                  "squared input error; both exact for scaled copies")
    merge: bool = Field(True, description="add the removed channels' outgoing weights onto their "
                                          "representatives (false: remove them only, the ablation)")
    min_keep: float = Field(0.0, ge=0, le=1, description="share of every group's channels kept whatever the "
                                                         "threshold (at least one)")
    bisect_iterations: int = Field(40, ge=1, le=100, description="halvings of the threshold interval [0, 2] "
                                                                 "when fitting the budget")
    evaluate: bool = Field(True, description="measure the merged (and the merely pruned) model's accuracy on "
                                             "the validation split before fine-tuning, for method_info")
