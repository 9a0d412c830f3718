"""The fetch step on the real control plane: sources are fetched by `<name>-fetch` before any worker pod.

The operator runs for real; the test plays the fetch pod's container (its status is patched with
the exit code and termination message `kubelora-train fetch` writes, as the other integration tests
play the trainer). What must hold: while the fetch pod has not succeeded no worker pod exists; a
bad source (exit 2) fails the run with SourceUnavailable and an Event, and no worker pod is ever
created; after success the workers read the fetched paths, and a worker restart does not fetch again.

The operator here resyncs only every `RESYNC_SECONDS` (the other modules: 1 s): each step must follow
from the fetch pod's own watch events, as in production, where a resync is 30 s away. (The operator's
pod watch once selected worker pods only, and these tests, resyncing every second, did not notice.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.cluster.controlplane import ControlPlane

from .cluster_helpers import (
    Env,
    add_amx_node,
    create_lft,
    get_lft,
    lft_spec,
    live_pods,
    operator_env_in_namespace,
    pods,
    show_operator_log,
    terminate_pod,
    uid,
    wait_condition,
    wait_events,
    wait_pods,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

MODEL = "s3://models/org/my-model"
#: Longer than any wait below: no resync pass can stand in for a missed fetch pod event.
RESYNC_SECONDS = "600"
#: The node pool of this module's resources (one node, room for all of them).
POOL = f"sources-{uid()}"


@pytest.fixture(scope="module")
def env(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    # The node first: the operator reuses its node list for 2 s (cache.NODE_LIST_TTL), and a resource
    # refused for want of a node is placed again only by a resync pass (every 600 s here).
    add_amx_node(control_plane, f"amx-{POOL}", POOL)
    logs = tmp_path_factory.mktemp("operator-logs")
    with operator_env_in_namespace(control_plane, logs, KUBELORA_RESYNC_SECONDS=RESYNC_SECONDS) as env:
        for kind, body in (
            ("persistentvolumeclaims", {"metadata": {"name": "model-cache"}, "spec": {
                "accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}),
            ("secrets", {"metadata": {"name": "s3-creds"}, "stringData": {
                "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}}),
        ):
            control_plane.create(f"/api/v1/namespaces/{env.ns}/{kind}", {"apiVersion": "v1", **body})
        yield env


@pytest.fixture(autouse=True)
def _operator_log(env: Env) -> Iterator[None]:
    yield
    show_operator_log(env)


def _spec(pool: str) -> dict[str, Any]:
    return lft_spec(
        pool,
        model={"nameOrPath": MODEL},
        device="cpu",
        resources={"gpus": 0},
        sources={"s3": {"endpoint": "http://s3.example:8333", "credentialsSecret": {"name": "s3-creds"}},
                 "cachePvc": {"claimName": "model-cache"}},
    )


def _start(env: Env) -> tuple[str, dict[str, Any]]:
    cp, name = env.cp, f"src-{uid()}"
    create_lft(cp, env.ns, name, _spec(POOL))
    (fetch,) = wait_pods(cp, env.ns, name, 1)
    assert fetch["metadata"]["name"] == f"{name}-fetch"
    return name, fetch


def _workers(cp: ControlPlane, ns: str, name: str) -> list[dict[str, Any]]:
    return [p for p in pods(cp, ns, name) if p["metadata"]["labels"].get("kubelora.dev/role") == "worker"]


def test_bad_source_fails_before_any_worker_pod(env: Env) -> None:
    cp, ns = env.cp, env.ns
    name, fetch = _start(env)
    c = fetch["spec"]["containers"][0]
    assert c["command"][3:6] == ["fetch", "--cache", "/sources"] and c["command"][-1] == MODEL
    assert "gpu.intel.com/i915" not in c["resources"].get("limits", {})
    wait_condition(cp, ns, name, "Running", "False", reason="FetchingSources")
    time.sleep(2)  # still no worker while the fetch runs
    assert _workers(cp, ns, name) == []
    line = f"source {MODEL}: no such object or prefix in bucket 'models'"
    terminate_pod(cp, ns, f"{name}-fetch", 2, line)
    obj = wait_condition(cp, ns, name, "Failed", reason="SourceUnavailable", contains=line)
    assert "no worker pod was created" in [c for c in obj["status"]["conditions"] if c["type"] == "Failed"][0][
        "message"]
    wait_events(cp, ns, name, "SourceUnavailable")
    time.sleep(1.5)
    assert _workers(cp, ns, name) == []


def test_workers_start_after_the_fetch_and_a_restart_does_not_fetch_again(env: Env) -> None:
    cp, ns = env.cp, env.ns
    name, fetch = _start(env)
    message = json.dumps({"sources": [{"uri": MODEL, "path": "/sources/x/my-model", "files": 3, "bytes": 1234,
                                       "downloaded": True}]})
    terminate_pod(cp, ns, f"{name}-fetch", 0, message)
    (worker,) = wait_pods(cp, ns, name, 1, lambda p: p["metadata"]["labels"].get("kubelora.dev/role") == "worker")
    mounts = {m["mountPath"]: m for m in worker["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["/sources"]["readOnly"] is True
    cm = cp.get(f"/api/v1/namespaces/{ns}/configmaps/{name}-config")
    assert yaml.safe_load(cm["data"]["config.yaml"])["model"]["nameOrPath"].startswith("/sources/")
    obj = get_lft(cp, ns, name)
    assert obj["metadata"]["annotations"]["kubelora.dev/sources-fetched"].startswith("1 source ready (1 downloaded")
    wait_events(cp, ns, name, "SourcesFetched")

    # a worker failure restarts the attempt: the sources stay fetched (same fetch pod, no new one)
    terminate_pod(cp, ns, worker["metadata"]["name"], 1, "RuntimeError: boom")
    wait_pods(cp, ns, name, 1, lambda p: p["metadata"]["labels"].get("kubelora.dev/attempt") == "1")
    assert get_lft(cp, ns, name)["status"]["restarts"] == 1
    fetches = [p for p in live_pods(cp, ns, name) if p["metadata"]["name"] == f"{name}-fetch"]
    assert [p["metadata"]["uid"] for p in fetches] == [fetch["metadata"]["uid"]]


def test_unreachable_store_fetches_again_as_a_counted_restart(env: Env) -> None:
    cp, ns = env.cp, env.ns
    name, fetch = _start(env)
    terminate_pod(cp, ns, f"{name}-fetch", 1, f"source {MODEL}: listing failed (S3 unreachable; retry later)")

    def second_fetch() -> dict[str, Any] | None:
        return next((p for p in live_pods(cp, ns, name) if p["metadata"]["name"] == f"{name}-fetch"
                     and p["metadata"]["uid"] != fetch["metadata"]["uid"]), None)

    cp.wait_for(second_fetch, timeout=30, what="the fetch pod created again")
    obj = wait_condition(cp, ns, name, "Running", "False", reason="FetchingSources")
    assert obj["status"]["restarts"] == 1 and _workers(cp, ns, name) == []
