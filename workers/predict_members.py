"""Predicted latency of a finished job's members on one device, run as a subprocess of the API (which never imports
torch): `python -m workers.predict_members` reads one JSON request on stdin and prints one JSON answer line.

Request: {"store": artifact root, "device": {"name", "spec"}, "predictors": {"<resolution>": {"id", "path"}},
          "members": [{"member", "resolution", "keep_counts"}]}
Answer:  {"predicted_ms": {"<member>": ms}}, or {"error": message, "resolution": r} when a predictor cannot be used.
Members whose channel groups do not match their resolution's predictor get no prediction.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def predict(request: dict[str, Any]) -> dict[str, Any]:
    """The answer to one request (see the module docstring)."""
    from service.models import Device, Predictor
    from service.storage import ArtifactStore
    from workers.cohort_job import load_latency_model
    from workers.device_latency import predict_counts_ms

    store = ArtifactStore(request["store"])
    device = Device(name=request["device"]["name"], spec=request["device"]["spec"])
    predicted: dict[str, float] = {}
    for resolution in sorted(request["predictors"], key=int):
        row = request["predictors"][resolution]
        try:
            model = load_latency_model(store, device, Predictor(id=row["id"], path=row["path"]), int(resolution))
        except ValueError as exc:
            return {"error": str(exc), "resolution": int(resolution)}
        for member in request["members"]:
            if member["resolution"] != int(resolution):
                continue
            ms = predict_counts_ms(model, member["keep_counts"])
            if ms is not None:
                predicted[str(member["member"])] = ms
    return {"predicted_ms": predicted}


def main() -> int:
    print(json.dumps(predict(json.loads(sys.stdin.read()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
