"""Pure parts of the runtime: pod facts, metrics, termination messages, spec diffs, status patches,
trigger coalescing and the API layer's error policy (no cluster needed)."""

from __future__ import annotations

import json
import math
import threading
from typing import Any

import kopf
import pytest
from kubelora_operator.conditions import ConditionReason as R
from kubelora_operator.conditions import ConditionType as T
from kubelora_operator.controller import Runner
from kubelora_operator.controller.pods import first_failure, worker_state
from kubelora_operator.controller.progress import parse_prometheus, progress_from_metrics
from kubelora_operator.controller.reconcile import changed_fields, effective_spec
from kubelora_operator.controller.status import StatusUpdate
from kubelora_operator.kube import Kube, NotFound, PermanentApiError, TransientApiError
from kubelora_trainer.contract import parse_success_message as parse_termination_message
from kubelora_trainer.metrics import ProgressState
from kubernetes.client.exceptions import ApiException

from . import SETTINGS


def pod(index: int = 0, attempt: int = 0, phase: str = "Running", state: dict | None = None, **status: Any) -> dict:
    return {
        "metadata": {
            "name": f"demo-worker-{index}",
            "uid": f"u{index}",
            "labels": {"kubelora.dev/worker-index": str(index), "kubelora.dev/attempt": str(attempt)},
        },
        "spec": {"nodeName": "n1"},
        "status": {
            "phase": phase,
            "podIP": "10.0.0.1",
            "containerStatuses": [{"name": "trainer", "state": state or {"running": {}}}],
            **status,
        },
    }


def test_worker_state_reads_exit_codes_and_messages() -> None:
    ok = worker_state(pod(phase="Succeeded", state={"terminated": {"exitCode": 0, "message": '{"artifact": {}}'}}))
    assert ok.succeeded and not ok.failed and ok.terminated and ok.message == '{"artifact": {}}'
    bad = worker_state(pod(1, phase="Failed", state={"terminated": {"exitCode": 2, "message": "data.path: missing\n"}}))
    assert bad.failed and bad.exit_code == 2 and bad.message == "data.path: missing"
    assert bad.describe_failure() == "worker 1 (demo-worker-1) exited with code 2: data.path: missing"
    oom = worker_state(pod(phase="Failed", state={"terminated": {"exitCode": 137, "reason": "OOMKilled"}}))
    assert oom.message == "OOMKilled"
    evicted = worker_state({**pod(phase="Failed"), "status": {"phase": "Failed", "reason": "Evicted"}})
    assert evicted.failed and evicted.exit_code is None and evicted.message == "Evicted"
    pending = worker_state(
        {
            "metadata": {"name": "demo-worker-0", "labels": {}},
            "spec": {},
            "status": {
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "False", "message": "0/3 nodes are available"}],
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}},
                    }
                ],
            },
        }
    )
    assert pending.node is None and pending.unschedulable == "0/3 nodes are available"
    assert pending.waiting == "ImagePullBackOff: no such image" and not pending.running


def test_first_failure_prefers_bad_input() -> None:
    a = worker_state(pod(0, phase="Failed", state={"terminated": {"exitCode": 1}}))
    b = worker_state(pod(1, phase="Failed", state={"terminated": {"exitCode": 2, "message": "bad"}}))
    assert first_failure([a, b]) is b
    assert first_failure([worker_state(pod(0))]) is None


def test_termination_message_contract() -> None:
    msg = json.dumps({"artifact": {"uri": "s3://b/p/adapter", "sha256": "ab" * 32, "sizeBytes": 12}, "steps": 20})
    assert parse_termination_message(msg) == {"uri": "s3://b/p/adapter", "sha256": "ab" * 32, "sizeBytes": 12}
    # One spelling of the size: the one the trainer writes (contract.success_message).
    assert parse_termination_message('{"artifact": {"sha256": "x", "size": 5}}') == {"sha256": "x"}
    assert parse_termination_message('{"artifact": {"uri": "", "sizeBytes": true}}') == {}
    for other in (None, "", "RuntimeError: boom", "{not json", '{"no": "artifact"}', "[1]"):
        assert parse_termination_message(other) is None


