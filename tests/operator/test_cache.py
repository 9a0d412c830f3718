"""The operator's memory of the cluster (controller/cache.py): pods found by owner without a LIST, a
settled resource reconciled without a request, newest body wins, one node list per burst."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubelora_operator.conditions import ConditionType as T
from kubelora_operator.controller.cache import CachedKube, workers_of
from kubelora_operator.controller.pod_watch import PodWatch
from kubelora_operator.controller.reconcile import ANN_ATTEMPT, ANN_DEVICE, ANN_STARTED_SPEC, reconcile
from kubelora_operator.controller.status import StatusUpdate
from kubelora_operator.kube import Kube

from . import SETTINGS, raw_spec
from .test_handlers import FakeApiClient, _exc, pod


def worker(owner: str, index: int, ns: str = "team-a", **kw: Any) -> dict[str, Any]:
    p = pod(index, phase="Pending", state={"waiting": {"reason": "ContainerCreating"}}, **kw)
    p["metadata"].update(name=f"{owner}-worker-{index}", namespace=ns, uid=f"{owner}-u{index}")
    p["metadata"]["labels"].update({"kubelora.dev/name": owner, "kubelora.dev/role": "worker"})
    return p


def index_of(*pods: dict[str, Any]) -> PodWatch:
    """The operator's pod watch after listing `pods` (cluster-wide: one LIST answers)."""
    watch = PodWatch(Kube(FakeApiClient({"items": list(pods), "metadata": {"resourceVersion": "7"}}), backoff=0), (), print)
    watch.list_all()
    return watch


def test_worker_pods_are_found_by_owner_without_a_list() -> None:
    fetch = worker("demo", 9)
    fetch["metadata"]["labels"]["kubelora.dev/role"] = "fetch"
    watch = index_of(worker("demo", 1), worker("demo", 0), worker("other", 0), worker("demo", 0, ns="team-b"), fetch)
    api = FakeApiClient()  # no scripted answer: any request would fail the test
    kube = CachedKube(api, backoff=0)
    kube.pod_index = watch.index
    got = kube.workers("team-a", "demo")
    assert [w.name for w in got] == ["demo-worker-0", "demo-worker-1"] and api.calls == []  # fetch pods: not workers
    assert [w.name for w in kube.workers("team-b", "demo")] == ["demo-worker-0"]
    assert kube.workers("team-a", "nobody") == []
    # A deleted pod leaves the index.
    watch._apply("DELETED", worker("demo", 1))
    assert [w.index for w in workers_of(watch.index, "team-a", "demo")] == [0] and api.calls == []
    # Pods without the owner label are not indexed at all.
    stray = worker("x", 0)
    del stray["metadata"]["labels"]["kubelora.dev/name"]
    watch._apply("ADDED", stray)
    assert ("team-a", "x") not in watch.index


def settled_body(rv: str = "10") -> dict[str, Any]:
    """A started 2-worker resource whose status already says what its (bound, pending) pods show."""
    raw = raw_spec(workers=2, device="cpu")
    body = {
        "apiVersion": "kubelora.dev/v1alpha1",
        "kind": "LoRAFineTune",
        "metadata": {
            "name": "demo",
            "namespace": "team-a",
            "uid": "uid-1",
            "generation": 1,
            "resourceVersion": rv,
            "creationTimestamp": "2026-11-30T00:00:00Z",
            "annotations": {ANN_STARTED_SPEC: json.dumps(raw), ANN_DEVICE: "cpu", ANN_ATTEMPT: "0"},
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
        },
        "spec": raw,
        "status": {},
    }
    u = StatusUpdate(body)
    u.status.update(startTime=u.stamp, restarts=0, observedGeneration=1, placement={"device": "cpu"})
    body["status"] = u.status
    return body


def test_a_settled_resource_is_reconciled_without_any_request() -> None:
    api = FakeApiClient({}, {})  # two answers: the first pass's status patch and its Scheduled Event
    kube = CachedKube(api, backoff=0)
    kube.pod_index = index_of(worker("demo", 0), worker("demo", 1)).index
    kube.observe_lft("ADDED", settled_body())
    assert "managedFields" not in kube.get_lft("team-a", "demo")["metadata"]  # type: ignore[index]
    reconcile(kube, SETTINGS, "team-a", "demo")  # first pass: conditions written once
    status_path = "/apis/kubelora.dev/v1alpha1/namespaces/team-a/lorafinetunes/demo/status"
    assert [c[:2] for c in api.calls] == [("PATCH", status_path), ("POST", "/api/v1/namespaces/team-a/events")]
    patch = api.calls[0][2]["status"]
    assert {c["type"]: c["status"] for c in patch["conditions"]}[T.SCHEDULED.value] == "True"
    # The watch delivers the patched object; every further pass (the resync pass) is free.
    body = settled_body(rv="11")
    body["status"] = {**body["status"], **patch}
    kube.observe_lft("MODIFIED", body)
    kube.observe_lft("MODIFIED", settled_body(rv="9"))  # an older event arriving late changes nothing
    for _ in range(3):
        reconcile(kube, SETTINGS, "team-a", "demo")
    assert len(api.calls) == 2


def test_own_writes_are_remembered_when_newer_and_deleted_resources_forgotten() -> None:
    answer = {**settled_body(rv="12"), "status": {"phase": "Pending"}}
    api = FakeApiClient(answer, answer)
    kube = CachedKube(api, backoff=0)
    kube.observe_lft("ADDED", settled_body(rv="10"))
    kube.patch_lft_status("team-a", "demo", {"phase": "Pending"})
    assert kube.get_lft("team-a", "demo")["status"] == {"phase": "Pending"}  # type: ignore[index]
    kube.observe_lft("DELETED", settled_body(rv="13"))
    kube.patch_lft_status("team-a", "demo", {"phase": "Pending"})  # a write racing the deletion
    api.script.append(_exc(404))
    assert kube.get_lft("team-a", "demo") is None  # not resurrected from our write: a GET, 404
    assert [c[0] for c in api.calls] == ["PATCH", "PATCH", "GET"]


