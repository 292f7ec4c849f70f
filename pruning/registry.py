"""Method table: name -> description, params schema (pydantic) and a lazily imported runner.

A method registers itself next to its params, in a torch-free module: `pruning/methods/<name>_params.py`
decorates its params class with `@register_method(name, target="pruning.methods.<name>:run", ...)`. The table
is filled on first use by importing every `pruning.methods.*_params` module and the modules named in the
environment variable `LATPRUNE_METHOD_PLUGINS` (comma-separated, importable names); nothing else lists the
methods. Importing this module and the built-in params modules must stay cheap (no torch): the API process
uses the table for validation and /v1/methods. A plugin module that imports torch makes the API import it too.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

PLUGINS_ENV = "LATPRUNE_METHOD_PLUGINS"


class UnknownMethodError(ValueError):
    """A method name that is not registered."""


class MethodParams(BaseModel):
    """Parameters shared by every method."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    round_to: int = Field(1, ge=1, le=64, description="round every group's kept channels to a multiple of this "
                                                      "(device block size; 1 = no rounding)")


class CohortParams(MethodParams):
    """Parameters of a method that yields a cohort of subnets (pruning.cohort.run_cohort) instead of one model.

    The worker asks a cohort method for what it needs through these two methods, never through its own fields.
    """

    def member_resolutions(self) -> list[int]:
        """Input resolutions of the cohort's members; empty: the job's own."""
        return []

    def member_budgets(self) -> list[float]:
        """Budgets of the cohort's members, in the job budget's kind; empty: the job's own."""
        return []


@dataclass(frozen=True)
class MethodInfo:
    """A registered method."""

    name: str
    description: str
    params_model: type[MethodParams]
    target: str  # "module:function", imported only when the method runs
    # The method trains the model while it selects channels, so it takes a share of a job's epochs (the bench
    # splits its common epochs by this); False: it selects from the trained weights without training.
    trains: bool = False
    # False: the method trains from the initial weights itself (pruning while training from scratch), so the
    # pipeline skips the dense training stage when no weights are given.
    needs_dense: bool = True

    @property
    def produces_cohort(self) -> bool:
        """A cohort method yields many subnets (pruning.cohort.run_cohort), not one (pipeline.run_prune)."""
        return issubclass(self.params_model, CohortParams)

    def params_schema(self) -> dict[str, Any]:
        return self.params_model.model_json_schema()

    def validate_params(self, params: dict[str, Any] | None) -> MethodParams:
        """Parsed params; raises pydantic.ValidationError naming the wrong field."""
        return self.params_model.model_validate(params or {})


class MethodTable(Mapping[str, MethodInfo]):
    """name -> MethodInfo, discovered on first use (see the module docstring)."""

    def __init__(self) -> None:
        self._methods: dict[str, MethodInfo] = {}
        self._discovered = False
        self._plugins: set[str] = set()
        self._lock = threading.RLock()

    def add(self, info: MethodInfo) -> None:
        """Register `info`; a name registered twice by different targets is an error."""
        with self._lock:
            known = self._methods.get(info.name)
            if known is not None and known.target != info.target:
                raise ValueError(f"method {info.name!r} is registered twice ({known.target}, {info.target})")
            self._methods[info.name] = info

    def discover(self) -> None:
        """Import the built-in params modules once, and every plugin module not imported yet (the environment
        variable is read on every lookup, so a plugin named after start-up is found too)."""
        with self._lock:
            if not self._discovered:
                self._discovered = True
                for module in builtin_param_modules():
                    importlib.import_module(module)
            for module in plugin_modules():
                if module not in self._plugins:
                    importlib.import_module(module)
                    self._plugins.add(module)

    def forget(self, name: str) -> None:
        """Unregister `name` (tests that register a method for a while)."""
        with self._lock:
            info = self._methods.pop(name, None)
            if info is not None:
                self._plugins.discard(info.params_model.__module__)

    def __getitem__(self, name: str) -> MethodInfo:
        self.discover()
        return self._methods[name]

    def __iter__(self) -> Iterator[str]:
        self.discover()
        return iter(sorted(self._methods))

    def __len__(self) -> int:
        self.discover()
        return len(self._methods)


def builtin_param_modules() -> list[str]:
    """The torch-free `pruning.methods.*_params` modules, where the built-in methods register."""
    import pruning.methods as package

    return [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)
            if m.name.endswith("_params")]


def plugin_modules() -> list[str]:
    """Modules named in LATPRUNE_METHOD_PLUGINS."""
    return [name.strip() for name in os.environ.get(PLUGINS_ENV, "").split(",") if name.strip()]


METHODS = MethodTable()
Params = TypeVar("Params", bound=type[MethodParams])


def register_method(name: str, *, target: str, description: str | None = None, trains: bool = False,
                    needs_dense: bool = True) -> Callable[[Params], Params]:
    """Class decorator on a method's params model: register the method `name` run by `target` ("module:function",
    imported only when a job runs it). The description defaults to the params class's docstring."""
    def decorate(params_model: Params) -> Params:
        text = description or " ".join((params_model.__doc__ or name).split())
        METHODS.add(MethodInfo(name, text, params_model, target, trains=trains, needs_dense=needs_dense))
        return params_model

    return decorate


def get_method(name: str) -> MethodInfo:
    """The method called `name`, or UnknownMethodError listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}") from None


def load_runner(name: str) -> Callable[..., Any]:
    """Import and return the method's run function."""
    module_name, _, attr = get_method(name).target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def load_check(name: str) -> Callable[..., Any] | None:
    """The method module's optional `check(model, graph, params)`, which raises
    pruning.methods.api.NotApplicable (one line: why, what to do) for an architecture the method cannot prune;
    the pipeline calls it before any training. None when the module has none."""
    module_name, _, _ = get_method(name).target.partition(":")
    return getattr(importlib.import_module(module_name), "check", None)