def test_progress_from_the_trainers_own_exposition() -> None:
    state = ProgressState()
    assert progress_from_metrics(parse_prometheus(state.prometheus_text())) == {
        "step": 0,
        "epoch": 0.0,
        "tokensPerSecond": 0.0,
    }  # NaN losses/ETA left out, total 0 means "not planned yet"
    state.update(step=7, total_steps=20, epoch=0.35, train_loss=1.25, eval_loss=math.nan, eta_seconds=12.7)
    got = progress_from_metrics(parse_prometheus(state.prometheus_text()))
    assert got == {
        "step": 7,
        "totalSteps": 20,
        "epoch": 0.35,
        "trainLoss": 1.25,
        "tokensPerSecond": 0.0,
        "etaSeconds": 12,
        "percent": 35,
    }
    assert parse_prometheus('x{a="1"} 3\n# c\ny 2\n') == {"y": 2.0}
    assert parse_prometheus("z nope\n") == {}  # not an exposition: no samples, not an exception


def test_changed_fields_ignore_run_policy() -> None:
    old = {"workers": 2, "lora": {"r": 8}, "suspend": False, "backoffLimit": 3}
    new = {"workers": 3, "lora": {"r": 8, "alpha": 16}, "suspend": True, "activeDeadlineSeconds": 60}
    assert changed_fields(old, new) == ["spec.lora.alpha", "spec.workers"]
    assert changed_fields(old, {**old, "suspend": True}) == []
    assert effective_spec(old, new) == {"workers": 2, "lora": {"r": 8}, "suspend": True, "activeDeadlineSeconds": 60}


def test_status_update_patches_only_changes_and_events_only_transitions() -> None:
    body = {"metadata": {"name": "demo", "namespace": "ns", "generation": 2}, "status": {"restarts": 0}}
    u = StatusUpdate(body)
    assert u.condition(T.VALIDATED, True, R.SPEC_VALID, "ok", event="Normal")
    patch = u.patch()
    assert set(patch) == {"conditions", "phase"} and patch["phase"] == "Pending"
    assert patch["conditions"][0]["observedGeneration"] == 2
    assert u.events == [("Normal", "SpecValid", "ok")]
    body2 = {**body, "status": {**body["status"], **patch}}
    u2 = StatusUpdate(body2)
    assert not u2.condition(T.VALIDATED, True, R.SPEC_VALID, "ok", event="Normal")
    assert u2.patch() == {} and u2.events == []
    u2.drop(T.VALIDATED)
    u2.status.pop("restarts")
    assert u2.patch() == {"conditions": [], "restarts": None}


def test_runner_coalesces_triggers_and_maps_transient_errors() -> None:
    calls: list[str] = []

    def fn(kube: Any, settings: Any, ns: str, name: str) -> None:
        calls.append(name)
        if len(calls) == 1:
            # A trigger for the same resource while it runs (e.g. a pod event): only marks it dirty.
            t = threading.Thread(target=runner.trigger, args=(ns, name))
            t.start()
            t.join()
            assert calls == ["demo"]

    runner = Runner(kube=None, settings=SETTINGS, fn=fn)  # type: ignore[arg-type]
    runner.trigger("ns", "demo")
    assert calls == ["demo", "demo"]  # one more pass, in the first caller's thread

    def flaky(*_: Any) -> None:
        raise TransientApiError("GET", "/x", 503, "busy")

    runner = Runner(kube=None, settings=SETTINGS, fn=flaky)  # type: ignore[arg-type]
    with pytest.raises(kopf.TemporaryError) as err:
        runner.trigger("ns", "demo", retry=3)
    assert err.value.delay == 8.0
    with pytest.raises(kopf.TemporaryError):  # not stuck as "running" after an error
        runner.trigger("ns", "demo")


