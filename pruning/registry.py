"""Method table: name -> description, params schema (pydantic) and a lazily imported runner.

Importing this module must stay cheap (no torch): the API process uses it for validation and /v1/methods.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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


@dataclass(frozen=True)
class MethodInfo:
    """A registered method."""

    name: str
    description: str
    params_model: type[MethodParams]
    target: str  # "module:function", imported only when the method runs

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
