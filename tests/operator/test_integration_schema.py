"""The generated CRD and the planned pods against the real API server (no operator running).

Defaults: before, the CRD carried none, so `kubectl get -o yaml` and `kubectl explain` hid lr 2e-4,
r 8, exact-match on. Now the server accepts the CRD with its defaults and fills them into a created
object (absent sections included, through their `default: {}`), and leaves "unset means follow the
operator" fields unset. Pod overrides: a worker pod shaped by every `spec.pod` field is a pod the
server admits.
"""

from __future__ import annotations

import pytest
from kubelora_operator.api import parse_spec
from kubelora_operator.settings import OperatorSettings

from tests.cluster.controlplane import ControlPlane

from .cluster_helpers import create_lft, ensure_crd, uid

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


def test_kubectl_explain_lists_the_fields_of_optional_objects(control_plane: ControlPlane) -> None:
    """Issue 12: v1.20 published `nullable` objects to `kubectl explain` without their fields, so
    `lft.spec.output.s3` listed nothing. The CRD now leaves objects non-nullable. (`lft.status` still
    explains only its description on v1.20: it keeps x-kubernetes-preserve-unknown-fields for newer
    operators' fields.)"""
    import os
    import subprocess

    from tests.cluster.controlplane import find_tool

    cp = control_plane
    ensure_crd(cp)
    kubectl = find_tool("kubectl")
    assert kubectl is not None

    def explain(path: str) -> str:
        proc = subprocess.run(
            [str(kubectl), "explain", path],
            env={**os.environ, **cp.env()},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return proc.stdout + proc.stderr

    def lists(path: str, field: str) -> str | None:
        text = explain(path)
        return text if field in text and "FIELDS:" in text else None

    for path, field in (("lft.spec.output.s3", "credentialsSecret"), ("lft.spec.dataVolume.pvc", "claimName")):
        cp.wait_for(lambda p=path, f=field: lists(p, f), timeout=60, what=f"kubectl explain {path} lists {field}")
