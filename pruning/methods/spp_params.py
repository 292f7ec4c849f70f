"""Parameters of spp, and its registration.

Torch-free: the registry imports this module to list and validate the method (see pruning.registry).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pruning.registry import MethodParams, register_method


@register_method("spp", target="pruning.methods.spp:run", trains=True)
class SPPParams(MethodParams):
    """Structured Probabilistic Pruning (Wang et al., 2017): every channel has a pruning probability p (0 at the
    start); while the network trains, each channel is dropped at every step with probability p (a Bernoulli mask
    after its BN), and every interval_steps the channels of each group are ranked by L1 and p moves by the paper's
    center-symmetric exponential increment (up for the weakest, down for the strongest), until each group's share
    to remove (from a global L1 allocation to the budget, fixed at the start) sits at p = 1; those channels are
    removed, the rest kept, and the finisher and fine-tuning follow."""

    increment_scale: float = Field(0.05, gt=0, le=1, description="A: the increment of the weakest channel's "
                                                                 "pruning probability at every update")
    center_share: float = Field(0.25, gt=0, lt=0.5, description="u: the increment at the function's center "
                                                                "N_c is u*A (the increments are symmetric about "
                                                                "(N_c, u*A))")
    interval_steps: int = Field(180, ge=1, le=1_000_000, description="t: training steps between two updates of "
                                                                     "the pruning probabilities")
    allocation: Literal["global", "uniform"] = Field(
        "global", description="how the budget sets each group's share to remove: a global ranking of "
                              "layer-normalised L1 scores, or the same keep ratio in every group")
    fit_to_epochs: bool = Field(True, description="shorten the interval (never below 1 step), and where one "
                                                  "update per step is still too few raise increment_scale (at "
                                                  "most 1), so that the planned updates end within "
                                                  "schedule_share of the job's steps; false: keep interval_steps "
                                                  "and increment_scale, and the finisher removes what the "
                                                  "schedule did not reach")
    schedule_share: float = Field(0.75, gt=0, le=1, description="with fit_to_epochs, the share of the training "
                                                                "steps the probabilities should reach 0/1 within; "
                                                                "the rest retrains the kept channels")
    weight_decay: float = Field(5e-4, ge=0, le=0.1, description="SGD weight decay while pruning")
