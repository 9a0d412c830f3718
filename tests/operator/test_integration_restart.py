"""Operator crash (SIGKILL) in the middle of a reconcile: the restarted operator completes it, no duplicates.

`KUBELORA_DEBUG_CREATE_DELAY` makes the first operator sleep after each created child, so the kill
lands deterministically between the creation of worker 0 and the last worker.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest

from tests.cluster.controlplane import ControlPlane

from .cluster_helpers import (
    OperatorProcess,
    add_gpu_node,
    condition,
    create_lft,
    free_port,
    get_lft,
    lft_spec,
    operator_in_namespace,
    pods,
    uid,
    wait_condition,
    wait_pods,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


@pytest.fixture
def crashy(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, OperatorProcess]]:
    log_dir = tmp_path_factory.mktemp("operator-logs")
    with operator_in_namespace(control_plane, log_dir, KUBELORA_DEBUG_CREATE_DELAY="2") as (ns, op, _):
        yield ns, op
        print(f"--- operator logs ---\n{op.log_tail(120)}")


def test_operator_killed_mid_reconcile_creates_no_duplicates(
    control_plane: ControlPlane, crashy: tuple[str, OperatorProcess]
) -> None:
    cp = control_plane
    ns, op = crashy
    pool = uid()
    for i in range(2):
        add_gpu_node(cp, f"gpu-{pool}-{i}", pool, gpus=2)
    name = f"crash-{pool}"
    create_lft(cp, ns, name, lft_spec(pool, device="xpu", workers=3))
    # ConfigMap, Service, worker-0 ... each followed by a 2 s pause: kill once worker 0 exists.
    first = cp.wait_for(lambda: [p for p in pods(cp, ns, name)], timeout=30, what="first worker pod")
    op.kill()
    assert len(pods(cp, ns, name)) < 3, "the kill came too late to be mid-reconcile"
    assert get_lft(cp, ns, name).get("status", {}).get("startTime") is None  # status not written yet

    port = free_port()
    op.start("--liveness", f"http://127.0.0.1:{port}/healthz", KUBELORA_DEBUG_CREATE_DELAY="0")
    ps = wait_pods(cp, ns, name, 3, lambda p: bool(p["spec"].get("nodeName")))
    obj = wait_condition(cp, ns, name, "Scheduled", "True", "PodsScheduled")
    assert [p["metadata"]["name"] for p in ps] == [f"{name}-worker-{i}" for i in range(3)]
    assert ps[0]["metadata"]["uid"] == first[0]["metadata"]["uid"]  # kept, not recreated
    assert {p["metadata"]["labels"]["kubelora.dev/attempt"] for p in ps} == {"0"}
    assert len(pods(cp, ns, name)) == 3
    st = obj["status"]
    assert st["startTime"] and st["placement"]["device"] == "xpu" and st.get("restarts", 0) == 0
    assert condition(obj, "Validated")["status"] == "True"
    cms = cp.get(f"/api/v1/namespaces/{ns}/configmaps", params={"labelSelector": f"kubelora.dev/name={name}"})
    assert len(cms["items"]) == 1
    op.assert_alive()
    # The liveness endpoint answers while the operator is healthy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        assert resp.status == 200
