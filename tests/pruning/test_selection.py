"""Pareto fronts and checkpoint selection over a cohort (torch-free)."""

from __future__ import annotations

import subprocess
import sys

from pruning.selection import fronts_by_device, member_cost, pareto_front, pick_member


def member(member_id, accuracy, macs, **latency):
    return {"id": member_id, "accuracy": accuracy, "macs": macs,
            "latency_ms": {d: {"predicted_ms": v[0], "measured_ms": v[1]} for d, v in latency.items()}}


COHORT = [
    member(0, 0.95, 100, cpu=(10.0, None), gpu=(1.0, 1.5)),
    member(1, 0.93, 60, cpu=(6.0, None), gpu=(0.8, None)),
    member(2, 0.90, 70, cpu=(7.0, None), gpu=(0.7, None)),  # dominated on cpu and MACs by member 1
    member(3, 0.85, 30, cpu=(3.0, None)),  # no gpu prediction
    member(4, None, 10, cpu=(1.0, None)),  # not evaluated
]


def ids(members):
    return [m["id"] for m in members] if isinstance(members, list) else (members or {}).get("id")


def test_measured_latency_wins_over_predicted_and_macs_without_device():
    assert member_cost(COHORT[0], "gpu") == 1.5
    assert member_cost(COHORT[1], "gpu") == 0.8
    assert member_cost(COHORT[3], "gpu") is None
    assert member_cost(COHORT[3], None) == 30.0


def test_pareto_front_per_device():
    assert ids(pareto_front(COHORT, "cpu")) == [3, 1, 0]
    assert ids(pareto_front(COHORT, None)) == [3, 1, 0]
    assert ids(pareto_front(COHORT, "gpu")) == [2, 1, 0]  # measured 1.5 ms keeps member 0 the slowest
    assert pareto_front(COHORT, "tpu") == []
    fronts = fronts_by_device(COHORT, ["cpu", "gpu"])
    assert {k: ids(v) for k, v in fronts.items()} == {"macs": [3, 1, 0], "cpu": [3, 1, 0], "gpu": [2, 1, 0]}


def test_pick_member_for_several_budgets():
    assert ids(pick_member(COHORT, "cpu", 100.0)) == 0
    assert ids(pick_member(COHORT, "cpu", 10.0)) == 0  # the budget is inclusive
    assert ids(pick_member(COHORT, "cpu", 9.99)) == 1
    assert ids(pick_member(COHORT, "cpu", 6.5)) == 1
    assert ids(pick_member(COHORT, "cpu", 5.0)) == 3
    assert ids(pick_member(COHORT, "gpu", 1.0)) == 1
    assert ids(pick_member(COHORT, "gpu", 0.75)) == 2
    assert ids(pick_member(COHORT, None, 65)) == 1  # MACs budget
    assert ids(pick_member(COHORT, "cpu", None)) == 0  # no budget: the most accurate
    assert ids(pick_member(COHORT, "cpu", 9.0, tolerance=0.12)) == 0


def test_pick_member_returns_none_when_nothing_fits():
    assert pick_member(COHORT, "cpu", 0.5) is None  # member 4 fits but has no accuracy
    assert pick_member(COHORT, "gpu", 0.5) is None
    assert pick_member(COHORT, "tpu", 100.0) is None  # no latency known on that device
    assert pick_member([], "cpu", 10.0) is None


def test_pick_member_prefers_the_cheaper_on_equal_accuracy():
    tied = [member(0, 0.9, 50, cpu=(5.0, None)), member(1, 0.9, 40, cpu=(4.0, None))]
    assert ids(pick_member(tied, "cpu", 10.0)) == 1


def test_selection_does_not_import_torch():
    code = "import sys, pruning.selection; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
