"""Latency predictor benchmark: profile, fit and evaluate LPNet against FLOPs-linear and a lookup table.

Usage: python bench/latency.py [--samples 1000] [--cases resnet56@32,resnet18@64] [--home DIR] [--no-write]
For every case (onnxruntime CPU, 1 thread, batch 1): profile N width configurations (resumable: a rerun
measures only what is missing), fit LPNet on 80%, evaluate on the held-out 20% with both baselines and the
repeatability floor, refit on 250/500/1000 samples for the learning curve, and fit a second LPNet on
log(ms) to compare the two targets. Prints everything and writes the section "Latency predictor" of
docs/benchmarks.md (other sections are left as they are).
"""

# ruff: noqa: E402  (imports follow the sys.path fix below)
from __future__ import annotations

import sys
from pathlib import Path

from docsection import DOC, write_section  # bench/ is still first on sys.path here

# Run as a script, this file's folder comes first on sys.path and `latency` would import this very file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import time

import onnxruntime
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from latency.device import cpu_info, make_device
from latency.evaluation import both_spaces, lpnet_relative
from latency.lpnet import FitConfig, WidthFeatures
from latency.predictors import evaluate_predictor, fit_on, fit_predictor, load_data, markdown_tables, split_by_keys
from latency.profiler import ProfileTarget, profile
from latency.samples import SampleStore
from latency.store import LatencyHome

SECTION = "## Latency predictor"
DEVICE = "bench-cpu-1t"
console = Console()


def run_case(home: LatencyHome, arch: str, resolution: int, samples: int) -> dict:
    """Profile, fit, evaluate one (arch, resolution); returns timings, the report and the target comparison."""
    spec = home.device(DEVICE)
    target = ProfileTarget.build(arch, resolution)
    store = SampleStore(home.profile_path(DEVICE, arch, resolution))
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"profile {arch}@{resolution}", total=None)
        result = profile(spec, target, store, samples, repeat_share=0.05,
                         progress=lambda done, total, phase: bar.update(task, completed=done, total=total,
                                                                        description=f"{phase} {arch}@{resolution}"))
    started = time.perf_counter()
    stem, meta = fit_predictor(home, DEVICE, arch, [resolution])
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    report = evaluate_predictor(home, DEVICE, arch, resolution)
    eval_s = time.perf_counter() - started
    # Same split, same features, other target: is learning the ratio to the reference worth it?
    _, _, models, data = load_data(home, DEVICE, arch, [resolution], meta.fingerprint)
    train, test = split_by_keys(data, meta.test_keys)
    features = WidthFeatures.from_cost_models([models[resolution]], [resolution])
    alt, _ = fit_on(features, train, "log_ms", FitConfig())
    alt_scores = both_spaces(lpnet_relative(alt, test), test, train.reference_by_resolution())
    measured = result.measured + result.retried + result.repeats
    return {"arch": arch, "resolution": resolution, "profile": result, "measured": measured,
            "per_sample_s": result.elapsed_s / measured if measured else float("nan"), "fit_s": fit_s,
            "eval_s": eval_s, "report": report, "log_ms": alt_scores, "fit_info": meta.fit_info}


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def checks(case: dict) -> list[str]:
    """The issue's targets for this case, each marked met or missed with the numbers."""
    rows = case["report"]["predictors"]
    lp, fl = rows["lpnet"]["relative"], rows["flops_linear"]["relative"]
    floor = rows.get("repeatability_floor", {}).get("relative")
    out = [f"LPNet within +-10%: {lp['within_10']:.1%} (target >= 90%): {_verdict(lp['within_10'] >= 0.9)}",
           f"Spearman rho {lp['spearman']:.4f} (target >= 0.97): {_verdict(lp['spearman'] >= 0.97)}"]
    if floor:
        gap = (floor["within_10"] - lp["within_10"]) * 100
        out.append(f"repeatability floor within +-10%: {floor['within_10']:.1%}; LPNet is {gap:.1f} points below "
                   f"(target <= 5): {_verdict(gap <= 5)}")
    beats = lp["mape"] < fl["mape"] and lp["within_5"] >= fl["within_5"] and lp["within_10"] >= fl["within_10"] \
        and lp["spearman"] > fl["spearman"]
    out.append(f"beats FLOPs-linear on every metric: {_verdict(beats)}")
    if case["arch"] == "resnet56":
        projected = case["per_sample_s"] * 1000 / 60
        out.append(f"profiling: {case['per_sample_s']:.2f} s/sample -> {projected:.1f} min per 1000 samples "
                   f"(target <= 15): {_verdict(projected <= 15)}")
    return out


def section(cases: list[dict], samples: int) -> str:
    cpu, isa = cpu_info()
    lines = [SECTION, "",
             f"`python bench/latency.py --samples {samples}`: onnxruntime {onnxruntime.__version__} CPU, 1 intra-op "
             f"thread, batch 1, torch {torch.__version__}; {cpu} ({', '.join(isa)}), shared 2-core machine. "
             "Every sample is timed alternated run by run with the dense reference; 20% of the configurations are "
             "held out; 5% are re-measured at the end for the repeatability floor. Relative = latency / the "
             "interleaved reference (what LPNet learns); absolute = predicted relative latency x the training "
             "set's median reference ms, against the measured ms.", ""]
    for case in cases:
        p = case["profile"]
        lines += [f"### {case['arch']} @ {case['resolution']}x{case['resolution']}", "",
                  f"Profiling: {case['measured']} measurements ({p.measured} new + {p.retried} noisy retried + "
                  f"{p.repeats} repeats, {p.skipped} already stored) in {p.elapsed_s:.0f} s = "
                  f"{case['per_sample_s']:.2f} s each; {p.noisy} configurations stayed above 10% IQR/median. "
                  f"Fit {case['fit_s']:.0f} s ({case['fit_info']['members']} members, "
                  f"<= {max(case['fit_info']['epochs'])} epochs), "
                  f"evaluation with learning curve {case['eval_s']:.0f} s.", "",
                  markdown_tables(case["report"])]
        alt = case["log_ms"]
        lines += ["LPNet trained on log(ms) instead of log(ratio), same split: relative MAPE "
                  f"{alt['relative']['mape']:.2f}%, within 10% {alt['relative']['within_10']:.1%}; absolute MAPE "
                  f"{alt['absolute_ms']['mape']:.2f}%, within 10% {alt['absolute_ms']['within_10']:.1%}.", ""]
        lines += [f"- {c}" for c in checks(case)] + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--cases", default="resnet56@32,resnet18@64")
    parser.add_argument("--home", type=Path, default=Path(".latprune/bench"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    home = LatencyHome(args.home)
    home.add_device(make_device(name=DEVICE, runtime="onnxruntime", provider="cpu", threads=1, batch=1),
                    replace=True)
    cases = []
    for item in args.cases.split(","):
        arch, _, res = item.partition("@")
        cases.append(run_case(home, arch, int(res), args.samples))
    text = section(cases, args.samples)
    console.print(text, highlight=False, markup=False, soft_wrap=True)
    if not args.no_write:
        write_section(SECTION, text)
        console.print(f"wrote section {SECTION!r} of {DOC}", highlight=False)


if __name__ == "__main__":
    main()
