"""CLI verbs for latency: `latprune device add|list`, `latprune profile`, `latprune predictor fit|eval|list`.

State lives under the latprune home ($LATPRUNE_HOME, default ./.latprune): devices/, profiles/, predictors/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from service.cli_engine import fail, one_line_errors

console = Console()
device_app = typer.Typer(no_args_is_help=True, help="Register and list deployment devices.")
predictor_app = typer.Typer(no_args_is_help=True, help="Fit, evaluate and list latency predictors (LPNet).")

METRIC_ROWS = (("lpnet", "LPNet"), ("flops_linear", "FLOPs-linear"), ("lookup_table", "lookup table"),
               ("repeatability_floor", "repeatability floor"))


def _home():
    from latency.store import LatencyHome, resolve_home

    return LatencyHome(resolve_home())


@device_app.command("add")
def device_add(
    name: Annotated[str, typer.Argument(help="device id: lower-case letters, digits, '_', '.', '-'")],
    runtime: Annotated[str, typer.Option(help="onnxruntime | torch")] = "onnxruntime",
    provider: Annotated[str, typer.Option(help="execution provider: cpu, cuda, ...")] = "cpu",
    threads: Annotated[int, typer.Option(help="intra-op threads")] = 1,
    batch: Annotated[int, typer.Option(help="batch size of every inference")] = 1,
    resolution: Annotated[list[int] | None, typer.Option(help="input resolution deployed (repeatable)")] = None,
    precision: Annotated[str, typer.Option(help="fp32 | fp16 (fp16 on GPU providers)")] = "fp32",
    channel_multiple: Annotated[int, typer.Option(help="preferred multiple for kept channel counts")] = 1,
    replace: Annotated[bool, typer.Option(help="overwrite an existing device of that name")] = False,
) -> None:
    """Register a device (its spec is stored in <home>/devices/NAME.json)."""
    from latency.device import DeviceError, check_runnable, make_device

    with one_line_errors():
        spec = make_device(name=name, runtime=runtime, provider=provider, threads=threads, batch=batch,
                           resolutions=resolution or [], precision=precision, channel_multiple=channel_multiple)
        path = _home().add_device(spec, replace=replace)
        console.print(f"device [bold]{spec.name}[/]: {spec.runtime}/{spec.provider}, {spec.threads} thread(s), "
                      f"batch {spec.batch}, {spec.precision} -> {path}", highlight=False)
        try:
            check_runnable(spec)
        except DeviceError as exc:
            console.print(f"[yellow]note:[/] {exc}; profile it on the machine that has it", highlight=False)


@device_app.command("list")
def device_list() -> None:
    """List registered devices."""
    with one_line_errors():
        devices = _home().devices()
        table = Table(title="devices")
        for col in ("name", "runtime", "provider", "threads", "batch", "resolutions", "precision", "multiple"):
            table.add_column(col)
        for d in devices:
            table.add_row(d.name, d.runtime, d.provider, str(d.threads), str(d.batch),
                          ",".join(map(str, d.resolutions)) or "-", d.precision, str(d.channel_multiple))
        console.print(table if devices else "no devices; add one with `latprune device add NAME`")


def profile(
    device: Annotated[str, typer.Option(help="registered device name")],
    arch: Annotated[str, typer.Option(help="architecture name (see zoo)")],
    resolution: Annotated[list[int] | None, typer.Option(help="input resolution (repeatable); "
                                                         "default: the device's, else the arch's natural one")] = None,
    samples: Annotated[int, typer.Option(min=1, help="width configurations to measure")] = 1000,
    seed: Annotated[int, typer.Option(help="sampler seed (same seed: same configurations, resumable)")] = 0,
    repeat_share: Annotated[float, typer.Option(help="share re-measured at the end for the repeatability floor")]
    = 0.05,
    num_classes: Annotated[int, typer.Option(min=1, help="classifier outputs of the profiled model")] = 10,
    in_channels: Annotated[int, typer.Option(min=1, help="input channels")] = 3,
    noisy_retries: Annotated[int, typer.Option(min=0, help="re-measure still-noisy configurations after the "
                                               "main pass this many times (improves the ms labels)")] = 0,
) -> None:
    """Measure sampled width configurations of ARCH on DEVICE (resumable: measured ones are skipped)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from latency.profiler import ProfileTarget
    from latency.profiler import profile as run_profile
    from latency.samples import SampleStore
    from pruning.zoo import default_resolution

    with one_line_errors():
        home = _home()
        spec = home.device(device)
        if not 0 <= repeat_share <= 1:
            fail(f"--repeat-share must be in [0, 1], got {repeat_share}")
        resolutions = resolution or spec.resolutions or [default_resolution(arch)]
        for res in resolutions:
            target = ProfileTarget.build(arch, res, num_classes, in_channels)
            store = SampleStore(home.profile_path(spec.name, arch, res))
            columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
            with Progress(*columns, console=console) as bar:
                task = bar.add_task(f"{arch}@{res} on {spec.name}", total=None)

                def on_progress(done: int, total: int, phase: str, task=task, bar=bar, res=res) -> None:
                    bar.update(task, completed=done, total=total, description=f"{arch}@{res} {phase}")

                try:
                    result = run_profile(spec, target, store, samples, seed, repeat_share, progress=on_progress,
                                         noisy_retries=noisy_retries)
                except KeyboardInterrupt:
                    fail(f"interrupted; measured samples are kept in {store.path}, rerun to resume", 130)
            console.print(f"{arch}@{res}: measured {result.measured}, already there {result.skipped}, "
                          f"noisy retried {result.retried}, repeats {result.repeats}, still noisy {result.noisy}, "
                          f"{result.elapsed_s:.1f} s -> {store.path}",
                          highlight=False)
            floor = result.repeatability
            if floor:
                rel, ms = floor.get("relative", {}), floor["absolute_ms"]
                console.print(f"repeatability ({floor['pairs']} pairs, median gap {floor['median_gap_s']:.0f} s): "
                              f"ms within 10% {ms['within_10']:.0%}, relative within 10% "
                              f"{rel.get('within_10', float('nan')):.0%}", highlight=False)


