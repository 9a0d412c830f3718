"""The operator's LoRAFineTune watch (controller/lft_watch.py): the listing fills the cache and the
claim index and reports nothing; each event reaches the claim index and the cache before the
Runner hears of it; the echo of the operator's own patch and deletions queue no reconcile; an expired
resume point lists again and reports what the gap changed; an old version's finalizer is removed."""

from __future__ import annotations

from typing import Any

from kubelora_operator.controller.cache import CachedKube
from kubelora_operator.controller.claims import claims_in
from kubelora_operator.controller.lft_watch import OLD_FINALIZER, LftWatch

from .test_claims import T0, T1, lft
from .test_handlers import FakeApiClient
from .test_pod_watch import FakeStream, listing, params


def at(body: dict[str, Any], rv: str, **meta: Any) -> dict[str, Any]:
    return {**body, "metadata": {**body["metadata"], "resourceVersion": rv, **meta}}


def test_listing_fills_memory_then_each_event_reaches_the_index_and_cache_before_the_runner() -> None:
    api = FakeApiClient(listing(lft("a", T0), rv="10"))
    kube = CachedKube(api, backoff=0)
    seen: list[tuple[str, list[str], bool]] = []

    def on_change(ns: str, name: str) -> None:  # what the Runner would read at that moment
        names = [c.name for c in claims_in(watch.claim_index, ns, kube.records)]
        seen.append((name, names, kube.get_lft(ns, name) is not None))

    watch = LftWatch(kube, ["team-a"], on_change)
    kube.claim_index = watch.claim_index
    watch.list_all()
    assert api.calls[0][1] == "/apis/kubelora.dev/v1alpha1/namespaces/team-a/lorafinetunes"
    assert seen == [] and watch.known() == [("team-a", "a")]  # the startup queues each known one
    assert kube.get_lft("team-a", "a") is not None and len(api.calls) == 1  # from memory

    b = at(lft("b", T1), "11")
    api.script.append(FakeStream({"type": "ADDED", "object": b}, {"type": "DELETED", "object": at(lft("a", T0), "12")}))
    assert watch._watch("team-a")
    q = params(api.calls[1])
    assert q["resourceVersion"] == "10" and q["watch"] == "1" and q["allowWatchBookmarks"] == "true"
    assert seen == [("b", ["a", "b"], True)]  # no reconcile for a deletion
    assert [m["metadata"]["name"] for m in kube.bodies()] == ["b"]  # a is forgotten
    assert [c.name for c in claims_in(watch.claim_index, "team-a", kube.records)] == ["b"]

    # The echo of the operator's own status patch: the pass that wrote it saw that state.
    api.script.append(at(b, "13", generation=1))  # the PATCH's answer
    kube.patch_lft_status("team-a", "b", {"phase": "Pending"})
    api.script.append(FakeStream({"type": "MODIFIED", "object": at(b, "13")}, {"type": "MODIFIED", "object": at(b, "14")}))
    watch._watch("team-a")
    assert [s[0] for s in seen] == ["b", "b"]  # rv 14 (someone else's change) queues one; 13 did not


def test_an_expired_resume_point_lists_again_and_reports_what_the_gap_changed() -> None:
    api = FakeApiClient(listing(lft("a", T0), lft("b", T0), rv="10"))
    kube = CachedKube(api, backoff=0)
    seen: list[str] = []
    watch = LftWatch(kube, (), lambda ns, name: seen.append(name))
    watch.list_all()
    assert api.calls[0][1] == "/apis/kubelora.dev/v1alpha1/lorafinetunes"  # cluster-wide
    api.script += [
        FakeStream({"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version"}}),
        listing(at(lft("b", T0), "30"), lft("c", T1), rv="40"),  # a went away meanwhile
        FakeStream({"type": "MODIFIED", "object": at(lft("c", T1), "41")}),
    ]
    watch.on_change = lambda ns, name: (seen.append(name), len(seen) == 3 and watch._stop.set())
    watch._run("")
    assert seen == ["b", "c", "c"]
    assert sorted(watch.known()) == [("team-a", "b"), ("team-a", "c")]
    assert params(api.calls[3])["resourceVersion"] == "40"
    assert sorted(c.name for c in claims_in(watch.claim_index, "team-a", kube.records)) == ["b", "c"]


def test_the_finalizer_of_an_old_operator_version_is_removed_when_the_resource_is_deleted() -> None:
    deleting = at(lft("old", T0), "20", deletionTimestamp=T1, finalizers=[OLD_FINALIZER, "example.com/keep"])
    api = FakeApiClient(listing(rv="10"), FakeStream({"type": "MODIFIED", "object": deleting}), {})
    watch = LftWatch(CachedKube(api, backoff=0), ["team-a"], lambda ns, name: None)
    watch.list_all()
    watch._watch("team-a")
    method, path, body = api.calls[2]
    assert (method, path) == ("PATCH", "/apis/kubelora.dev/v1alpha1/namespaces/team-a/lorafinetunes/old")
    assert body == {"metadata": {"finalizers": ["example.com/keep"], "resourceVersion": "20"}}
    assert watch.claim_index == {}  # a resource being deleted claims no directory
