"""The operator runs with exactly `kubelora_operator.rbac` (a ServiceAccount token, RBAC authorizer on).

Namespaced mode: the namespaced rules come through a RoleBinding in the watched namespace, the
cluster rules (nodes, CRDs, namespaces) through a ClusterRoleBinding. One run exercises every verb:
validation reads (Secret, PVC), placement (nodes), children (ConfigMap, Service, pods, mpirun's SSH
Secret), pod watching, status and annotation patches, Events, and the TTL deletion with kopf's
finalizer removal. Any 403 in the operator's log fails the test.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubelora_operator.rbac import manifests

from tests.cluster.controlplane import ApiError, ControlPlane
from tests.cluster.log_checks import denials
from tests.cluster.service_accounts import service_account_kubeconfig, service_account_token

from .cluster_helpers import (
    FakeKubelet,
    OperatorProcess,
    add_gpu_node,
    condition,
    create_lft,
    ensure_crd,
    get_lft,
    lft_spec,
    release_lfts,
    run_pod,
    terminate_pod,
    uid,
    wait_condition,
    wait_events,
    wait_pods,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

_PATHS = {
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
}


def _path(obj: dict) -> str:
    if obj["kind"] == "RoleBinding":
        return f"/apis/rbac.authorization.k8s.io/v1/namespaces/{obj['metadata']['namespace']}/rolebindings"
    return _PATHS[obj["kind"]]


@pytest.fixture
def restricted(control_plane: ControlPlane, tmp_path: Path) -> Iterator[tuple[str, OperatorProcess]]:
    cp = control_plane
    ensure_crd(cp)
    ns = f"rbac-{uid()}"
    cp.create_namespace(ns)
    cp.create(
        f"/api/v1/namespaces/{ns}/serviceaccounts",
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "kubelora-operator"}},
    )
    token = service_account_token(cp, ns, "kubelora-operator", timeout=30)
    objs = manifests("kubelora-operator", ns, [ns], name=f"kubelora-operator-{ns}")
    for obj in objs:
        cp.create(_path(obj), obj)
    kubeconfig = service_account_kubeconfig(cp, token, ns, tmp_path / "kubeconfig")
    op = OperatorProcess(cp, ns, tmp_path, KUBECONFIG=str(kubeconfig)).start()
    kubelet = FakeKubelet(cp, ns)
    try:
        yield ns, op
        print(f"--- operator log ---\n{op.log_tail(150)}")
    finally:
        op.stop()
        kubelet.stop()
        release_lfts(cp, ns)
        for obj in objs:
            if obj["kind"] != "RoleBinding":
                with contextlib.suppress(ApiError):
                    cp.delete(f"{_path(obj)}/{obj['metadata']['name']}")
        with contextlib.suppress(ApiError):
            cp.delete_namespace(ns)


def test_operator_needs_nothing_beyond_its_rbac(
    control_plane: ControlPlane, restricted: tuple[str, OperatorProcess]
) -> None:
    cp = control_plane
    ns, op = restricted
    pool = uid()
    for i in range(2):
        add_gpu_node(cp, f"gpu-{pool}-{i}", pool, gpus=2)
    cp.create(
        f"/api/v1/namespaces/{ns}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3"},
            "stringData": {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"},
        },
    )
    s3 = {"s3": {"uri": "s3://bucket/rbac", "credentialsSecret": {"name": "s3"}}}
    name = f"mpi-{pool}"
    create_lft(
        cp,
        ns,
        name,
        lft_spec(
            pool,
            device="xpu",
            workers=2,
            output=s3,
            distributed={"launcher": "mpirun", "backend": "ccl"},
            # Long enough that the Succeeded condition is seen before the TTL deletes the resource even
            # on a loaded machine (with 1 s, one CI run polled only after the deletion: 404).
            ttlSecondsAfterFinished=5,
        ),
    )
    create_lft(cp, ns, f"nopvc-{pool}", lft_spec(pool, output={"pvc": {"claimName": "absent"}}))

    obj = wait_condition(cp, ns, f"nopvc-{pool}", "Validated", "False", "PVCNotFound")
    assert "absent" in condition(obj, "Validated")["message"]
    ps = wait_pods(cp, ns, name, 2, lambda p: bool(p["spec"].get("nodeName")))
    assert cp.get(f"/api/v1/namespaces/{ns}/secrets/{name}-ssh")["type"] == "kubernetes.io/ssh-auth"
    for p in ps:
        run_pod(cp, ns, p["metadata"]["name"])
    wait_condition(cp, ns, name, "Running", "True")
    wait_events(cp, ns, name, "WorkersRunning")
    terminate_pod(cp, ns, ps[0]["metadata"]["name"], 0, json.dumps({"artifact": {"sha256": "ef" * 32, "sizeBytes": 7}}))
    wait_condition(cp, ns, name, "Succeeded", "True")

    def gone() -> bool:
        try:
            get_lft(cp, ns, name)
        except ApiError as err:
            return err.status == 404
        return False

    cp.wait_for(gone, timeout=30, what="TTL deletion (finalizer removed by the restricted operator)")
    op.assert_alive()
    log = op.log_path.read_text() if op.log_path else ""
    refused = denials(log)
    assert not refused, "\n".join(refused[:10])