def _metrics_table(title: str, rows: dict, space: str) -> Table:
    table = Table(title=title)
    for col in ("predictor", "MAPE %", "within 5%", "within 10%", "Spearman rho", "n"):
        table.add_column(col, justify="left" if col == "predictor" else "right")
    for key, label in METRIC_ROWS:
        m = rows.get(key, {}).get(space)
        if m:
            table.add_row(label, f"{m['mape']:.2f}", f"{m['within_5']:.1%}", f"{m['within_10']:.1%}",
                          f"{m['spearman']:.4f}", str(m["n"]))
    return table


@predictor_app.command("fit")
def predictor_fit(
    device: Annotated[str, typer.Option(help="registered device name")],
    arch: Annotated[str, typer.Option(help="architecture name")],
    resolution: Annotated[list[int] | None, typer.Option(help="resolution(s) to cover; default: all profiled")]
    = None,
    target: Annotated[str, typer.Option(help="log_ratio (latency / dense reference) | log_ms")] = "log_ratio",
    test_share: Annotated[float, typer.Option(help="share of configurations held out for evaluation")] = 0.2,
    seed: Annotated[int, typer.Option(help="split and training seed")] = 0,
) -> None:
    """Fit LPNet on the profiled samples of (DEVICE, ARCH) and save it under <home>/predictors/."""
    from latency.predictors import fit_predictor

    with one_line_errors():
        if target not in ("log_ratio", "log_ms"):
            fail(f"--target must be log_ratio or log_ms, got {target!r}")
        if not 0 < test_share < 1:
            fail(f"--test-share must be in (0, 1), got {test_share}")
        with console.status("fitting LPNet"):
            stem, meta = fit_predictor(_home(), device, arch, resolution, target, test_share, seed)
        console.print(_metrics_table(f"LPNet {arch}@{meta.resolutions} on {device}: held-out "
                                     f"({len(meta.test_keys)} configurations)", {"lpnet": meta.metrics}, "relative"))
        info = meta.fit_info
        console.print(f"trained on {meta.training_samples} configurations ({meta.validation_samples} of them "
                      f"for early stopping), "
                      f"{info['members']} members, <= {max(info['epochs'])} epochs, {info['fit_seconds']:.1f} s -> "
                      f"{stem}.safetensors", highlight=False)


@predictor_app.command("eval")
def predictor_eval(
    device: Annotated[str, typer.Option(help="registered device name")],
    arch: Annotated[str, typer.Option(help="architecture name")],
    resolution: Annotated[int | None, typer.Option(help="resolution the predictor covers")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the report as JSON here")] = None,
    learning_curve: Annotated[bool, typer.Option(help="refit on 250/500/1000 samples")] = True,
) -> None:
    """Held-out metrics of LPNet vs FLOPs-linear vs lookup table, with the repeatability floor."""
    from latency.predictors import LEARNING_CURVE, SPACE_TITLES, evaluate_predictor

    with one_line_errors():
        with console.status("evaluating"):
            report = evaluate_predictor(_home(), device, arch, resolution,
                                        LEARNING_CURVE if learning_curve else ())
        head = f"{arch}@{report['resolutions']} on {device} (train {report['train_samples']}, " \
               f"test {report['test_samples']})"
        for space, title in SPACE_TITLES.items():
            if space in report["predictors"]["lpnet"]:
                console.print(_metrics_table(f"{head}: {title}", report["predictors"], space))
        if report["learning_curve"]:
            curve = Table(title="LPNet learning curve (relative)")
            for col in ("train samples", "MAPE %", "within 10%", "Spearman rho"):
                curve.add_column(col, justify="right")
            for point in report["learning_curve"]:
                m = point["relative"]
                curve.add_row(str(point["train_samples"]), f"{m['mape']:.2f}", f"{m['within_10']:.1%}",
                              f"{m['spearman']:.4f}")
            console.print(curve)
        if report["repeatability"] is None:
            console.print("no repeats measured: profile with --repeat-share > 0 for the floor", highlight=False)
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report, indent=1))
            console.print(f"report -> {json_path}", highlight=False)


@predictor_app.command("list")
def predictor_list(device: Annotated[str | None, typer.Option(help="only this device")] = None) -> None:
    """List fitted predictors with their held-out accuracy."""
    from latency.lpnet import PredictorError
    from latency.lpnet_io import read_meta

    with one_line_errors():
        home = _home()
        folder = home.root / "predictors"
        metas = []
        for path in sorted(folder.glob("*/*.json")) if folder.is_dir() else []:
            try:
                metas.append(read_meta(path.with_suffix("")))
            except PredictorError:
                continue
        metas = [m for m in metas if device is None or m.device.name == device]
        table = Table(title="latency predictors")
        for col in ("device", "arch", "resolutions", "target", "train", "within 10% (rel)", "rho (rel)"):
            table.add_column(col)
        for m in metas:
            rel = m.metrics.get("relative", {})
            table.add_row(m.device.name, m.arch, ",".join(map(str, m.resolutions)), m.target,
                          str(m.training_samples), f"{rel.get('within_10', float('nan')):.1%}",
                          f"{rel.get('spearman', float('nan')):.4f}")
        console.print(table if metas else "no predictors; fit one with `latprune predictor fit`")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.add_typer(device_app, name="device")
    app.command("profile")(profile)
    app.add_typer(predictor_app, name="predictor")
