"""Choosing among a cohort's members: accuracy/cost Pareto fronts and the best member within a budget.

Torch-free (the API process uses it). A member is a mapping with `accuracy` (0..1 or None), `macs` and
`latency_ms` = {device: {"predicted_ms": float | None, "measured_ms": float | None}}, as in cohort.json and
the subnet table; a measured latency wins over a predicted one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

Member = TypeVar("Member", bound=Mapping[str, Any])


def member_cost(member: Mapping[str, Any], device: str | None) -> float | None:
    """Latency in ms on `device` (measured, else predicted, else None), or the member's MACs when device is None."""
    if device is None:
        macs = member.get("macs")
        return float(macs) if macs is not None else None
    entry = (member.get("latency_ms") or {}).get(str(device)) or {}
    measured = entry.get("measured_ms")
    value = measured if measured is not None else entry.get("predicted_ms")
    return float(value) if value is not None else None


def _scored(members: Sequence[Member], device: str | None) -> list[tuple[float, float, int, Member]]:
    rows = []
    for index, member in enumerate(members):
        cost, accuracy = member_cost(member, device), member.get("accuracy")
        if cost is not None and accuracy is not None:
            rows.append((cost, float(accuracy), index, member))
    return rows


def pareto_front(members: Sequence[Member], device: str | None = None) -> list[Member]:
    """Members that no other member beats on both accuracy and cost (latency on `device`, else MACs), cheapest
    first; members without an accuracy or a cost on the device are left out."""
    front, best = [], float("-inf")
    for _cost, accuracy, _index, member in sorted(_scored(members, device), key=lambda r: (r[0], -r[1], r[2])):
        if accuracy > best:
            front.append(member)
            best = accuracy
    return front


def pick_member(members: Sequence[Member], device: str | None, latency_ms: float | None,
                tolerance: float = 0.0) -> Member | None:
    """The most accurate member whose cost on `device` is within `latency_ms` * (1 + tolerance) (MACs when device
    is None; no budget: the most accurate member); the cheaper one on ties; None when none fits."""
    if latency_ms is None:
        rows = [(0.0, float(m["accuracy"]), i, m) for i, m in enumerate(members) if m.get("accuracy") is not None]
    else:
        limit = latency_ms * (1 + tolerance)
        rows = [row for row in _scored(members, device) if row[0] <= limit]
    if not rows:
        return None
    return min(rows, key=lambda r: (-r[1], r[0], r[2]))[3]


def fronts_by_device(members: Sequence[Member], devices: Sequence[str]) -> dict[str, list[Member]]:
    """The Pareto front on every device, plus the MACs front under the key 'macs'."""
    fronts = {"macs": pareto_front(members, None)}
    for device in devices:
        fronts[str(device)] = pareto_front(members, str(device))
    return fronts
