"""A latency-budget prune (l1 + LPNet) of resnet56 at a share of its dense latency, re-measured.

Usage: python bench/latency_prune.py --home .latprune/bench [--share 0.5] [--epochs 1]
Needs the device `bench-cpu-1t` and its resnet56@32 predictor in --home (bench/latency.py makes both).
Prints dense and pruned predicted/measured latency and how far the re-measured latency is from the budget.
"""

# ruff: noqa: E402  (imports follow the sys.path fix below)
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and `latency` would import bench/latency.py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import tempfile

from latency.store import load_latency_model
from pruning.budget import Budget
from pruning.pipeline import PruneRequest, run_prune
from pruning.surgery import export_onnx
from pruning.zoo import build_model

DEVICE, ARCH, RESOLUTION = "bench-cpu-1t", "resnet56", 32


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, default=Path(".latprune/bench"))
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--method", default="l1")
    args = parser.parse_args()
    latency = load_latency_model(args.home, DEVICE, ARCH, RESOLUTION)
    with tempfile.TemporaryDirectory() as tmp:
        dense_path = export_onnx(build_model(ARCH, 10, 1).eval(), Path(tmp) / "dense.onnx", (1, 1, 32, 32))
        dense_ms = latency.measure_ms(str(dense_path))
        budget_ms = args.share * dense_ms
        request = PruneRequest(arch=ARCH, dataset="builtin:digits", method=args.method,
                               budget=Budget("latency_ms", budget_ms, DEVICE), epochs=args.epochs)
        report = run_prune(request, Path(tmp) / "out", latency=latency)
    measured = report["latency_ms"]["pruned"]["measured"]
    print(f"{args.method} on {ARCH}@{RESOLUTION}, builtin:digits, {args.epochs}+{args.epochs} epochs, "
          f"budget {args.share:.0%} of dense = {budget_ms:.3f} ms on {DEVICE}\n")
    print("| model | MACs | predicted ms | measured ms | accuracy |")
    print("|---|---|---|---|---|")
    for row in ("dense", "pruned"):
        lat = report["latency_ms"][row]
        predicted = "-" if lat["predicted"] is None else f"{lat['predicted']:.3f}"
        print(f"| {row} | {report[row]['macs']:,} | {predicted} | {lat['measured']:.3f} | "
              f"{100 * report[row]['accuracy']:.2f}% |")
    print(f"\nre-measured / budget = {measured / budget_ms:.3f} (target within 0.90-1.10); "
          f"finisher rounds: {report['latency_ms'].get('rounds')}")


if __name__ == "__main__":
    main()