def test_the_echo_of_our_own_patch_is_recognised_and_nothing_else() -> None:
    answer = {**settled_body(rv="12"), "status": {"phase": "Pending"}}
    kube = CachedKube(FakeApiClient(answer), backoff=0)
    assert not kube.observe_lft(None, settled_body(rv="10"))  # the initial listing: never an echo
    kube.patch_lft_status("team-a", "demo", {"phase": "Pending"})
    assert not kube.observe_lft("MODIFIED", settled_body(rv="11"))  # someone else's change before ours
    assert kube.observe_lft("MODIFIED", answer)  # rv 12: what our patch returned
    assert not kube.observe_lft("MODIFIED", answer)  # once only
    assert not kube.observe_lft("MODIFIED", settled_body(rv="13"))  # a user's edit after ours


def test_one_node_list_serves_a_burst_of_placements() -> None:
    now = [0.0]
    api = FakeApiClient({"items": [{"metadata": {"name": "a"}}]}, {"items": []})
    kube = CachedKube(api, backoff=0, clock=lambda: now[0])
    assert [kube.list_nodes() for _ in range(50)][-1] == [{"metadata": {"name": "a"}}] and len(api.calls) == 1
    now[0] = 2.5  # NODE_LIST_TTL later: listed again (a node added meanwhile becomes visible)
    assert kube.list_nodes() == [] and len(api.calls) == 2


def test_device_is_reported_after_a_crash_before_the_first_status_write() -> None:
    # Started (annotations written) and every pod created, but the operator died before writing status.
    api = FakeApiClient({}, {})
    kube = CachedKube(api, backoff=0)
    kube.pod_index = index_of(worker("demo", 0), worker("demo", 1)).index
    body = settled_body()
    body["status"] = {}
    kube.observe_lft("ADDED", body)
    reconcile(kube, SETTINGS, "team-a", "demo")
    patch = api.calls[0][2]["status"]
    assert patch["placement"] == {"device": "cpu"} and patch["startTime"]
    assert not any(c[0] == "POST" and "/pods" in c[1] for c in api.calls)  # nothing recreated


def test_a_start_leaves_its_status_to_the_pass_its_pods_bring_one_patch_instead_of_two(
    monkeypatch: Any,
) -> None:
    # The pass that creates worker pods posts its Events but writes no status; the next pass (the
    # pods' events) writes both passes' conditions in one patch. A pass that fails transiently keeps
    # the carried status for the one that retries; without carrying (tools, tests) each pass writes.
    import importlib

    from kubelora_operator.conditions import ConditionReason as R

    reconcile_mod = importlib.import_module("kubelora_operator.controller.reconcile")  # the module, not the function
    from kubelora_operator.kube import TransientApiError

    def start(kube: Any, settings: Any, body: Any, u: StatusUpdate) -> None:
        u.condition(T.VALIDATED, True, R.SPEC_VALID, "ok", event="Normal")
        u.status["startTime"] = u.stamp
        u.created_pods = True

    def pods_bound(kube: Any, settings: Any, body: Any, u: StatusUpdate) -> None:
        u.condition(T.SCHEDULED, True, R.PODS_SCHEDULED, "2 worker pods bound", event="Normal")

    def busy(kube: Any, settings: Any, body: Any, u: StatusUpdate) -> None:
        raise TransientApiError("GET", "/x", 503, "busy")

    status_path = "/apis/kubelora.dev/v1alpha1/namespaces/team-a/lorafinetunes/demo/status"
    events_path = "/api/v1/namespaces/team-a/events"
    api = FakeApiClient({}, {}, {})  # the start's Event; then the one status patch and its Event
    kube = CachedKube(api, backoff=0)
    kube.carried_status = {}
    body = settled_body()
    body["status"] = {}
    kube.observe_lft("ADDED", body)
    monkeypatch.setattr(reconcile_mod, "_reconcile", start)
    reconcile(kube, SETTINGS, "team-a", "demo")
    assert [c[:2] for c in api.calls] == [("POST", events_path)]
    monkeypatch.setattr(reconcile_mod, "_reconcile", busy)
    with pytest.raises(TransientApiError):
        reconcile(kube, SETTINGS, "team-a", "demo")
    assert ("team-a", "demo") in kube.carried_status
    monkeypatch.setattr(reconcile_mod, "_reconcile", pods_bound)
    reconcile(kube, SETTINGS, "team-a", "demo")
    assert [c[:2] for c in api.calls] == [("POST", events_path), ("PATCH", status_path), ("POST", events_path)]
    patch = api.calls[1][2]["status"]
    assert {c["type"]: c["status"] for c in patch["conditions"]} == {"Validated": "True", "Scheduled": "True"}
    assert patch["startTime"] and patch["phase"] and kube.carried_status == {}

    api = FakeApiClient({}, {})
    kube = CachedKube(api, backoff=0)  # carrying off: the start writes its own status
    kube.observe_lft("ADDED", body)
    monkeypatch.setattr(reconcile_mod, "_reconcile", start)
    reconcile(kube, SETTINGS, "team-a", "demo")
    assert [c[:2] for c in api.calls] == [("PATCH", status_path), ("POST", events_path)]
