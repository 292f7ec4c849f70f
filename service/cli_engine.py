"""CLI verbs for the engine: `latprune prune` and `latprune methods`."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print a one-line reason and exit non-zero."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def one_line_errors():
    """Turn any failure into a one-line reason (set LATPRUNE_DEBUG=1 for the traceback)."""
    from pydantic import ValidationError

    try:
        yield
    except typer.Exit:
        raise
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"invalid value for {'.'.join(str(p) for p in first['loc']) or 'params'}: {first['msg']}")
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - the CLI edge: users get a reason, not a traceback
        if os.environ.get("LATPRUNE_DEBUG"):
            raise
        fail(f"{exc}" if isinstance(exc, ValueError | FileNotFoundError) else f"{type(exc).__name__}: {exc}")


def parse_params(pairs: list[str]) -> dict:
    """`key=value` pairs (values parsed as JSON when possible) or a single JSON object."""
    if len(pairs) == 1 and pairs[0].strip().startswith("{"):
        try:
            return json.loads(pairs[0])
        except json.JSONDecodeError as exc:
            fail(f"--param JSON is invalid: {exc}")
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--param must be key=value, got {pair!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def prune(
    arch: Annotated[str, typer.Option(help="architecture: resnet20/32/56/110, vgg16_bn, or a torchvision name")],
    dataset: Annotated[str, typer.Option(help="builtin:digits, synthetic:10x32, imagefolder:PATH, torchvision:NAME")],
    budget: Annotated[str, typer.Option(help="flops=0.5 | macs=2e7 | params=0.5 | latency_ms=3.5@DEVICE")],
    out: Annotated[Path, typer.Option(help="output directory")],
    method: Annotated[str, typer.Option(help="pruning method (see `latprune methods`)")] = "l1",
    epochs: Annotated[int, typer.Option(min=0, help="epochs of dense training (without --weights)")] = 1,
    finetune_epochs: Annotated[int | None, typer.Option(min=0, help="fine-tune epochs (default: --epochs)")] = None,
    weights: Annotated[Path | None, typer.Option(help="dense weights (.safetensors) instead of training")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="method parameter key=value (repeatable)")] = None,
    resolution: Annotated[int | None, typer.Option(min=8, help="input resolution (default: the dataset's)")] = None,
    data_root: Annotated[Path | None, typer.Option(help="root for imagefolder:/torchvision: datasets")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    lr: Annotated[float, typer.Option(help="dense training learning rate")] = 0.05,
    seed: Annotated[int, typer.Option()] = 0,
    force: Annotated[bool, typer.Option(help="use a predictor fitted on another machine fingerprint")] = False,
) -> None:
    """Train (or load) a dense model, prune it to the budget, fine-tune, export ONNX + safetensors + report."""
    with one_line_errors():
        from pruning.budget import parse_budget
        from pruning.registry import get_method

        budget_value = parse_budget(budget)
        info = get_method(method)
        params = parse_params(param or [])
        info.validate_params(params)
        if weights is not None and not weights.is_file():
            fail(f"--weights {weights} does not exist")
        latency_model = None
        if budget_value.kind == "latency_ms":
            latency_model = _latency_model(budget_value.device, arch, resolution, force)
        _run_with_progress(arch, dataset, method, budget_value, epochs, finetune_epochs, weights, params, resolution,
                           data_root, batch_size, lr, seed, out, latency_model)


def _latency_model(device: str, arch: str, resolution: int | None, force: bool):
    from latency.store import load_latency_model, resolve_home
    from pruning.zoo import default_resolution

    return load_latency_model(resolve_home(), device, arch, resolution or default_resolution(arch), force=force)


def _run_with_progress(arch, dataset, method, budget, epochs, finetune_epochs, weights, params, resolution,
                       data_root, batch_size, lr, seed, out, latency_model) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from pruning.pipeline import PruneRequest, run_prune

    request = PruneRequest(arch=arch, dataset=dataset, method=method, budget=budget, epochs=epochs,
                           finetune_epochs=finetune_epochs, params=params, weights_path=weights,
                           resolution=resolution, seed=seed, batch_size=batch_size, lr=lr, data_root=data_root)
    columns = (TextColumn("[bold]{task.description:<9}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def on_progress(event: dict) -> None:
            stage = event.get("stage", "job")
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=1.0, detail="")
            detail = []
            if event.get("epochs"):
                detail.append(f"epoch {event.get('epoch', 0)}/{event['epochs']}")
            if event.get("loss") is not None:
                detail.append(f"loss {event['loss']:.3f}")
            if event.get("cost") is not None:
                detail.append(f"cost {event['cost']:.4g}")
            steps = event.get("steps")
            inner = (event.get("step", 0) / steps) if steps else 1.0
            bar.update(tasks[stage], completed=min(1.0, inner), detail=", ".join(detail))

        report = run_prune(request, out, progress=on_progress, checkpoint_dir=None, latency=latency_model)
    _print_report(report, out)


def _print_report(report: dict, out: Path) -> None:
    table = Table(title=f"{report['method']} on {report['arch']} / {report['dataset']} ({report['budget']['kind']}="
                        f"{report['budget']['value']:g})")
    for column in ("", "MACs", "params", "accuracy"):
        table.add_column(column, justify="right")
    latency = report.get("latency_ms")
    if latency:
        table.add_column("predicted ms", justify="right")
        table.add_column("measured ms", justify="right")
    for row in ("dense", "pruned"):
        r = report[row]
        cells = [row, f"{r['macs']:,}", f"{r['params']:,}", f"{100 * r['accuracy']:.2f}%"]
        if latency:
            predicted = latency[row]["predicted"]
            cells += ["-" if predicted is None else f"{predicted:.3f}", f"{latency[row]['measured']:.3f}"]
        table.add_row(*cells)
    console.print(table)
    console.print(f"MACs kept: {report['pruned']['macs'] / report['dense']['macs']:.1%}; files in {out}/ "
                  f"(model.onnx, model.safetensors, arch.json, report.json); {report['seconds']:.0f} s")


def methods() -> None:
    """List the pruning methods and their parameters."""
    from pruning.registry import METHODS

    table = Table(title="methods")
    table.add_column("name", style="bold")
    table.add_column("description")
    table.add_column("parameters")
    for info in METHODS.values():
        fields = []
        for name, spec in info.params_schema().get("properties", {}).items():
            kind = spec.get("type") or "|".join(str(v) for v in spec.get("enum", [])) or "value"
            fields.append(f"{name} ({kind}, default {spec.get('default')!r}): {spec.get('description', '')}")
        table.add_row(info.name, info.description, "\n".join(fields))
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.command()(prune)
    app.command()(methods)
