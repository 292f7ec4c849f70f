"""Print an architecture's state-dict layout as JSON (run as a subprocess so the API never imports torch).

Usage: python -m service.archspec --list
       python -m service.archspec --template ARCH           layout for any classes / input channels (below)
       python -m service.archspec ARCH NUM_CLASSES IN_CHANNELS

Models are built with empty weights: parameters and buffers live on torch's meta device, so no memory is
allocated or initialised, and even a 600M-parameter architecture takes a fraction of a second. The template is
the layout at 10 classes and 3 input channels, with the dimensions that follow the classes (classifier) or the
input channels (stem) marked; it is found by building at 11 classes and at 4 channels and comparing.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator

BASE_CLASSES, BASE_CHANNELS = 10, 3


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Modules built inside get their parameters and buffers on the meta device (shapes only)."""
    from torch import nn

    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def on_meta_parameter(self, name, param):  # noqa: ANN001, ANN202
        register_parameter(self, name, param)
        if param is not None:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def on_meta_buffer(self, name, tensor, persistent=True):  # noqa: ANN001, ANN202
        register_buffer(self, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = on_meta_parameter, on_meta_buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def _state(arch: str, num_classes: int, in_channels: int) -> dict[str, dict]:
    from pruning.zoo import build_model

    with empty_weights():
        model = build_model(arch, num_classes=num_classes, in_channels=in_channels)
    return {k: {"shape": list(v.shape), "is_float": v.is_floating_point()} for k, v in model.state_dict().items()}


def layout(arch: str, num_classes: int, in_channels: int) -> dict:
    """{"state": {key: {"shape": [...], "is_float": bool}}} or {"error": message}."""
    from pruning.zoo import ArchError

    try:
        return {"state": _state(arch, num_classes, in_channels)}
    except (ArchError, ValueError, TypeError) as exc:
        return {"error": str(exc)}


def _marks(base: list[int], other: list[int], was: int, now: int, name: str) -> dict[int, str] | None:
    """Dimensions that moved from `was` to `now`, marked `name`; None if some dimension moved otherwise."""
    if len(base) != len(other):
        return None
    marks = {}
    for dim, (a, b) in enumerate(zip(base, other, strict=True)):
        if a != b:
            if (a, b) != (was, now):
                return None
            marks[dim] = name
    return marks


def template(arch: str) -> dict:
    """{"state": {key: {shape, is_float, vary: [[dim, "num_classes" | "in_channels"], ...]}}, "exact": bool}.

    "exact" is false when the layout does not follow the two numbers dimension for dimension; then the API asks
    for each (classes, channels) separately."""
    answer = layout(arch, BASE_CLASSES, BASE_CHANNELS)
    if "error" in answer:
        return answer
    base = answer["state"]
    more_classes = _state(arch, BASE_CLASSES + 1, BASE_CHANNELS)
    more_channels = _state(arch, BASE_CLASSES, BASE_CHANNELS + 1)
    if not set(base) == set(more_classes) == set(more_channels):
        return {"state": base, "exact": False}
    for key, entry in base.items():
        by_classes = _marks(entry["shape"], more_classes[key]["shape"], BASE_CLASSES, BASE_CLASSES + 1,
                            "num_classes")
        by_channels = _marks(entry["shape"], more_channels[key]["shape"], BASE_CHANNELS, BASE_CHANNELS + 1,
                             "in_channels")
        if by_classes is None or by_channels is None or set(by_classes) & set(by_channels):
            return {"state": base, "exact": False}
        entry["vary"] = sorted([dim, name] for dim, name in {**by_classes, **by_channels}.items())
    return {"state": base, "exact": True}


def main(argv: list[str]) -> int:
    if argv == ["--list"]:
        from pruning.zoo import default_resolution, known_archs

        print(json.dumps({"archs": {a: {"default_resolution": default_resolution(a)} for a in known_archs()}}))
        return 0
    if len(argv) == 2 and argv[0] == "--template":
        print(json.dumps(template(argv[1])))
        return 0
    if len(argv) != 3:
        print(json.dumps({"error": "usage: archspec --list | --template ARCH | ARCH NUM_CLASSES IN_CHANNELS"}))
        return 2
    print(json.dumps(layout(argv[0], int(argv[1]), int(argv[2]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
