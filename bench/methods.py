"""Pruning methods under latency budgets: wgates vs l1 vs torch-pruning's MetaPruner (GroupNormImportance).

Usage: python bench/methods.py [--archs resnet20,resnet56] [--budgets 0.6,0.4] [--seeds 0,1,2]
                               [--dense-epochs 10] [--epochs 10] [--samples 300] [--wgates-epochs N]
                               [--wgates-params JSON] [--variant NAME=JSON ...] [--json FILE] [--home DIR]
                               [--no-write] [--tiny]

On builtin:digits (32x32, grayscale), for the onnxruntime CPU 1-thread device: profile every architecture and
fit its LPNet (resumable, shared with bench/latency.py through the same home and device name), train one dense
model per (architecture, seed), then prune it with every method to latency budgets given as fractions of the
dense latency. Every method gets the same epochs after the dense model: wgates trains its gates for a sixth of
them (--wgates-epochs) and fine-tunes for the rest; l1 and MetaPruner fine-tune for all of them. All three go
through the same job pipeline (finisher, on-device re-measure loop, fine-tune, export). MetaPruner (global
pruning, ratio bisected to the predicted latency budget) is registered for this process only. Prints a markdown
table (mean and spread over seeds) and writes the section "Pruning methods under latency budgets" of
docs/benchmarks.md.
"""

# ruff: noqa: E402  (imports follow the sys.path fix below)
from __future__ import annotations

import sys
from pathlib import Path

from docsection import DOC, write_section  # bench/ is still first on sys.path here

# Run as a script, this file's folder comes first on sys.path and `latency` would import bench/latency.py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import onnxruntime
import torch
from rich.console import Console

from latency.device import make_device
from latency.predictors import fit_predictor
from latency.profiler import ProfileTarget, profile
from latency.samples import SampleStore
from latency.store import LatencyHome, load_latency_model
from pruning import zoo
from pruning.allocation import bisect_scalar
from pruning.budget import Budget
from pruning.data import load_dataset, make_loaders
from pruning.importance import GroupNormImportance
from pruning.methods.api import MethodContext, Selection
from pruning.pipeline import PruneRequest, run_prune
from pruning.registry import MethodParams, get_method, register_method
from pruning.train import evaluate, seed_everything, train

SECTION = "## Pruning methods under latency budgets"
DEVICE = "bench-cpu-1t"
DATASET = "builtin:digits"
RESOLUTION = 32
METAPRUNER = "tp_metapruner"
MAX_RATIO = 0.8
console = Console()


@register_method(METAPRUNER, target=f"{__name__}:run_metapruner")
class MetaPrunerParams(MethodParams):
    """torch-pruning MetaPruner, global, GroupNormImportance (registered by bench/methods.py for its process)."""


def run_metapruner(ctx: MethodContext) -> Selection:
    """torch-pruning's MetaPruner, global pruning with GroupNormImportance, ratio bisected to the budget."""
    import torch_pruning as tp

    model, graph = ctx.model.eval(), ctx.graph
    example = torch.randn(*graph.input_shape)
    ignored = [model.get_submodule(name) for name in graph.ignored]
    index = {group.root: group.index for group in graph.groups}
    names = {module: name for name, module in model.named_modules()}

    def masks_at(ratio: float) -> list[torch.Tensor]:
        masks = [torch.ones(g.size, dtype=torch.bool) for g in graph.groups]
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      global_pruning=True, pruning_ratio=ratio, ignored_layers=ignored)
        for group in pruner.step(interactive=True):  # record the choice; the model itself is left whole
            root = names.get(group[0].dep.target.module)
            if root in index:
                masks[index[root]][group[0].idxs] = False
        for mask in masks:  # MetaPruner may empty a group; keep its first channel, as materialize needs one
            if not bool(mask.any()):
                mask[0] = True
        return masks

    def fits(ratio: float) -> bool:
        return ctx.budget.fits([int(m.sum()) for m in masks_at(ratio)])

    # The smallest global pruning ratio whose predicted cost fits (cost falls as the ratio grows). Above
    # MAX_RATIO MetaPruner skips the groups it would empty, so the cost rises again: if even MAX_RATIO does
    # not fit, the pipeline's finisher trims the rest by the same importance.
    ratio = 0.0
    if not fits(ratio):
        ratio = bisect_scalar(fits, MAX_RATIO, 0.0, iterations=12) if fits(MAX_RATIO) else MAX_RATIO
    masks = masks_at(ratio)
    scores = GroupNormImportance()(model, graph)
    # GroupNormImportance is already normalized per group (by its mean): the finisher ranks it as it is.
    return Selection(model, masks, scores, score_scale="global", info={"pruning_ratio": ratio})