class FakeResponse:
    def __init__(self, data: Any) -> None:
        self.data = json.dumps(data).encode()


class FakeApiClient:
    """Answers call_api from a script of results (ApiException instances are raised)."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.calls: list[tuple[str, str, Any]] = []

    def call_api(self, path: str, method: str, body: Any = None, **kw: Any) -> Any:
        self.calls.append((method, path, body))
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        if hasattr(item, "stream"):  # a watch response (test_pod_watch.py)
            return item
        return FakeResponse(item)


def _exc(status: int, message: str = "") -> ApiException:
    e = ApiException(status=status, reason="x")
    e.body = json.dumps({"message": message}).encode()
    return e


def test_kube_retries_transient_errors_then_gives_up() -> None:
    api = FakeApiClient(_exc(503), _exc(429), {"ok": 1})
    kube = Kube(api, retries=3, backoff=0)
    assert kube.request("GET", "/api/v1/nodes") == {"ok": 1} and len(api.calls) == 3
    api = FakeApiClient(*[_exc(500, "etcd timeout")] * 3)
    with pytest.raises(TransientApiError, match="etcd timeout"):
        Kube(api, retries=2, backoff=0).request("GET", "/api/v1/nodes")
    api = FakeApiClient(ConnectionResetError("reset"), {"ok": 2})
    assert Kube(api, retries=1, backoff=0).request("GET", "/x") == {"ok": 2}


def test_kube_permanent_errors_and_expected_404_409() -> None:
    with pytest.raises(PermanentApiError, match="422"):
        Kube(FakeApiClient(_exc(422, "spec.containers: Invalid")), backoff=0).request("POST", "/x", {})
    assert Kube(FakeApiClient(_exc(404)), backoff=0).get("/x") is None
    with pytest.raises(NotFound):
        Kube(FakeApiClient(_exc(404)), backoff=0).request("GET", "/x")
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "ns"}}
    api = FakeApiClient(_exc(409, "already exists"))
    assert Kube(api, backoff=0).create_if_absent(cm) is False
    assert api.calls[0][:2] == ("POST", "/api/v1/namespaces/ns/configmaps")
    assert Kube(FakeApiClient({}), backoff=0).create_if_absent(cm) is True
    assert Kube(FakeApiClient(_exc(404)), backoff=0).delete_pod("ns", "p") is False
    assert Kube(FakeApiClient(_exc(409)), backoff=0).delete_pod("ns", "p", uid="u") is False


def test_trainer_success_message_round_trips_into_status_artifact() -> None:
    """The trainer's side of the termination-message contract (kubelora_trainer.cli.success_message)."""
    from kubelora_trainer.cli import success_message

    summary = {"adapter": {"path": "/output/adapter", "sha256": "ab" * 32, "size_bytes": 123}, "artifact_uri": None}
    assert parse_termination_message(success_message(summary)) == {"sha256": "ab" * 32, "sizeBytes": 123}
    summary["artifact_uri"] = "s3://bucket/runs/demo"
    assert parse_termination_message(success_message(summary))["uri"] == "s3://bucket/runs/demo"
    assert parse_termination_message(success_message({})) == {}  # nulls are dropped, not written as ""


def test_a_run_shorter_than_one_scrape_ends_with_its_final_step_and_loss() -> None:
    """Issue 12: a run that finished before the first progress scrape used to end `step 0, percent 100` with
    an empty LOSS column; the trainer's final gauges now ride in the success message."""
    from kubelora_operator.controller.attempt import Attempt, finish, observe
    from kubelora_trainer.cli import success_message
    from kubelora_trainer.metrics import ProgressState

    from . import resource

    state = ProgressState()
    state.update(step=12, total_steps=12, train_loss=0.75, eval_loss=0.5, tokens_per_second=321.0)
    message = success_message({"adapter": {"sha256": "ab" * 32, "size_bytes": 9}}, state.snapshot())
    w0 = worker_state(pod(0, phase="Succeeded", state={"terminated": {"exitCode": 0, "message": message}}))
    u = StatusUpdate({"metadata": {"name": "demo", "namespace": "team-a", "generation": 1}, "status": {}})
    finish(Attempt(_RecordingKube([]), SETTINGS, u, resource(workers=1), None, 0), observe([w0], 0, 1))  # type: ignore[arg-type]
    progress = u.status["progress"]
    assert (progress["step"], progress["totalSteps"], progress["percent"]) == (12, 12, 100)
    assert (progress["trainLoss"], progress["evalLoss"]) == (0.75, 0.5)
    assert u.status["artifact"]["sha256"] == "ab" * 32
    assert "NaN" not in message  # unset gauges (eta: NaN) are left out, not written as invalid JSON


