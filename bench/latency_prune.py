"""A latency-budget prune (l1 + LPNet) of resnet56 at a share of its dense latency, re-measured.

Usage: python bench/latency_prune.py --home .latprune/bench [--share 0.5] [--epochs 3]
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

import torch

from latency.store import load_latency_model
from pruning.budget import Budget
from pruning.pipeline import PruneRequest, run_prune

DEVICE, ARCH, RESOLUTION = "bench-cpu-1t", "resnet56", 32


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, default=Path(".latprune/bench"))
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--method", default="l1")
    args = parser.parse_args()
    latency = load_latency_model(args.home, DEVICE, ARCH, RESOLUTION)
    # The budget is a share of the dense latency in the predictor's scale (its interleaved dense reference), the
    # same scale the finisher's drift-corrected measurements use, so machine drift since profiling cancels.
    with torch.no_grad():
        dense_ms = float(latency.predict_ms(torch.ones(len(latency.group_sizes))))
    budget_ms = args.share * dense_ms
    with tempfile.TemporaryDirectory() as tmp:
        request = PruneRequest(arch=ARCH, dataset="builtin:digits", method=args.method,
                               budget=Budget("latency_ms", budget_ms, DEVICE), epochs=args.epochs)
        report = run_prune(request, Path(tmp) / "out", latency=latency)
    pruned = report["latency_ms"]["pruned"]
    ratio = pruned.get("ratio_to_dense")
    print(f"{args.method} on {ARCH}@{RESOLUTION}, builtin:digits, {args.epochs}+{args.epochs} epochs, "
          f"budget {args.share:.0%} of dense = {budget_ms:.3f} ms on {DEVICE}\n")
    print("| model | MACs | predicted ms | measured ms | accuracy |")
    print("|---|---|---|---|---|")
    for row in ("dense", "pruned"):
        lat = report["latency_ms"][row]
        predicted = "-" if lat["predicted"] is None else f"{lat['predicted']:.3f}"
        print(f"| {row} | {report[row]['macs']:,} | {predicted} | {lat['measured']:.3f} | "
              f"{100 * report[row]['accuracy']:.2f}% |")
    if ratio is None:
        print(f"\nre-measured / budget = {pruned['measured'] / budget_ms:.3f} (absolute, not drift-corrected)")
    else:
        print(f"\nre-measured pruned/dense (interleaved) = {ratio:.3f} against a budget of {args.share:.3f}: "
              f"{ratio / args.share:.3f} of the budget (target within 0.90-1.10); drift-corrected pruned ms "
              f"{pruned['drift_corrected']:.3f}; measured-latency rounds: {report['latency_ms'].get('rounds')}")


if __name__ == "__main__":
    main()
