"""The fault run's duplicate-pod check (tests/realnode/faults.py) can fail: fed pod events by hand."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from .faults import PodWatch


def _pod(name: str, uid: str, attempt: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": uid, "labels": {"kubelora.dev/attempt": attempt}}}


def _watch() -> PodWatch:
    return PodWatch(SimpleNamespace(cp=None), "faults")  # type: ignore[arg-type]  # never started


def test_one_pod_per_worker_per_attempt_passes() -> None:
    w = _watch()
    for kind, pod in [("ADDED", _pod("faults-worker-0", "a", "0")), ("ADDED", _pod("faults-worker-1", "b", "0")),
                      ("DELETED", _pod("faults-worker-0", "a", "0")), ("DELETED", _pod("faults-worker-1", "b", "0")),
                      ("ADDED", _pod("faults-worker-0", "c", "1")), ("ADDED", _pod("faults-worker-1", "d", "1"))]:  # fmt: skip
        w._see(kind, pod)
    w.check_no_duplicates(workers=2)


def test_a_worker_created_twice_in_one_attempt_fails() -> None:
    w = _watch()
    w._see("ADDED", _pod("faults-worker-0", "a", "0"))
    w._see("DELETED", _pod("faults-worker-0", "a", "0"))
    w._see("ADDED", _pod("faults-worker-0", "b", "0"))
    with pytest.raises(AssertionError, match="created twice"):
        w.check_no_duplicates(workers=2)


def test_more_pods_than_workers_at_once_fails() -> None:
    w = _watch()
    for i, uid in enumerate("abc"):
        w._see("ADDED", _pod(f"faults-worker-{i}", uid, "0"))
    with pytest.raises(AssertionError, match="3 worker pods existed at once"):
        w.check_no_duplicates(workers=2)
