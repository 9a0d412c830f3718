"""Autoscaled node pools (whenNoNodeMatches: Wait) and the Kueue contract, on the real control plane.

The operator of this module runs with the operator setting `whenNoNodeMatches: Wait` (as a chart on an
autoscaled cluster would set it); resources may override it. The real scheduler binds pods to fake
nodes, so "a node pool at zero grows" is a node of the test's pool that appears after the pods exist.
Kueue itself is not installed: the tests play its part (create suspended with the queue label, then
flip `suspend`) and check what an external integration relies on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster.controlplane import ApiError, ControlPlane

from .cluster_helpers import (
    LFT_API,
    POOL_LABEL,
    Env,
    add_amx_node,
    add_gpu_node,
    condition,
    get_lft,
    lft_spec,
    operator_env_in_namespace,
    patch_spec,
    pods,
    show_operator_log,
    uid,
    wait_condition,
    wait_pods,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(150)]

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


@pytest.fixture(scope="module")
def env(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    log_dir = tmp_path_factory.mktemp("operator-logs")
    with operator_env_in_namespace(control_plane, log_dir, KUBELORA_WHEN_NO_NODE_MATCHES="Wait") as env:
        yield env


@pytest.fixture(autouse=True)
def _operator_log(env: Env) -> Iterator[None]:
    yield
    show_operator_log(env)


def _create(cp: ControlPlane, ns: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None) -> None:
    body = {
        "apiVersion": "kubelora.dev/v1alpha1",
        "kind": "LoRAFineTune",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": spec,
    }
    cp.create(f"{LFT_API}/namespaces/{ns}/lorafinetunes", body)


def _bound(p: dict[str, Any]) -> bool:
    return bool(p["spec"].get("nodeName"))


def test_auto_waits_for_the_gpu_pool_then_schedules_when_its_node_appears(env: Env) -> None:
    """Pool at zero: pods exist (for an autoscaler), Scheduled=False/WaitingForNodes names the missing GPU
    pool, `auto` does not fall back to the AMX node that is up; a GPU node joins and the pods bind."""
    cp, ns = env.cp, env.ns
    pool = uid()
    add_amx_node(cp, f"amx-{pool}", pool)  # up, but auto must keep the preferred (GPU) device
    name = f"wait-{pool}"
    _create(cp, ns, name, lft_spec(pool, device="auto", workers=1))
    obj = wait_condition(cp, ns, name, "Scheduled", "False", "WaitingForNodes")
    msg = condition(obj, "Scheduled")["message"]
    assert "0/1 worker pods of attempt 0 bound" in msg and "whenNoNodeMatches: Wait" in msg, msg
    assert "gpu.intel.com/i915" in msg, msg  # what is missing
    assert obj["status"]["placement"]["device"] == "xpu"
    assert obj["status"]["phase"] == "Pending"
    (pod,) = wait_pods(cp, ns, name, 1)
    assert not _bound(pod)
    assert pod["spec"]["nodeSelector"] == {POOL_LABEL: pool}
    assert pod["spec"]["containers"][0]["resources"]["limits"]["gpu.intel.com/i915"] == "1"

    add_gpu_node(cp, f"gpu-{pool}", pool, gpus=2)  # the autoscaler's node
    obj = wait_condition(cp, ns, name, "Scheduled", "True", "PodsScheduled", timeout=60)
    (pod,) = wait_pods(cp, ns, name, 1, _bound)
    assert pod["spec"]["nodeName"] == f"gpu-{pool}"
    assert condition(obj, "Failed") is None


def test_wait_deadline_fails_with_nodes_not_available(env: Env) -> None:
    cp, ns = env.cp, env.ns
    pool = uid()
    name = f"waitdl-{pool}"
    spec = lft_spec(pool, device="cpu", resources={"gpus": 0}, placement={"waitTimeoutSeconds": 3})
    _create(cp, ns, name, spec)
    wait_condition(cp, ns, name, "Scheduled", "False", "WaitingForNodes")
    assert len(pods(cp, ns, name)) == 1
    obj = wait_condition(cp, ns, name, "Failed", "True", "NodesNotAvailable", timeout=30)
    msg = condition(obj, "Failed")["message"]
    assert "waitTimeoutSeconds 3" in msg and "worker pods deleted" in msg, msg
    assert obj["status"]["phase"] == "Failed"
    cp.wait_for(lambda: pods(cp, ns, name) == [], timeout=20, what="pods deleted at the wait deadline")


def test_time_suspended_does_not_count_against_the_wait(env: Env) -> None:
    cp, ns = env.cp, env.ns
    pool = uid()
    name = f"waitsusp-{pool}"
    spec = lft_spec(pool, device="cpu", resources={"gpus": 0}, placement={"waitTimeoutSeconds": 6})
    _create(cp, ns, name, spec)
    wait_condition(cp, ns, name, "Scheduled", "False", "WaitingForNodes")
    patch_spec(cp, ns, name, {"suspend": True})
    obj = wait_condition(cp, ns, name, "Suspended", "True", "SuspendedByUser")
    assert condition(obj, "Scheduled") is None  # no pods, nothing scheduled
    time.sleep(7)  # longer than waitTimeoutSeconds
    patch_spec(cp, ns, name, {"suspend": False})
    wait_condition(cp, ns, name, "Suspended", "False", "Resumed")
    obj = wait_condition(cp, ns, name, "Scheduled", "False", "WaitingForNodes")
    assert condition(obj, "Failed") is None, obj["status"]
    add_amx_node(cp, f"amx-{pool}", pool)
    wait_condition(cp, ns, name, "Scheduled", "True", "PodsScheduled", timeout=60)
    assert condition(get_lft(cp, ns, name), "Failed") is None


def test_a_resource_can_keep_fail_fast_under_a_waiting_operator(env: Env) -> None:
    cp, ns = env.cp, env.ns
    pool = uid()
    name = f"failfast-{pool}"
    _create(cp, ns, name, lft_spec(pool, device="xpu", placement={"whenNoNodeMatches": "Fail"}))
    obj = wait_condition(cp, ns, name, "Scheduled", "False", "NoMatchingNodes")
    assert obj["status"]["phase"] == "Unschedulable"
    time.sleep(2)  # two resyncs
    assert pods(cp, ns, name) == []


def test_kueue_contract_created_suspended_with_queue_label_then_admitted(env: Env) -> None:
    """What a Kueue external integration needs: created with `suspend: true` (Kueue's webhook does that
    for a queued job), no pods while suspended, pods with the queue label once `suspend` flips."""
    cp, ns = env.cp, env.ns
    pool = uid()
    add_gpu_node(cp, f"gpu-{pool}", pool)
    name = f"kueue-{pool}"
    spec = lft_spec(pool, device="xpu", suspend=True, pod={"labels": {QUEUE_LABEL: "team-a"}})
    _create(cp, ns, name, spec, labels={QUEUE_LABEL: "team-a"})
    obj = wait_condition(cp, ns, name, "Suspended", "True", "SuspendedByUser")
    assert obj["status"]["phase"] == "Suspended"
    assert condition(obj, "Scheduled") is None
    time.sleep(2)  # two resyncs: still nothing
    assert pods(cp, ns, name) == []
    with pytest.raises(ApiError):  # no start record: the run did not start
        cp.get(f"/api/v1/namespaces/{ns}/configmaps/{name}-config")

    patch_spec(cp, ns, name, {"suspend": False})  # Kueue admits the workload
    wait_condition(cp, ns, name, "Suspended", "False", "Resumed")
    (pod,) = wait_pods(cp, ns, name, 1, _bound)
    assert pod["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    assert pod["metadata"]["labels"]["kubelora.dev/attempt"] == "0"  # a first start, not a resume
    owner = pod["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["controller"]) == ("LoRAFineTune", True)  # how Kueue maps pods to the job
    wait_condition(cp, ns, name, "Scheduled", "True", "PodsScheduled")