def default_gate_epochs(epochs: int) -> int:
    """wgates' share of the common epochs: a sixth (at least one) trains the gates, the rest fine-tunes. Longer
    gate training on a converged dense model lets the latency gradient, not the vanishing task loss, pick the
    channels; the weights then get less fine-tuning (docs/methods.md)."""
    return min(epochs, max(1, epochs // 6))


@dataclass
class Row:
    arch: str
    budget: float
    target_ms: float
    method: str
    seed: int
    predicted_ms: float
    measured_ms: float
    raw_measured_ms: float
    macs: int
    params: int
    accuracy: float
    dense_accuracy: float
    seconds: float
    rounds: int
    within_tolerance: bool


def latency_model(home: LatencyHome, arch: str, samples: int):
    """Profile `arch` on the bench device up to `samples` configurations, fit its LPNet, load it."""
    target = ProfileTarget.build(arch, RESOLUTION)
    store = SampleStore(home.profile_path(DEVICE, arch, RESOLUTION))
    started = time.perf_counter()
    result = profile(home.device(DEVICE), target, store, samples, repeat_share=0.0)
    console.print(f"{arch}@{RESOLUTION}: profiled {result.measured} new configurations "
                  f"({result.total_samples} wanted) in {time.perf_counter() - started:.0f} s", highlight=False)
    fit_predictor(home, DEVICE, arch, [RESOLUTION])
    return load_latency_model(home.root, DEVICE, arch, RESOLUTION)


def dense_weights(work: Path, arch: str, seed: int, epochs: int) -> tuple[Path, float]:
    """Dense weights of (arch, seed) trained for `epochs` (cached in `work`) and their test accuracy."""
    path = work / f"dense_{arch}_s{seed}_e{epochs}.safetensors"
    splits = load_dataset(DATASET, None, RESOLUTION)
    _, _, test_loader = make_loaders(splits, 64, seed)
    model = zoo.build_model(arch, splits.num_classes, splits.in_channels)
    if path.exists():
        zoo.load_weights(model, path)
    else:
        seed_everything(seed)
        train_loader, _, _ = make_loaders(splits, 64, seed)
        train(model, train_loader, epochs, lr=0.05, seed=seed)
        work.mkdir(parents=True, exist_ok=True)
        zoo.save_weights(model, path)
    return path, evaluate(model, test_loader)


def run_one(work: Path, latency, arch: str, fraction: float, method: str, seed: int, weights: Path,
            dense_accuracy: float, epochs: int, params: dict | None = None, gate_epochs: int | None = None,
            label: str | None = None) -> Row:
    """One pruning job through the pipeline; its report as a table row (named `label`, else `method`)."""
    target_ms = fraction * latency.reference_ms
    gate_epochs = default_gate_epochs(epochs) if gate_epochs is None else gate_epochs
    # A method that trains while it selects (wgates, the gate methods) takes its share of the common epochs.
    trains = get_method(method).trains
    method_epochs, finetune = (gate_epochs, epochs - gate_epochs) if trains else (0, epochs)
    request = PruneRequest(arch=arch, dataset=DATASET, method=method, budget=Budget("latency_ms", target_ms, DEVICE),
                           epochs=method_epochs, finetune_epochs=finetune, weights_path=weights,
                           resolution=RESOLUTION, seed=seed, params=params or {})
    tag = "_" + "_".join(f"{k}{v}" for k, v in sorted((params or {}).items())) if params else ""
    tag += f"_g{method_epochs}" if trains else ""
    out = work / "runs" / f"{arch}_{fraction:g}_{label or method}{tag}_s{seed}"
    report = run_prune(request, out, latency=latency)
    section = report["latency_ms"]
    pruned = section["pruned"]
    return Row(arch, fraction, target_ms, label or method, seed, float(pruned["predicted"]),
               float(pruned.get("drift_corrected", pruned["measured"])), float(pruned["measured"]),
               report["pruned"]["macs"], report["pruned"]["params"], report["pruned"]["accuracy"], dense_accuracy,
               report["seconds"], int(section.get("rounds", 0)),
               float(pruned.get("drift_corrected", pruned["measured"])) <= target_ms * 1.10)


def parse_variants(specs: list[str]) -> dict[str, tuple[dict, int | None]]:
    """--variant NAME=JSON options as {name: (wgates params, gate epochs or None)}."""
    variants = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        if not sep or not name.startswith("wgates_"):
            raise SystemExit(f"--variant {spec!r}: write NAME=JSON with NAME starting 'wgates_'")
        params = json.loads(text or "{}")
        gate_epochs = params.pop("gate_epochs", None)
        variants[name] = (params, gate_epochs)
    return variants


def spread(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """mean ± standard deviation (population of seeds), scaled."""
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.pstdev(values) * scale:.{digits}f}"


def table(rows: list[Row], dense_ms: dict[str, float]) -> list[str]:
    """Markdown table: one line per (arch, budget, method), mean ± spread over seeds."""
    lines = ["| arch | budget | method | seeds | predicted ms | measured ms | measured / target | MACs (M) | "
             "params (k) | accuracy % | wall s | at most +10% | within ±10% |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r.arch, r.budget, r.method) for r in rows}, key=lambda k: (k[0], -k[1], k[2]))
    for arch, fraction, method in keys:
        group = [r for r in rows if (r.arch, r.budget, r.method) == (arch, fraction, method)]
        target = group[0].target_ms
        lines.append(
            f"| {arch} | {fraction:.0%} of {dense_ms[arch]:.3f} ms = {target:.3f} ms | {method} | {len(group)} | "
            f"{spread([r.predicted_ms for r in group])} | {spread([r.measured_ms for r in group])} | "
            f"{spread([r.measured_ms / target for r in group], digits=2)} | "
            f"{spread([r.macs for r in group], 1e-6, 2)} | {spread([r.params for r in group], 1e-3, 1)} | "
            f"{spread([r.accuracy for r in group], 100, 2)} | {spread([r.seconds for r in group], digits=0)} | "
            f"{sum(r.within_tolerance for r in group)}/{len(group)} | "
            f"{sum(abs(r.measured_ms / target - 1) <= 0.10 for r in group)}/{len(group)} |")
    return lines


def comparisons(rows: list[Row]) -> list[str]:
    """Markdown table: each wgates variant's accuracy minus every other method's, paired by seed (same dense
    model)."""
    methods = {r.method for r in rows}
    ours = sorted(m for m in methods if m.startswith("wgates"))
    others = sorted(methods - set(ours))
    lines = ["| arch | budget | variant | " + " | ".join(f"minus {o} (points)" for o in others) + " |",
             "|---|---|---|" + "---|" * len(others)]
    for arch, fraction in sorted({(r.arch, r.budget) for r in rows}, key=lambda k: (k[0], -k[1])):
        by = {(r.method, r.seed): r for r in rows if (r.arch, r.budget) == (arch, fraction)}
        for method in [m for m in ours if any(key[0] == m for key in by)]:
            cells = []
            for other in others:
                gaps = [by[method, seed].accuracy - by[other, seed].accuracy for m, seed in by
                        if m == other and (method, seed) in by]
                wins = sum(g >= 0 for g in gaps)
                cells.append(f"{spread(gaps, 100, 2)} ({wins}/{len(gaps)} seeds >= 0)" if gaps else "-")
            lines.append(f"| {arch} | {fraction:.0%} | {method} | " + " | ".join(cells) + " |")
    return lines


def section(rows: list[Row], dense_ms: dict[str, float], dense_acc: dict[str, list[float]], args,
            failures: Sequence[str] = ()) -> str:
    """The markdown section for docs/benchmarks.md."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    dense = ", ".join(f"{arch} {spread(acc, 100, 2)} %" for arch, acc in dense_acc.items())
    gate_epochs = default_gate_epochs(args.epochs) if args.wgates_epochs is None else args.wgates_epochs
    text = [SECTION, "",
            f"`python bench/methods.py --archs {args.archs} --budgets {args.budgets} --seeds {args.seeds} "
            f"--dense-epochs {args.dense_epochs} --epochs {args.epochs} --samples {args.samples}"
            + (f" --wgates-epochs {args.wgates_epochs}" if args.wgates_epochs is not None else "")
            + (f" --wgates-params '{json.dumps(args.wgates_params)}'" if args.wgates_params else "")
            + "".join(f" --variant '{v}'" for v in args.variant)
            + f"`: {DATASET} at "
            f"{RESOLUTION}x{RESOLUTION}, device onnxruntime {onnxruntime.__version__} CPU, 1 thread, batch 1 "
            f"({cpu}, shared machine); torch {torch.__version__}. Dense models trained {args.dense_epochs} epochs "
            f"(test accuracy {dense}). Every method then gets {args.epochs} epochs: wgates {gate_epochs} "
            f"of gate training + {args.epochs - gate_epochs} of fine-tuning, l1 and MetaPruner "
            f"{args.epochs} of fine-tuning. Budgets are fractions of the dense latency the LPNet was fitted "
            "against (median of the profile's interleaved dense reference).",
            "",
            "*predicted ms*: the LPNet prediction of the final configuration; *measured ms*: the exported model "
            "timed on the device alternated run by run with the dense model (median over 5 rounds of the ratio of "
            "10th percentiles, as the profile labels LPNet, x dense reference ms; cancels the shared machine's "
            "speed drift); *at most +10%*: seeds whose measured "
            "latency is at most 10% over the budget; *within ±10%*: seeds within 10% of it either way. Mean ± "
            "standard deviation over seeds. Accuracy: test split of digits (269 images; one image = 0.37 points).",
            "", *table(rows, dense_ms), "",
            "wgates' accuracy against each other method on the same dense model (same seed), mean ± spread of the "
            "difference over seeds:", "", *comparisons(rows), ""]
    if args.variant:
        text += [f"- *{name}*: wgates with `{spec}`" for name, _, spec in (v.partition("=") for v in args.variant)]
        text += [""]
    if failures:
        text += ["Runs that failed (not in the tables):", "", *(f"- {f}" for f in failures), ""]
    return "\n".join(text)


def main() -> None:
    # Redirected to a file, stdout is block-buffered and a 35-minute run would show nothing until it ends.
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="resnet20,resnet56")
    parser.add_argument("--budgets", default="0.6,0.4", help="fractions of the dense latency")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=f"wgates,l1,{METAPRUNER}")
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10, help="epochs after the dense model, for every method")
    parser.add_argument("--samples", type=int, default=300, help="profiled configurations per architecture")
    parser.add_argument("--home", type=Path, default=Path(".latprune/bench"))
    parser.add_argument("--wgates-epochs", type=int, default=None,
                        help="of --epochs, how many wgates trains its gates (the rest fine-tunes); default a sixth")
    parser.add_argument("--wgates-params", type=json.loads, default={}, help="JSON object of wgates parameters")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="also run wgates under NAME (starting 'wgates_') with these parameters; "
                             "\"gate_epochs\" in the JSON sets its gate epochs. Repeatable")
    parser.add_argument("--json", type=Path, default=None, help="also write every run as JSON here")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="run nothing: rebuild the section from a --json file of an earlier run with the same "
                             "arguments")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--tiny", action="store_true", help="smoke settings: resnet20, 60%%, one seed, 1+2 epochs, "
                                                             "40 samples; never writes docs")
    args = parser.parse_args()
    variants = parse_variants(args.variant)
    if args.tiny:
        args.archs, args.budgets, args.seeds = "resnet20", "0.6", "0"
        args.dense_epochs, args.epochs, args.samples, args.no_write = 1, 2, 40, True
    if args.from_json:
        rows = [Row(**r) for r in json.loads(args.from_json.read_text())]
        dense_ms = {r.arch: r.target_ms / r.budget for r in rows}
        dense_acc: dict[str, list[float]] = {}
        for arch, seed in sorted({(r.arch, r.seed) for r in rows}):
            first = next(r for r in rows if (r.arch, r.seed) == (arch, seed))
            dense_acc.setdefault(arch, []).append(first.dense_accuracy)
        text = section(rows, dense_ms, dense_acc, args)
        console.print(text, highlight=False, markup=False, soft_wrap=True)
        if not args.no_write:
            write_section(SECTION, text)
        return
    torch.set_num_threads(1)
    home = LatencyHome(args.home)
    home.add_device(make_device(name=DEVICE, runtime="onnxruntime", provider="cpu", threads=1, batch=1),
                    replace=True)
    work = args.home / "methods"
    rows: list[Row] = []
    failures: list[str] = []
    dense_ms: dict[str, float] = {}
    dense_acc: dict[str, list[float]] = {}
    # (row label, method, params, gate epochs) of every job per (architecture, seed, budget)
    runs = [(m, m, args.wgates_params if m == "wgates" else None, args.wgates_epochs)
            for m in args.methods.split(",") if m]
    runs += [(name, "wgates", params, gate) for name, (params, gate) in variants.items()]
    started = time.perf_counter()
    for arch in args.archs.split(","):
        latency = latency_model(home, arch, args.samples)
        dense_ms[arch] = latency.reference_ms
        for seed in [int(s) for s in args.seeds.split(",")]:
            weights, accuracy = dense_weights(work, arch, seed, args.dense_epochs)
            dense_acc.setdefault(arch, []).append(accuracy)
            for fraction in [float(b) for b in args.budgets.split(",")]:
                for label, method, params, gate_epochs in runs:
                    try:
                        row = run_one(work, latency, arch, fraction, method, seed, weights, accuracy, args.epochs,
                                      params, gate_epochs, label)
                    except Exception as error:  # noqa: BLE001 - a diverged run is a result; the others go on
                        failures.append(f"{arch} {fraction:.0%} {label} seed {seed}: {type(error).__name__}: {error}")
                        console.print(failures[-1], highlight=False, markup=False)
                        continue
                    rows.append(row)
                    if args.json:  # after every run, so that an interrupted bench keeps what it measured
                        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
                    console.print(f"{arch} {fraction:.0%} {label} seed {seed}: measured {row.measured_ms:.3f} ms "
                                  f"(target {row.target_ms:.3f}), accuracy {100 * row.accuracy:.2f}%, "
                                  f"{row.seconds:.0f} s", highlight=False)
    text = section(rows, dense_ms, dense_acc, args, failures)
    console.print(text, highlight=False, markup=False, soft_wrap=True)
    console.print(f"total {time.perf_counter() - started:.0f} s", highlight=False)
    if not args.no_write:
        write_section(SECTION, text)
        console.print(f"wrote section {SECTION!r} of {DOC}", highlight=False)


if __name__ == "__main__":
    main()
