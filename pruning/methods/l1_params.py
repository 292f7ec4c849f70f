"""Parameters of l1, and its registration.

Torch-free: the registry imports this module to list and validate the method (see pruning.registry).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pruning.registry import MethodParams, register_method


@register_method("l1", target="pruning.methods.l1:run")
class L1Params(MethodParams):
    """L1-norm filter pruning (Li et al., ICLR 2017): prune the smallest-L1 filters to the budget (bisection),
    then fine-tune. The baseline."""

    allocation: Literal["global", "uniform"] = Field(
        "global", description="global ranking of layer-normalised L1 scores, or the same keep ratio per group")
