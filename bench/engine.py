"""Dense vs pruned MACs and onnxruntime latency at flops=0.5 and 0.3 (l1, global allocation).

Usage: python bench/engine.py
Prints a markdown table: per architecture, budget and channel rounding, MACs kept, single-thread median
latency, and the realized speed-up next to the MACs ratio. Random weights: latency does not depend on the values.
"""

# ruff: noqa: E402  (imports follow the sys.path fix below)
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and `latency` would import bench/latency.py.
from docsection import write_section  # bench/ is still first on sys.path here

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import platform
import tempfile

import onnxruntime
import torch

from latency.device import DeviceSpec
from latency.timing import OnnxRuntimeRunner, TimingPlan, measure
from pruning import zoo
from pruning.budget import BudgetCost, parse_budget
from pruning.cost import CostModel
from pruning.groups import ChannelGraph
from pruning.methods.api import MethodContext
from pruning.methods.l1 import run as run_l1
from pruning.methods.l1_params import L1Params
from pruning.surgery import export_onnx, materialize

CASES = [("resnet56", 32), ("resnet18", 64)]
BUDGETS = ["flops=0.5", "flops=0.3"]
ROUND_TO = [1, 8]
SECTION = "## Engine: MACs vs realized speed-up"  # 8: kept channels rounded to onnxruntime's block size


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} threads visible, onnxruntime {onnxruntime.__version__}, " \
           f"torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    spec = DeviceSpec(name="bench-cpu-1t", runtime="onnxruntime", provider="cpu", threads=1, batch=1)
    plan = TimingPlan(warmup_runs=20, blocks=args.blocks, runs_per_block=args.runs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, resolution in CASES:
            torch.manual_seed(0)
            model = zoo.build_model(arch, 10, 3).eval()
            shape = (1, 3, resolution, resolution)
            graph = ChannelGraph.build(model, shape)
            cost = CostModel(graph)
            dense_path = export_onnx(model, Path(tmp) / f"{arch}.onnx", shape)
            for budget_text, round_to in [(b, r) for b in BUDGETS for r in ROUND_TO]:
                budget = BudgetCost(parse_budget(budget_text), cost)
                ctx = MethodContext(model=model, graph=graph, cost_model=cost, budget=budget,
                                    params=L1Params(round_to=round_to),
                                    train_loader=None, val_loader=None, device=torch.device("cpu"), epochs=0,
                                    lr=0.0)
                result = run_l1(ctx)
                pruned = materialize(model, graph, result.keep_masks)
                counts = [int(m.sum()) for m in result.keep_masks]
                pruned_path = export_onnx(pruned, Path(tmp) / f"{arch}-{budget_text}-{round_to}.onnx", shape)
                # Dense timed block-interleaved with the pruned model so drift cancels in the ratio.
                m = measure(OnnxRuntimeRunner(pruned_path, spec), plan,
                            reference=OnnxRuntimeRunner(dense_path, spec))
                macs = float(cost.macs(counts))
                rows.append((arch, resolution, budget_text, round_to, cost.dense_macs, int(macs), m.reference.median_ms,
                             m.sample.median_ms, cost.dense_macs / macs, m.reference.median_ms / m.sample.median_ms,
                             m.noise))
    lines = [SECTION, "", "`python bench/engine.py`: l1 (global allocation) on random weights, dense vs pruned.",
             f"Machine: {machine()}; onnxruntime CPU provider, 1 intra-op thread, batch 1, "
             f"{args.blocks} blocks x {args.runs} runs, medians; dense and pruned timed interleaved.", "",
             "| arch | res | budget | round_to | dense MACs | pruned MACs | dense ms | pruned ms | MACs ratio | "
             "speed-up | IQR/med |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:,} | {r[5]:,} | {r[6]:.3f} | {r[7]:.3f} | "
                     f"{r[8]:.2f}x | {r[9]:.2f}x | {r[10]:.1%} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
