"""The accuracy/cost Pareto plot of a cohort as PNG bytes (matplotlib's Agg canvas, imported when drawing)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from pruning.selection import member_cost, pareto_front


def pareto_png(members: Sequence[Mapping[str, Any]], series: Sequence[tuple[str | None, str]],
               title: str = "") -> bytes:
    """One panel per (device key or None for MACs, label): every member's accuracy vs its latency (MACs), the
    Pareto front joined by a line, each point tagged member@resolution."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = list(series) or [(None, "MACs")]
    figure = Figure(figsize=(6.4, 3.6 * len(panels)), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (device, label) in zip(axes, panels, strict=True):
        scale = 1.0 if device is not None else 1e-6
        points = [(member_cost(m, device), m) for m in members]
        points = [(c * scale, m) for c, m in points if c is not None and m.get("accuracy") is not None]
        if points:
            ax.scatter([c for c, _ in points], [100 * m["accuracy"] for _, m in points], color="0.6", zorder=2,
                       label="members")
            for cost, m in points:
                ax.annotate(f"{m['id']}@{m.get('resolution', '?')}", (cost, 100 * m["accuracy"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
            front = pareto_front(members, device)
            ax.plot([member_cost(m, device) * scale for m in front], [100 * m["accuracy"] for m in front],
                    marker="o", color="tab:blue", zorder=3, label="Pareto front")
            ax.legend(loc="lower right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no member has a cost on this device", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_xlabel("latency (ms)" if device is not None else "MACs (millions)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(label, fontsize=10)
        ax.grid(True, alpha=0.3)
    if title:
        figure.suptitle(title, fontsize=11)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