class _RecordingKube:
    """Answers the two pod lists of one reconcile and records every call (no cluster: the branch under
    test needs a cached list that lags behind etcd, which a real apiserver gives only by chance)."""

    def __init__(self, quorum_pods: list[dict]) -> None:
        self.quorum_pods = quorum_pods
        self.calls: list[tuple[str, Any]] = []

    def list_pods(self, namespace: str, selector: Any, *, from_cache: bool = False) -> list[dict]:
        self.calls.append(("list_pods", from_cache))
        assert not from_cache, "the confirmation must be a quorum read"
        return self.quorum_pods

    def delete_pod(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        self.calls.append(("delete_pod", name))
        return True

    def patch_lft_annotations(self, namespace: str, name: str, annotations: Any) -> None:
        self.calls.append(("patch_lft_annotations", dict(annotations)))

    def list_nodes(self) -> list[dict]:
        labels = {"feature.node.kubernetes.io/cpu-cpuid.AMXBF16": "true"}
        return [
            {"metadata": {"name": "n1", "labels": labels}, "status": {"allocatable": {"cpu": "64", "memory": "256Gi"}}}
        ]

    def create_if_absent(self, obj: dict) -> bool:
        self.calls.append(("create", f"{obj['kind']} {obj['metadata']['name']}"))
        return obj["kind"] == "Pod"


#: What the pass that created attempt 0's pods wrote: the attempt was reported created.
REPORTED = {
    "conditions": [
        {
            "type": "Scheduled",
            "status": "True",
            "reason": "PodsScheduled",
            "message": "2 worker pods of attempt 0 bound to n1",
        }
    ]
}


def _observe_with_worker_1_missing_from_the_cache(
    quorum_pods: list[dict], status: dict | None = None
) -> tuple[_RecordingKube, StatusUpdate]:
    from kubelora_operator.controller.attempt import Attempt, advance

    from . import resource

    kube = _RecordingKube(quorum_pods)
    body = {"metadata": {"name": "demo", "namespace": "team-a", "generation": 3}, "status": status or REPORTED}
    u = StatusUpdate(body)
    cached = [worker_state(pod(0))]  # worker 0 runs; the cached list has not seen worker 1 yet
    advance(Attempt(kube, SETTINGS, u, resource(workers=2), "cpu", 0), cached)  # type: ignore[arg-type]
    return kube, u


def test_a_pod_missing_from_the_cached_list_is_confirmed_before_the_attempt_restarts() -> None:
    kube, u = _observe_with_worker_1_missing_from_the_cache([pod(0), pod(1)])
    assert kube.calls == [("list_pods", False)]  # no delete, no new attempt
    assert u.status["workers"] == {"ready": 2, "total": 2}

    kube, u = _observe_with_worker_1_missing_from_the_cache([pod(0)])  # really gone: a disruption
    assert kube.calls[0] == ("list_pods", False)
    assert ("patch_lft_annotations", {"kubelora.dev/attempt": "1"}) in kube.calls
    assert ("delete_pod", "demo-worker-0") in kube.calls
    running = next(c for c in u.conditions if c["type"] == "Running")
    assert running["reason"] == "Restarting" and "demo-worker-1 disappeared" in running["message"]


def test_a_worker_never_created_because_the_operator_died_is_created_not_a_disruption() -> None:
    # The operator was killed after creating worker 0 (now running) and before worker 1 and before
    # the status write that reports the attempt's pods: worker 1 is created, the attempt goes on.
    kube, u = _observe_with_worker_1_missing_from_the_cache([pod(0)], status={"startTime": "2026-12-01T00:00:00Z"})
    assert kube.calls[0] == ("list_pods", False)
    assert ("create", "Pod demo-worker-1") in kube.calls and ("create", "Pod demo-worker-0") not in kube.calls
    assert not any(c[0] in ("delete_pod", "patch_lft_annotations") for c in kube.calls), kube.calls
    assert next(c for c in u.conditions if c["type"] == "Running")["reason"] == "WorkersStarting"
    assert u.events[-1][1] == "PodsCreated" and "1 worker pod of attempt 0" in u.events[-1][2]


def test_pod_events_reconcile_only_when_the_workers_state_changed() -> None:
    runs: list[str] = []
    runner = Runner(kube=None, settings=SETTINGS, fn=lambda *a: runs.append(a[3]))  # type: ignore[arg-type]
    pending = pod(0, phase="Pending", state={"waiting": {"reason": "ContainerCreating"}})
    assert runner.pod_event("ns", "demo", None, pending)  # first sight (initial listing): reconcile
    probe_update = {**pending, "status": {**pending["status"], "conditions": [{"type": "Ready", "status": "False"}]}}
    assert not runner.pod_event("ns", "demo", "MODIFIED", probe_update)  # nothing the reconcile reads
    assert runner.pod_event("ns", "demo", "MODIFIED", pod(0))  # now running
    exited = pod(0, phase="Failed", state={"terminated": {"exitCode": 1, "message": "boom"}})
    assert runner.pod_event("ns", "demo", "MODIFIED", exited)
    assert runner.pod_event("ns", "demo", "DELETED", exited)  # gone: always
    assert runs == ["demo"] * 4

    def flaky(*_: Any) -> None:
        raise TransientApiError("GET", "/x", 503, "busy")

    runner = Runner(kube=None, settings=SETTINGS, fn=flaky)  # type: ignore[arg-type]
    for _ in range(2):  # a reconcile that failed is not remembered: the same event triggers again
        with pytest.raises(kopf.TemporaryError):
            runner.pod_event("ns", "demo", "MODIFIED", pod(0))


def test_events_queue_reconciles_and_pod_events_of_one_resource_arriving_together_cost_one() -> None:
    import threading
    import time

    runs: list[str] = []
    done = threading.Event()

    def fn(*a: Any) -> None:
        runs.append(a[3])
        if len(runs) >= 2:
            done.set()

    runner = Runner(kube=None, settings=SETTINGS, fn=fn)  # type: ignore[arg-type]
    runner.start_queues(pod_delay=1.0)  # far longer than the three calls below take
    try:
        bound = [pod(i, phase="Pending", state={"waiting": {"reason": "ContainerCreating"}}) for i in range(2)]
        for i, p in enumerate(bound):
            p["metadata"]["uid"] = f"u{i}"
            assert runner.pod_event("ns", "demo", "MODIFIED", p)
        other = pod(0)
        other["metadata"]["uid"] = "o0"
        assert runner.pod_event("ns", "other", "ADDED", other)
        assert runs == []  # nothing ran in kopf's thread
        assert done.wait(5)
        time.sleep(0.5)
        assert sorted(runs) == ["demo", "other"]  # both workers of demo: one reconcile
        assert not runner.pod_event("ns", "demo", "MODIFIED", bound[1])  # acted on: remembered
        assert runner.pending() == 0
        runner.resource_event("ns", "demo")  # the resource's own events: queued too, run without delay
        for _ in range(50):
            if len(runs) >= 3:
                break
            time.sleep(0.05)
        time.sleep(0.2)
        assert sorted(runs) == ["demo", "demo", "other"]
    finally:
        runner.stop_queues()
