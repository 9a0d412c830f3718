"""Events from a queue (controller/recorder.py): the reconcile never waits for one, they are posted in
the order decided with the time decided, a full queue drops rather than grows, shutdown drains."""

from __future__ import annotations

import threading
from typing import Any

from kubelora_operator.controller import Runner
from kubelora_operator.controller.cache import CachedKube
from kubelora_operator.controller.recorder import EventRecorder
from kubelora_operator.kube import event_manifest

from . import SETTINGS
from .test_handlers import FakeApiClient

BODY = {
    "apiVersion": "kubelora.dev/v1alpha1",
    "kind": "LoRAFineTune",
    "metadata": {"name": "demo", "namespace": "team-a", "uid": "uid-1", "resourceVersion": "7"},
}


class GatedPost:
    """A post function that holds every Event until `gate` is set, and records what it posted."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.gate = threading.Event()
        self.posted: list[str] = []
        self.fail_on = fail_on

    def __call__(self, manifest: dict[str, Any]) -> None:
        self.gate.wait(10)
        if manifest["reason"] == self.fail_on:
            raise RuntimeError("boom")
        self.posted.append(manifest["reason"])


def manifest(reason: str) -> dict[str, Any]:
    return event_manifest(BODY, "Normal", reason, f"message of {reason}")


def test_record_returns_at_once_and_events_are_posted_in_order() -> None:
    post = GatedPost()
    rec = EventRecorder(post)
    for i in range(20):
        rec.record(manifest(f"R{i}"))  # the post function is blocked: record must not wait for it
    assert rec.pending() == 20 and post.posted == []
    post.gate.set()
    assert rec.flush(10)
    assert post.posted == [f"R{i}" for i in range(20)] and rec.pending() == 0
    rec.stop()


def test_a_full_queue_drops_new_events_and_a_failing_post_stops_nothing() -> None:
    post = GatedPost(fail_on="R1")
    rec = EventRecorder(post, capacity=3)
    rec.record(manifest("R0"))
    assert not rec.flush(0.3)  # R0 is being posted (held at the gate): the queue is empty again
    for i in range(1, 7):
        rec.record(manifest(f"R{i}"))  # R1-R3 fill the queue; R4-R6 are dropped
    assert rec.pending() == 4
    post.gate.set()
    assert rec.flush(10)
    assert post.posted == ["R0", "R2", "R3"]  # R1's post raised: logged, the next ones still posted
    rec.stop()


def test_stop_posts_what_waits_then_takes_no_more() -> None:
    post = GatedPost()
    rec = EventRecorder(post)
    rec.record(manifest("A"))
    rec.record(manifest("B"))
    threading.Timer(0.2, post.gate.set).start()
    rec.stop(drain_seconds=10)
    assert post.posted == ["A", "B"]
    rec.record(manifest("C"))
    assert rec.pending() == 0 and post.posted == ["A", "B"]


def test_stop_gives_up_after_the_drain_time() -> None:
    post = GatedPost()  # never released: an API server that does not answer
    rec = EventRecorder(post)
    rec.record(manifest("A"))
    rec.record(manifest("B"))
    rec.stop(drain_seconds=0.2)
    assert rec.pending() <= 1  # at most the one held by the post; B is not posted any more
    post.gate.set()


def test_the_running_operator_queues_events_built_when_decided() -> None:
    api = FakeApiClient({}, {})
    kube = CachedKube(api, backoff=0)
    runner = Runner(kube, SETTINGS)
    kube.post_event(BODY, "Normal", "Before", "posted at once")  # no queues yet: tests and tools
    assert [c[2]["reason"] for c in api.calls] == ["Before"]
    runner.start_queues()
    try:
        assert kube.recorder is not None
        body = {**BODY, "metadata": {**BODY["metadata"]}}
        kube.post_event(body, "Warning", "Queued", "from the queue")
        body["metadata"]["resourceVersion"] = "8"  # the resource changes before the Event is posted
        assert kube.recorder.flush(10)
    finally:
        runner.stop_queues()
    assert kube.recorder is None
    event = api.calls[1][2]
    assert api.calls[1][:2] == ("POST", "/api/v1/namespaces/team-a/events")
    assert (event["type"], event["reason"], event["message"]) == ("Warning", "Queued", "from the queue")
    assert event["involvedObject"]["resourceVersion"] == "7"  # the Event is about the state it was decided on
