"""Print an architecture's state-dict layout as JSON (run as a subprocess so the API never imports torch).

Usage: python -m service.archspec ARCH NUM_CLASSES IN_CHANNELS   |   python -m service.archspec --list
"""

from __future__ import annotations

import json
import sys


def layout(arch: str, num_classes: int, in_channels: int) -> dict:
    """{"state": {key: {"shape": [...], "is_float": bool}}} or {"error": message}."""
    from pruning.zoo import ArchError, build_model

    try:
        model = build_model(arch, num_classes=num_classes, in_channels=in_channels)
    except (ArchError, ValueError, TypeError) as exc:
        return {"error": str(exc)}
    return {"state": {k: {"shape": list(v.shape), "is_float": v.is_floating_point()}
                      for k, v in model.state_dict().items()}}


def main(argv: list[str]) -> int:
    if argv == ["--list"]:
        from pruning.zoo import default_resolution, known_archs

        print(json.dumps({"archs": {a: {"default_resolution": default_resolution(a)} for a in known_archs()}}))
        return 0
    if len(argv) != 3:
        print(json.dumps({"error": "usage: archspec ARCH NUM_CLASSES IN_CHANNELS"}))
        return 2
    print(json.dumps(layout(argv[0], int(argv[1]), int(argv[2]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
