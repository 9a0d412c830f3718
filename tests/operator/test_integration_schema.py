"""The generated CRD and the planned pods against the real API server (no operator running).

Defaults: before, the CRD carried none, so `kubectl get -o yaml` and `kubectl explain` hid lr 2e-4,
r 8, exact-match on. Now the server accepts the CRD with its defaults and fills them into a created
object (absent sections included, through their `default: {}`), and leaves "unset means follow the
operator" fields unset. Pod overrides: a worker pod shaped by every `spec.pod` field is a pod the
server admits. Explain: v1.20 lists typed fields of nested spec and status objects (no `nullable` or
preserving nodes in their way). Status is kept whole as the operator writes it. Typos: an unknown spec
key applied without validation is pruned, and `pruned_spec_fields` names it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from typing import Any

import pytest
from kubelora_operator.api import parse_spec
from kubelora_operator.settings import OperatorSettings

from tests.cluster.controlplane import ControlPlane, find_tool

from .cluster_helpers import LFT_API, create_lft, ensure_crd, get_lft, now, uid

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


def test_server_fills_spec_defaults(control_plane: ControlPlane) -> None:
    cp = control_plane
    ensure_crd(cp)
    ns = f"defaults-{uid()}"
    cp.create_namespace(ns)
    try:
        sparse = {"data": {"path": "sample://train.jsonl"}, "output": {"pvc": {"claimName": "runs"}},
                  "dataVolume": {"configMap": {"name": "d"}}}  # fmt: skip
        spec = create_lft(cp, ns, "sparse", sparse)["spec"]
        assert spec["lora"]["r"] == 8 and spec["lora"]["targetModules"] == "all-linear"
        assert spec["training"]["learningRate"] == 2e-4 and spec["training"]["epochs"] == 1
        assert spec["evaluation"]["exactMatch"] is True and spec["output"]["overwrite"] is False
        assert spec["resources"] == {"gpus": 1, "cpu": "4", "memory": "16Gi"}
        assert spec["dataVolume"]["configMap"]["mountPath"] == "/data"
        assert spec["device"] == "auto" and spec["workers"] == 1 and spec["suspend"] is False
        for unset in ("image", "imagePullPolicy", "activeDeadlineSeconds", "pod"):
            assert unset not in spec, unset
        assert "procsPerWorker" not in spec["distributed"]
        assert parse_spec(spec) == parse_spec(sparse)
        # A value the user gives is kept; the server fills only what is absent.
        given = create_lft(cp, ns, "given", {**sparse, "lora": {"r": 32}})["spec"]
        assert given["lora"]["r"] == 32 and given["lora"]["alpha"] == 16
    finally:
        cp.delete_namespace(ns)


def test_a_worker_pod_with_every_override_is_admitted(control_plane: ControlPlane) -> None:
    from . import resource
    from .test_plan import make
    from .test_pod_overrides import POD

    cp = control_plane
    ns = f"overrides-{uid()}"
    cp.create_namespace(ns, wait_service_account=True)
    try:
        cp.create(f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": POD["serviceAccountName"]}})
        rc = {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": f"kata-{ns}"},
              "handler": "kata"}  # fmt: skip
        cp.create("/apis/node.k8s.io/v1/runtimeclasses", rc)
        pod_spec = {**POD, "runtimeClassName": f"kata-{ns}"}
        settings = OperatorSettings(image_pull_secrets=["platform-registry"])
        res = resource(namespace=ns, imagePullSecrets=["team-registry"], pod=pod_spec)
        pod = make(res, settings=settings).pods[0]
        pod["metadata"].pop("ownerReferences")  # the LoRAFineTune does not exist here
        got = cp.create(f"/api/v1/namespaces/{ns}/pods", pod, params={"dryRun": "All"})
        assert got["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert got["spec"]["runtimeClassName"] == f"kata-{ns}"
        assert got["spec"]["imagePullSecrets"] == [{"name": "platform-registry"}, {"name": "team-registry"}]
        assert got["spec"]["containers"][0]["envFrom"][1]["prefix"] == "X_"
        assert got["spec"]["securityContext"]["runAsNonRoot"] is True
    finally:
        cp.delete(f"/apis/node.k8s.io/v1/runtimeclasses/kata-{ns}")
        cp.delete_namespace(ns)


def _kubectl(cp: ControlPlane, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    kubectl = find_tool("kubectl")
    assert kubectl is not None
    return subprocess.run(
        [str(kubectl), *args],
        env={**os.environ, **cp.env()},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


#: (path, field, type): what `kubectl explain PATH` must list. Issue 12: on v1.20 a `nullable` node is
#: published without its type (`<>`) and, for an object, without fields (`lft.spec.output.s3`); a node
#: with x-kubernetes-preserve-unknown-fields without fields (all of `lft.status`).
EXPLAINED = [
    ("lft.spec.output.s3", "credentialsSecret", "Object"),
    ("lft.spec.dataVolume.pvc", "claimName", "string"),
    ("lft.spec", "image", "string"),
    ("lft.spec.training", "maxSteps", "integer"),
    ("lft.status", "progress", "Object"),
    ("lft.status", "observedGeneration", "integer"),
    ("lft.status.progress", "trainLoss", "number"),
    ("lft.status.progress", "percent", "integer"),
    ("lft.status.conditions", "reason", "string"),
    ("lft.status.placement", "device", "string"),
    ("lft.status.artifact", "sha256", "string"),
    ("lft.status.workers", "ready", "integer"),
]


def test_kubectl_explain_lists_typed_fields_of_nested_spec_and_status(control_plane: ControlPlane) -> None:
    cp = control_plane
    ensure_crd(cp)

    def listing(path: str) -> str | None:
        text = (proc := _kubectl(cp, "explain", path)).stdout + proc.stderr
        return text if "FIELDS:" in text else None  # the server publishes the schema a little later

    for path in sorted({p for p, _, _ in EXPLAINED}):
        text = cp.wait_for(functools.partial(listing, path), timeout=60, what=f"kubectl explain {path} lists fields")
        for field, kind in ((f, k) for p, f, k in EXPLAINED if p == path):
            assert re.search(rf"^\s+{field}\s+<{kind}>", text, re.M), f"{path}: no {field} <{kind}> in\n{text}"


def test_status_the_operator_writes_is_kept_whole(control_plane: ControlPlane) -> None:
    """Status keeps no unknown fields now: a status as the operator builds it (its own functions) is
    stored whole, and what no schema declares (kopf's `status.kopf`, which this operator never writes)
    is pruned."""
    from kubelora_operator.conditions import ConditionReason, ConditionType, set_condition
    from kubelora_operator.controller.progress import GAUGES, progress_from_metrics
    from kubelora_operator.placement import PlacementDecision

    cp = control_plane
    ensure_crd(cp)
    ns = f"status-{uid()}"
    cp.create_namespace(ns)
    try:
        create_lft(cp, ns, "s", {"data": {"path": "sample://train.jsonl"}, "output": {"pvc": {"claimName": "r"}}})
        status = {
            "conditions": set_condition([], ConditionType.RUNNING, True, ConditionReason.WORKERS_RUNNING, "ok", 1, now()),
            "phase": "Running",
            "observedGeneration": 1,
            "startTime": now(),
            "placement": PlacementDecision("cpu", "AMX nodes", ConditionReason.PODS_CREATED, node_pool="amx").to_status(),
            "progress": progress_from_metrics({g: 2.5 for g in GAUGES} | {"kubelora_total_steps": 10.0}),
            "artifact": {"uri": "s3://b/p/adapter", "sha256": "ab" * 32, "sizeBytes": 123},
            "restarts": 1,
            "workers": {"ready": 2, "total": 2},
        }  # fmt: skip
        path = f"{LFT_API}/namespaces/{ns}/lorafinetunes/s/status"
        got = cp.merge_patch(path, {"status": {**status, "kopf": {"progress": {"x": 1}}}})["status"]
        assert got == status
    finally:
        cp.delete_namespace(ns)


def test_a_typo_applied_through_the_apiserver_is_pruned_and_named(control_plane: ControlPlane) -> None:
    """Issue 12: `kubectl apply` without validation (all that 1.20 offers for it) stores the spec
    without the unknown key; `pruned_spec_fields` names it from the last-applied annotation."""
    from kubelora_operator.pruned_fields import LAST_APPLIED, pruned_spec_fields

    cp = control_plane
    ensure_crd(cp)
    ns = f"typo-{uid()}"
    cp.create_namespace(ns)
    try:
        manifest: dict[str, Any] = {
            "apiVersion": "kubelora.dev/v1alpha1",
            "kind": "LoRAFineTune",
            "metadata": {"name": "typo", "namespace": ns},
            "spec": {
                "data": {"path": "sample://train.jsonl"},
                "output": {"pvc": {"claimName": "runs"}},
                "lora": {"rank": 32, "alpha": 8},
                "trainig": {"epochs": 3},
            },
        }
        proc = _kubectl(cp, "apply", "--validate=false", "-f", "-", stdin=json.dumps(manifest))
        assert proc.returncode == 0, proc.stderr
        stored = get_lft(cp, ns, "typo")
        assert LAST_APPLIED in stored["metadata"]["annotations"]
        assert "rank" not in stored["spec"]["lora"] and "trainig" not in stored["spec"]
        assert stored["spec"]["lora"]["r"] == 8 and stored["spec"]["lora"]["alpha"] == 8  # the default is used
        assert pruned_spec_fields(stored) == ["spec.lora.rank", "spec.trainig"]
        # Fixed and applied again: nothing is reported any more.
        manifest["spec"] = {**manifest["spec"], "lora": {"r": 32, "alpha": 8}, "training": {"epochs": 3}}
        del manifest["spec"]["trainig"]
        proc = _kubectl(cp, "apply", "--validate=false", "-f", "-", stdin=json.dumps(manifest))
        assert proc.returncode == 0, proc.stderr
        fixed = get_lft(cp, ns, "typo")
        assert fixed["spec"]["lora"]["r"] == 32 and pruned_spec_fields(fixed) == []
    finally:
        cp.delete_namespace(ns)
