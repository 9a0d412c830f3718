"""The operator's pod watch (controller/pod_watch.py): list, then watch from where the list ended;
the index before the event is reported; bookmarks move the resume point; an expired resume point
lists again and reports what changed; the ADDED event of a pod created as expected costs no reconcile."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

from kubelora_operator.controller import Runner
from kubelora_operator.controller.cache import CachedKube, workers_of
from kubelora_operator.controller.list_watch import watch_scopes
from kubelora_operator.controller.pod_watch import POD_SELECTOR, PodWatch
from kubelora_operator.kube import Kube

from . import SETTINGS
from .test_cache import worker
from .test_handlers import FakeApiClient


class FakeStream:
    """A watch response: the events as JSON lines, cut into chunks that split lines (as the network does)."""

    def __init__(self, *events: dict[str, Any]) -> None:
        data = b"".join(json.dumps(e).encode() + b"\n" for e in events)
        self.chunks = [data[i : i + 50] for i in range(0, len(data), 50)]

    def stream(self, amt: Any = None, decode_content: bool = False) -> Any:
        yield from self.chunks

    def release_conn(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def listing(*pods: dict[str, Any], rv: str = "10") -> dict[str, Any]:
    return {"items": list(pods), "metadata": {"resourceVersion": rv}}


def params(call: tuple[str, str, Any]) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(call[1]).query))


def test_scopes_plain_namespaces_one_by_one_patterns_cluster_wide() -> None:
    assert watch_scopes(())[0] == [""]
    scopes, wanted = watch_scopes(["team-a", "team-b", "team-a"])
    assert scopes == ["team-a", "team-b"] and wanted("anything")
    scopes, wanted = watch_scopes(["team-*", "!team-x"])
    assert scopes == [""] and wanted("team-a") and not wanted("team-x") and not wanted("default")


def test_list_then_watch_keeps_the_index_and_reports_each_event_after_it() -> None:
    seen: list[tuple[str, str, list[str]]] = []
    api = FakeApiClient(listing(worker("demo", 0), rv="10"))
    watch = PodWatch(Kube(api, backoff=0), ["team-a"], lambda ns, owner, kind, p: seen.append(
        (kind, p["metadata"]["name"], [w.name for w in workers_of(watch.index, ns, owner)])
    ))
    watch.list_all()
    assert api.calls[0][:2][0] == "GET" and api.calls[0][1].startswith("/api/v1/namespaces/team-a/pods?")
    assert params(api.calls[0]) == {"labelSelector": POD_SELECTOR}
    assert seen == [] and [w.name for w in workers_of(watch.index, "team-a", "demo")] == ["demo-worker-0"]

    bound = worker("demo", 1)
    bound["spec"]["nodeName"] = "n2"
    api.script.append(
        FakeStream(
            {"type": "ADDED", "object": {**worker("demo", 1), "metadata": {**worker("demo", 1)["metadata"], "resourceVersion": "11"}}},
            {"type": "MODIFIED", "object": bound},
            {"type": "DELETED", "object": worker("demo", 0)},
            {"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {"resourceVersion": "15"}}},
        )
    )
    assert watch._watch("team-a")
    q = params(api.calls[1])
    assert q["resourceVersion"] == "10" and q["watch"] == "1" and q["allowWatchBookmarks"] == "true"
    # Each event is reported after the index has it (the reconcile it triggers reads the new state).
    assert seen == [
        ("ADDED", "demo-worker-1", ["demo-worker-0", "demo-worker-1"]),
        ("MODIFIED", "demo-worker-1", ["demo-worker-0", "demo-worker-1"]),
        ("DELETED", "demo-worker-0", ["demo-worker-1"]),
    ]
    assert workers_of(watch.index, "team-a", "demo")[0].node == "n2"
    api.script.append(FakeStream())
    watch._watch("team-a")
    assert params(api.calls[2])["resourceVersion"] == "15"  # the bookmark moved the resume point


def test_an_expired_resume_point_lists_again_and_reports_what_the_gap_changed() -> None:
    seen: list[tuple[str, str]] = []
    api = FakeApiClient(listing(worker("demo", 0), worker("demo", 1), rv="10"))
    watch = PodWatch(Kube(api, backoff=0), (), lambda ns, owner, kind, p: seen.append((kind, p["metadata"]["name"])))
    watch.list_all()
    assert api.calls[0][1].startswith("/api/v1/pods?")  # cluster-wide
    stopper = worker("demo", 2)
    api.script += [
        FakeStream({"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version"}}),
        listing(worker("demo", 1), stopper, rv="40"),  # worker 0 went away meanwhile
        FakeStream({"type": "MODIFIED", "object": stopper}),
    ]
    watch.on_event = lambda ns, owner, kind, p: (seen.append((kind, p["metadata"]["name"])), len(seen) == 4 and watch._stop.set())
    watch._run("")
    assert seen == [
        ("DELETED", "demo-worker-0"),
        ("MODIFIED", "demo-worker-1"),
        ("MODIFIED", "demo-worker-2"),
        ("MODIFIED", "demo-worker-2"),
    ]
    assert params(api.calls[3])["resourceVersion"] == "40"
    assert [w.name for w in workers_of(watch.index, "team-a", "demo")] == ["demo-worker-1", "demo-worker-2"]


def test_the_added_event_of_a_pod_created_as_expected_triggers_no_reconcile() -> None:
    runs: list[tuple[str, str]] = []
    created = worker("demo", 0)
    kube = CachedKube(FakeApiClient({}), backoff=0)
    kube.pod_index = {}
    as_created = {**created, "metadata": {k: v for k, v in created["metadata"].items() if k != "uid"}, "status": {}}
    as_created = {**as_created, "apiVersion": "v1", "kind": "Pod"}
    as_created["spec"] = {}
    assert kube.create_if_absent(as_created)
    runner = Runner(kube, SETTINGS, fn=lambda k, s, ns, name: runs.append((ns, name)))
    seen_pod = {**as_created, "metadata": {**as_created["metadata"], "uid": "u-new"}, "status": {"phase": "Pending"}}
    assert not runner.pod_event("team-a", "demo", "ADDED", seen_pod) and runs == []
    assert not runner.pod_event("team-a", "demo", "MODIFIED", seen_pod) and runs == []  # remembered as acted on
    bound = {**seen_pod, "spec": {"nodeName": "n1"}}
    assert runner.pod_event("team-a", "demo", "MODIFIED", bound) and runs == [("team-a", "demo")]
    # A pod this process did not create (another operator's, or from before a restart) triggers one.
    other = worker("other", 0)
    assert runner.pod_event("team-a", "other", "ADDED", other) and runs[-1] == ("team-a", "other")
