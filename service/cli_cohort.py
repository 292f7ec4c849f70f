"""CLI verb `latprune cohort`: a cohort's members as a table plus its accuracy/latency Pareto plot (PNG).

The target is a job id (asked of the API) or a local cohort directory written by pruning.cohort.run_cohort.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from service.cli_engine import console, fail, one_line_errors
from service.cli_service import api_errors


def cohort_table(members: list[dict], devices: dict[str, str], fronts: dict[str, list[int]], title: str) -> Table:
    """Members with resolution, MACs, params, accuracy, latency per device (m = measured) and the fronts they
    are on."""
    table = Table(title=title)
    for column in ("member", "res", "MMACs", "params", "accuracy %"):
        table.add_column(column, justify="right")
    for name in devices.values():
        table.add_column(f"{name} ms", justify="right")
    table.add_column("on front of")
    for m in members:
        cells = [str(m["id"]), str(m["resolution"]), f"{m['macs'] / 1e6:.2f}", f"{m['params']:,}",
                 "-" if m.get("accuracy") is None else f"{100 * m['accuracy']:.2f}"]
        for key in devices:
            entry = (m.get("latency_ms") or {}).get(key) or {}
            if entry.get("measured_ms") is not None:
                cells.append(f"{entry['measured_ms']:.3f} m")
            elif entry.get("predicted_ms") is not None:
                cells.append(f"{entry['predicted_ms']:.3f}")
            else:
                cells.append("-")
        cells.append(", ".join(devices.get(k, k) for k, ids in fronts.items() if m["id"] in ids))
        table.add_row(*cells)
    return table


def _local(folder: Path, png: Path | None) -> None:
    from service.cohort_plot import pareto_png

    path = folder / "cohort.json" if folder.is_dir() else folder
    if not path.is_file():
        fail(f"{folder} holds no cohort.json; give a job id or a directory written by a cohort run")
    try:
        report = json.loads(path.read_text())
        members = report["members"]
    except (json.JSONDecodeError, KeyError, TypeError):
        fail(f"{path} is not a cohort report")
    names = sorted({k for m in members for k in (m.get("latency_ms") or {})})
    devices = {name: name for name in names}
    console.print(cohort_table(members, devices, report.get("pareto", {}),
                               f"cohort of {report.get('arch')} on {report.get('dataset')}"))
    target = png or path.parent / "pareto.png"
    target.write_bytes(pareto_png(members, [(n, n) for n in names] or [(None, "MACs")],
                                  title=f"{report.get('method')} {report.get('arch')}"))
    console.print(f"Pareto plot: {target}")


def _remote(job_id: int, png: Path | None, devices: list[str], predict: str | None) -> None:
    from service.client import Client
    from service.settings import get_settings

    client = Client.from_settings(get_settings())
    if "authorization" not in client.http.headers:
        fail("no API key: set LATPRUNE_API_KEY, or start the stack with `latprune up` (it saves one)")
    with client:
        if predict:
            done = client._call("POST", f"/v1/jobs/{job_id}/subnets/predict", params={"device": predict})
            console.print(f"predicted members {done['predicted']} on {predict}"
                          + (f"; no predictor at {done['missing_resolutions']} px" if done["missing_resolutions"]
                             else ""))
        cohort: dict[str, Any] = client._call("GET", f"/v1/jobs/{job_id}/cohort")
        names = {str(d["id"]): d["name"] for d in client.devices()}
        members = [{"id": m["member"], **m, "latency_ms": m["latency"]} for m in cohort["members"]]
        keys = sorted({k for m in members for k in m["latency_ms"]}, key=int)
        console.print(cohort_table(members, {k: names.get(k, k) for k in keys},
                                   {f["key"]: f["members"] for f in cohort["pareto"]},
                                   f"job {job_id} ({cohort['state']}): {len(members)} members"))
        if not any(m.get("accuracy") is not None for m in members):
            console.print("no evaluated member yet: no plot")
            return
        response = client.http.get(f"/v1/jobs/{job_id}/pareto.png", params=[("device", d) for d in devices])
        if response.status_code >= 400:
            fail(f"the API answered {response.status_code}: {response.json().get('detail')}")
        target = png or Path(f"cohort-{job_id}.png")
        target.write_bytes(response.content)
        console.print(f"Pareto plot: {target}")


def cohort(
    target: Annotated[str, typer.Argument(help="job id, or a local cohort directory (with cohort.json)")],
    png: Annotated[Path | None, typer.Option(help="where to write the Pareto plot (default: cohort-ID.png, "
                                                  "or pareto.png in the directory)")] = None,
    device: Annotated[list[str] | None, typer.Option(help="plot only these devices (id or name; repeatable)")] = None,
    predict: Annotated[str | None, typer.Option(help="first add predictions for this device (registered after "
                                                     "the job)")] = None,
) -> None:
    """Print a cohort's members (resolution, MACs, params, accuracy, latency per device, Pareto fronts) and write
    its accuracy/latency Pareto plot."""
    if target.isdigit():
        with api_errors():
            _remote(int(target), png, device or [], predict)
    else:
        with one_line_errors():
            _local(Path(target), png)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.command()(cohort)
