"""The start record on the run's ConfigMap (controller/record.py): written by the commit point's
create, read from memory afterwards, from the ConfigMap once after an operator restart, from the
resource itself for runs an older operator started; an existing ConfigMap is adopted only when it is
this resource's."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubelora_operator.controller.cache import CachedKube
from kubelora_operator.controller.record import commit, find_record
from kubelora_operator.controller.started import ANN_DEVICE, ANN_STARTED_AT, ANN_STARTED_SPEC, StartRecord
from kubelora_operator.kube import PermanentApiError, TransientApiError
from kubelora_operator.placement import decide_placement
from kubelora_operator.plan import plan

from . import SETTINGS, amx_node, raw_spec, resource
from .test_handlers import FakeApiClient, _exc

CM_PATH = "/api/v1/namespaces/team-a/configmaps"


def body(uid: str = "uid-1234", status: dict[str, Any] | None = None, **annotations: str) -> dict[str, Any]:
    meta = {"name": "demo", "namespace": "team-a", "uid": uid, "generation": 3, "annotations": annotations}
    return {"metadata": meta, "spec": raw_spec(), "status": status or {}}


def record(**over: Any) -> StartRecord:
    return StartRecord(**{"spec": raw_spec(), "generation": 3, "device": "cpu", "started_at": "2026-12-02T00:00:00Z", **over})


def config_map(rec: StartRecord, uid: str = "uid-1234", name: str = "demo") -> dict[str, Any]:
    owner = {"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRAFineTune", "name": name, "uid": uid}
    meta = {"name": "demo-config", "namespace": "team-a", "ownerReferences": [owner], "annotations": rec.annotations()}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {}}


def commit_of(kube: CachedKube, rec: StartRecord) -> tuple[StartRecord, bool]:
    """`commit` with the ConfigMap the start plans for `rec` (reconcile.py, `_before_start`)."""
    placed = decide_placement(resource().spec, [amx_node("n1")], SETTINGS)
    return commit(kube, resource(), plan(resource(), placed, SETTINGS, 0, rec.annotations()).config_map, rec)


def test_the_commit_is_one_configmap_create_carrying_the_record_and_then_memory() -> None:
    api = FakeApiClient({})
    kube = CachedKube(api, backoff=0)
    rec, created = commit_of(kube, record())
    assert created and rec == record()
    ((method, path, sent),) = api.calls
    assert (method, path) == ("POST", CM_PATH)  # no write of the resource itself
    assert sent["metadata"]["annotations"] == record().annotations()
    assert json.loads(sent["metadata"]["annotations"][ANN_STARTED_SPEC]) == raw_spec()
    assert sent["metadata"]["ownerReferences"][0]["uid"] == "uid-1234" and "config.yaml" in sent["data"]
    # Every later pass: from memory, whatever the status says.
    assert find_record(kube, body(status={"startTime": "2026-12-02T00:00:00Z"})) == rec
    assert find_record(kube, body()) == rec and len(api.calls) == 1
    # A re-created resource of the same name (another uid) is not started.
    assert find_record(kube, body(uid="uid-new")) is None and len(api.calls) == 1


def test_a_restarted_operator_reads_the_configmap_once_and_only_for_started_resources() -> None:
    api = FakeApiClient(config_map(record()))
    kube = CachedKube(api, backoff=0)
    assert find_record(kube, body()) is None and api.calls == []  # no startTime: never started, no request
    started = body(status={"startTime": "2026-12-02T00:00:00Z"})
    assert find_record(kube, started) == record()
    assert [c[:2] for c in api.calls] == [("GET", f"{CM_PATH}/demo-config")]
    assert find_record(kube, started) == record() and len(api.calls) == 1
    # The ConfigMap of an earlier resource of that name is not this one's record; and a started run
    # whose ConfigMap was deleted by hand goes on from its live spec and placed device, not from scratch.
    for gone in (config_map(record(), uid="uid-old"), _exc(404)):
        placed = body(status={"startTime": "2026-12-02T01:00:00Z", "placement": {"device": "xpu"}})
        got = find_record(CachedKube(FakeApiClient(gone), backoff=0), placed)
        assert got == StartRecord(raw_spec(), 3, "xpu", "2026-12-02T01:00:00Z")


def test_runs_started_by_an_older_operator_keep_their_record_on_the_resource() -> None:
    api = FakeApiClient()  # any request fails the test
    old = body(**{ANN_STARTED_SPEC: json.dumps(raw_spec(workers=2)), ANN_DEVICE: "xpu"})
    got = find_record(CachedKube(api, backoff=0), old)
    assert got is not None and got.spec["workers"] == 2 and got.device == "xpu" and got.started_at is None
    assert got.generation == 3 and api.calls == []
    with pytest.raises(ValueError):
        find_record(CachedKube(api, backoff=0), body(**{ANN_STARTED_SPEC: "{not json"}))


def test_a_start_tried_again_after_a_crash_adopts_the_record_it_committed() -> None:
    # The first try created the ConfigMap with lora.r 8 and died before its status write; the user
    # has changed the spec since: the run is what was committed, not the live spec.
    committed = record(spec=raw_spec(lora={"r": 8}), started_at="2026-12-01T23:00:00Z")
    api = FakeApiClient(_exc(409, "already exists"), config_map(committed))
    kube = CachedKube(api, backoff=0)
    rec, created = commit_of(kube, record(spec=raw_spec(lora={"r": 16})))
    assert not created and rec == committed and rec.annotations()[ANN_STARTED_AT] == "2026-12-01T23:00:00Z"
    assert [c[:2] for c in api.calls] == [("POST", CM_PATH), ("GET", f"{CM_PATH}/demo-config")]
    assert find_record(kube, body()) == committed and len(api.calls) == 2


def test_a_configmap_that_is_not_this_resources_is_never_adopted() -> None:
    earlier = FakeApiClient(_exc(409, "already exists"), config_map(record(), uid="uid-old"))
    with pytest.raises(TransientApiError, match="earlier LoRAFineTune demo is not deleted yet"):
        commit_of(CachedKube(earlier, backoff=0), record())
    foreign = FakeApiClient(_exc(409, "already exists"), config_map(record(), name="someone-else"))
    with pytest.raises(PermanentApiError, match="is not this LoRAFineTune's"):
        commit_of(CachedKube(foreign, backoff=0), record())
    bare = config_map(record())
    del bare["metadata"]["annotations"]
    with pytest.raises(PermanentApiError, match="without the start record"):
        commit_of(CachedKube(FakeApiClient(_exc(409), bare), backoff=0), record())
