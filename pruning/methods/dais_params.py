"""Parameters of dais, and its registration.

Torch-free: the registry imports this module to list and validate the method (see pruning.registry).
"""

from __future__ import annotations

from pydantic import Field

from pruning.registry import MethodParams, register_method


@register_method("dais", target="pruning.methods.dais:run", trains=True)
class DAISParams(MethodParams):
    """DAIS, Differentiable Annealing Indicator Search (Guan et al., TNNLS 2023): every channel group gets
    indicators I = sigmoid(alpha / T) that multiply its channels; the weights train on the training split while
    alpha trains on the held-out split (first-order alternation) against the validation loss plus an L1 term on
    the indicators and a log-barrier-like term keeping the soft cost (the device's LPNet latency, or MACs/params)
    within a band around the budget; T is annealed so the indicators binarize; channels with I >= 0.5 are kept,
    then the finisher and fine-tuning."""

    temperature_init: float = Field(1.0, gt=0, le=100, description="initial temperature T of the indicators "
                                                                   "sigmoid(alpha / T)")
    anneal_factor: float = Field(50.0, ge=1, le=1e4, description="T falls geometrically by this factor over the "
                                                                 "search (1: no annealing)")
    alpha_init: float = Field(1.0, ge=-10, le=10, description="initial alpha of a channel of average L1 norm "
                                                              "(> 0: indicators start open)")
    init_spread: float = Field(0.5, ge=0, le=10, description="initial alphas spread by init_spread x (L1 norm / "
                                                             "group mean - 1), clipped to [-1, 1] (0: all equal)")
    alpha_lr: float | None = Field(None, gt=0, le=10, description="Adam learning rate of the alphas; None: "
                                                                  "alpha_travel x (|alpha_init| + init_spread) / "
                                                                  "the search's steps, within [0.005, 0.5]")
    alpha_travel: float = Field(6.0, gt=0, le=100, description="with alpha_lr None: how many times the initial "
                                                               "alphas' span one alpha can move over the search")
    l1_weight: float = Field(0.1, ge=0, le=100, description="mu1: weight of the mean of the indicators over all "
                                                            "channels in the alpha objective")
    budget_weight: float = Field(5.0, ge=0, le=1e4, description="mu2: weight of the budget term in the alpha "
                                                                "objective")
    band: float = Field(0.03, ge=0, le=0.5, description="t: the budget term is zero while the soft cost lies in "
                                                        "[(1 - t), (1 + t)] x the target, log(cost / edge) outside")
