"""Conditions: lastTransitionTime semantics and the derived phase."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from kubelora_operator.conditions import (
    ConditionReason,
    ConditionType,
    Phase,
    format_time,
    get_condition,
    is_true,
    phase_of,
    remove_condition,
    set_condition,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
T1 = T0 + timedelta(minutes=5)


def test_new_condition_is_appended_with_all_fields() -> None:
    conds = set_condition([], ConditionType.VALIDATED, True, ConditionReason.SPEC_VALID, "ok", 2, T0)
    assert conds == [
        {
            "type": "Validated",
            "status": "True",
            "reason": "SpecValid",
            "message": "ok",
            "lastTransitionTime": "2026-01-02T03:04:05Z",
            "observedGeneration": 2,
        }
    ]


def test_transition_time_moves_only_when_status_flips() -> None:
    c0 = set_condition(None, ConditionType.RUNNING, False, ConditionReason.WORKERS_STARTING, "0/2", 1, T0)
    same = set_condition(c0, ConditionType.RUNNING, False, ConditionReason.PODS_PENDING, "1/2", 2, T1)
    cond = get_condition(same, ConditionType.RUNNING)
    assert cond is not None
    assert cond["lastTransitionTime"] == format_time(T0)
    assert (cond["reason"], cond["message"], cond["observedGeneration"]) == ("PodsPending", "1/2", 2)
    flipped = set_condition(same, ConditionType.RUNNING, True, ConditionReason.WORKERS_RUNNING, "2/2", 2, T1)
    assert get_condition(flipped, "Running")["lastTransitionTime"] == format_time(T1)  # type: ignore[index]


def test_set_condition_does_not_mutate_and_keeps_order() -> None:
    c = set_condition([], "Validated", True, "SpecValid", "", 1, T0)
    c = set_condition(c, "Scheduled", True, "PodsCreated", "", 1, T0)
    before = [dict(x) for x in c]
    c2 = set_condition(c, "Validated", False, "InvalidSpec", "bad", 2, T1)
    assert c == before
    assert [x["type"] for x in c2] == ["Validated", "Scheduled"]
    assert remove_condition(c2, ConditionType.SCHEDULED) == [c2[0]]


def test_status_strings_and_naive_times() -> None:
    c = set_condition([], "Running", "Unknown", "WorkersStarting", "", None, datetime(2026, 1, 1))
    assert c[0]["status"] == "Unknown" and "observedGeneration" not in c[0]
    assert "message" not in c[0]  # empty messages are left out, never written as ""
    assert c[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    with pytest.raises(ValueError):
        set_condition([], "Running", "maybe", "X", "", 1, T0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("steps", "phase"),
    [
        ([], Phase.PENDING),
        ([("Validated", False, "InvalidSpec")], Phase.INVALID),
        ([("Validated", True, "SpecValid"), ("Scheduled", False, "NoMatchingNodes")], Phase.UNSCHEDULABLE),
        ([("Validated", True, "SpecValid"), ("Scheduled", False, "PodsPending")], Phase.PENDING),
        ([("Scheduled", True, "PodsCreated")], Phase.STARTING),
        ([("Scheduled", True, "PodsCreated"), ("Running", True, "WorkersRunning")], Phase.RUNNING),
        ([("Running", False, "Restarting")], Phase.RESTARTING),
        ([("Running", True, "WorkersRunning"), ("Suspended", True, "SuspendedByUser")], Phase.SUSPENDED),
        ([("Running", False, "TrainingComplete"), ("Succeeded", True, "TrainingComplete")], Phase.SUCCEEDED),
        ([("Suspended", True, "SuspendedByUser"), ("Failed", True, "DeadlineExceeded")], Phase.FAILED),
    ],
)
def test_phase_of(steps: list[tuple[str, bool, str]], phase: Phase) -> None:
    conds: list[dict] = []
    for type_, status, reason in steps:
        conds = set_condition(conds, type_, status, reason, "", 1, T0)
    assert phase_of(conds) is phase
    assert is_true(conds, "Succeeded") == (phase is Phase.SUCCEEDED)


def test_vocabulary_is_camel_case_and_unique() -> None:
    for enum in (ConditionType, ConditionReason, Phase):
        values = [m.value for m in enum]
        assert len(values) == len(set(values))
        assert all(v[0].isupper() and v.isalnum() for v in values)


def test_every_reason_is_documented_once_with_its_conditions() -> None:
    """docs/watching.md's reason table is the user's reference: exactly the vocabulary, each reason once."""
    from pathlib import Path

    from kubelora_operator.conditions import ConditionReason, ConditionType

    doc = (Path(__file__).resolve().parents[2] / "docs" / "watching.md").read_text()
    rows = [line.split("|")[1:3] for line in doc.splitlines() if line.startswith("| `")]
    reasons = [
        cell.strip().strip("`") for cell, _ in rows if cell.strip().strip("`") in ConditionReason._value2member_map_
    ]
    assert sorted(reasons) == sorted(r.value for r in ConditionReason)
    types = {t.value for t in ConditionType}
    for cell, conditions in rows:
        if cell.strip().strip("`") in reasons:
            assert {c.strip() for c in conditions.split(",")} <= types, (cell, conditions)
