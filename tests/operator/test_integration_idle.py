"""An idle resource costs (almost) no API requests: counted on the real control plane's audit log.

Issue 15's target: at most 1 request per resource per minute once settled. Before the cache
(controller/cache.py) every resync pass sent a GET of the resource and a LIST of its pods: 4 requests
in the two resync periods watched here, where the target allows none (2 x 4 s is under a minute).
The operator runs under its own audited user (tests/operator/audit.py, as bench/operator_scale.py
does), so every request it makes is counted, kopf's and the REST layer's alike.

The same log shows what the start wrote: the resource only through its status, never its metadata
(the start record is on the ConfigMap, created before any pod: controller/record.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .audit import AuditedControlPlane, parse_stamp, read_audit
from .cluster_helpers import (
    AMX_LABELS,
    OperatorProcess,
    create_lft,
    ensure_crd,
    get_lft,
    wait_condition,
    wait_pods,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(90)]

RESYNC_SECONDS = 4
#: Issue 15: requests per resource per minute once settled.
TARGET_PER_MINUTE = 1.0


@pytest.fixture
def audited(tmp_path: Path) -> Iterator[AuditedControlPlane]:
    cp = AuditedControlPlane(tmp_path, controller_manager=False)
    try:
        cp.start()
    except Exception as err:  # noqa: BLE001 - no binaries on this machine
        pytest.skip(f"control plane: {err}")
    try:
        yield cp
    finally:
        cp.stop()


def test_a_settled_resource_costs_no_request_over_two_resync_periods(
    audited: AuditedControlPlane, tmp_path: Path
) -> None:
    cp, ns, name = audited, "idle", "idle-demo"
    ensure_crd(cp)
    cp.create_namespace(ns)
    cp.add_fake_node("amx-0", dict(AMX_LABELS), {"cpu": "64", "memory": "256Gi", "pods": "110"})
    op = OperatorProcess(
        cp, ns, tmp_path, KUBECONFIG=str(cp.operator_kubeconfig), KUBELORA_RESYNC_SECONDS=str(RESYNC_SECONDS)
    ).start()
    try:
        spec = {
            "device": "cpu",
            "workers": 2,
            "resources": {"cpu": "1", "memory": "2Gi"},
            "data": {"path": "sample://train.jsonl"},
            "training": {"maxSteps": 20},
            "output": {"s3": {"uri": "s3://bucket/runs/idle"}},
        }
        create_lft(cp, ns, name, spec)
        wait_condition(cp, ns, name, "Scheduled", "True", "PodsScheduled", timeout=40)
        wait_pods(cp, ns, name, 2, lambda p: bool(p["spec"].get("nodeName")))
        assert read_audit(cp.audit_log), "the audit log records the operator's requests"
        time.sleep(1.0)  # the Scheduled status patch and its Event are in flight at most this long
        t0 = time.time()
        rv = get_lft(cp, ns, name)["metadata"]["resourceVersion"]
        time.sleep(2 * RESYNC_SECONDS + 1)
        t1 = time.time()
        op.assert_alive()
    finally:
        op.stop()
    window = [
        e
        for e in read_audit(cp.audit_log)
        if t0 <= parse_stamp(e["requestReceivedTimestamp"]) < t1 and e.get("verb") != "watch"
    ]
    start = [
        (e["verb"], (e.get("objectRef") or {}).get("resource"), (e.get("objectRef") or {}).get("subresource"))
        for e in read_audit(cp.audit_log)
        if parse_stamp(e["requestReceivedTimestamp"]) < t0 and e.get("verb") in ("create", "patch", "update")
    ]
    assert ("patch", "lorafinetunes", None) not in start and ("update", "lorafinetunes", None) not in start, start
    assert start.index(("create", "configmaps", None)) < start.index(("create", "pods", None)), start
    seen = [f"{e['verb']} {e['requestURI']}" for e in window]
    allowed = int(TARGET_PER_MINUTE * (t1 - t0) / 60)  # one resource
    assert len(window) <= allowed, f"{len(window)} requests in {t1 - t0:.0f} s of idle (allowed {allowed}): {seen}"
    assert get_lft(cp, ns, name)["metadata"]["resourceVersion"] == rv, "the idle resource was written to"
    passes = [
        ln
        for ln in op.log_tail(2000).splitlines()
        if "resync pass over 1 resource" in ln and t0 <= _logged_at(ln) < t1
    ]
    assert len(passes) >= 2, f"two resync passes ran in the window (and cost nothing): {passes}"


def _logged_at(line: str) -> float:
    """Time of a kopf log line: `[2026-12-01 00:44:08,317] ...` (local time, as the test's clock)."""
    from datetime import datetime

    return datetime.fromisoformat(line[1 : line.index("]")].replace(",", ".")).timestamp()
