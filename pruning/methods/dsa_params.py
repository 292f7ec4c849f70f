"""Parameters of dsa, and its registration.

Torch-free: the registry imports this module to list and validate the method (see pruning.registry).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from pruning.registry import MethodParams, register_method


@register_method("dsa", target="pruning.methods.dsa:run", trains=True)
class DSAParams(MethodParams):
    """DSA, Differentiable Sparsity Allocation (Ning et al., ECCV 2020): every group keeps a learned ratio
    alpha = floor + (1 - floor) sigmoid(a) of its channels; channels are sampled with probabilities from their
    |BN gamma| whose mean is alpha (straight-through), and the budget on the soft cost of the alphas (the device's
    LPNet latency, or MACs/params) is a constraint solved by ADMM, z projected onto the budget set by a bracketed
    search over its Lagrange multiplier; each group then keeps its top alpha x width channels by |gamma|, before
    the finisher and fine-tuning. Starts from the trained dense model."""

    beta2: float = Field(5.0, gt=0, le=100, description="sharpness of the keep probabilities in log|gamma|: "
                                                         "p = min(1, 0.01 + sigmoid(beta2 (ln|gamma| - ln beta1)))")
    alpha_init: float = Field(0.95, gt=0, lt=1, description="initial keep ratio of every group (raised to its "
                                                             "floor where lower)")
    min_keep: float = Field(0.05, ge=0, le=1, description="lowest keep ratio alpha may take in any group (at "
                                                           "least one channel, and 0.02 so that mean p can reach "
                                                           "it); the finisher may still go below")
    alpha_lr: float = Field(0.02, gt=0, le=10, description="learning rate of the gradient step on the keep "
                                                            "ratios alpha (in ratio space; constant, not on the "
                                                            "weights' cosine schedule, so ADMM converges to the end); "
                                                            "alpha_lr x rho_final must stay under 2 (stability)")
    rho_init: float = Field(1.0, gt=0, le=1e4, description="initial ADMM penalty weight rho")
    rho_final: float = Field(50.0, gt=0, le=1e6, description="ADMM penalty weight reached at rho_share of the "
                                                             "updates (grows geometrically from rho_init)")
    rho_share: float = Field(0.6, gt=0, le=1, description="share of the ADMM updates over which rho grows from "
                                                           "rho_init to rho_final (then stays)")
    admm_interval_steps: int = Field(5, ge=1, le=10000, description="training steps between ADMM updates (z: "
                                                                     "projection onto the budget set; u: dual)")
    spend_budget: bool = Field(True, description="project z onto the budget's level set (cost = target) instead "
                                                 "of the set under it, so that the ratios spend the budget even "
                                                 "where the task gradient on them is too weak to push them up")
    cost_rounding: bool = Field(True, description="round every group's alpha x width down or up so that the "
                                                  "hard cost stays within alpha's soft cost (false: to the nearest "
                                                  "count, which can miss it by half a channel per group)")
    projection_tolerance: float = Field(1e-3, gt=0, le=0.05, description="relative distance of the projection's "
                                                                          "cost to the target at which the "
                                                                          "multiplier search stops")

    @model_validator(mode="after")
    def _stable_step(self) -> DSAParams:
        # The penalty's step moves alpha by alpha_lr x rho x (alpha - z + u): past 2 it overshoots and diverges.
        if self.alpha_lr * self.rho_final >= 2.0:
            raise ValueError(f"alpha_lr x rho_final = {self.alpha_lr * self.rho_final:g} must be < 2 (the ADMM "
                             "step on alpha overshoots otherwise); lower alpha_lr or rho_final")
        if self.rho_final < self.rho_init:
            raise ValueError("rho_final must be >= rho_init (rho grows)")
        return self
