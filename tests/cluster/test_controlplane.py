"""The local control plane as the other tests use it: it starts with token auth, serves custom objects as
a real 1.20 cluster does (build.sh's patch), binds pods to the fake nodes it registers, reaches helm and
kubectl through its kubeconfig, and runs side by side and stops clean. Kubernetes' own behaviour (status
subresources, garbage collection, scheduling failures) is the operator tests' subject, not this file's.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from .controlplane import ApiError, ControlPlane, find_tool

pytestmark = pytest.mark.cluster

GROUP = "test.kubelora.io"
PLURAL = "gadgets"


def test_apiserver_ready_and_authenticated(control_plane: ControlPlane) -> None:
    """The version the operator targets, the files the tests hand to clients, and token auth on (the
    RBAC tests depend on requests being authenticated as who they say)."""
    assert control_plane.readyz()
    assert control_plane.get("/version")["gitVersion"].startswith("v1.20.")
    assert control_plane.kubeconfig is not None and control_plane.kubeconfig.is_file()
    assert control_plane.ca_file is not None and control_plane.ca_file.is_file()
    assert control_plane.server.startswith("https://127.0.0.1:")
    with pytest.raises(ApiError) as e:
        control_plane.get("/api/v1/namespaces", token="not-a-valid-token")
    assert e.value.status == 401


def _crd() -> dict:
    strings = {"type": "object", "properties": {"foo": {"type": "string"}, "bar": {"type": "string"}}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": PLURAL, "singular": "gadget", "kind": "Gadget", "listKind": "GadgetList"},
            "versions": [
                {
                    "name": "v1alpha1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {"type": "object", "properties": {"spec": strings, "status": strings}}
                    },
                }
            ],
        },
    }


def _try_create(cp: ControlPlane, path: str, obj: dict) -> dict | None:
    try:
        return cp.create(path, obj)
    except ApiError as e:
        if e.status in (404, 503):  # discovery of a new resource lags Established by a moment
            return None
        raise


def test_empty_string_survives_in_custom_object(control_plane: ControlPlane, cluster_namespace: str) -> None:
    """build.sh's patch: "" in a custom object is valid and stays as sent, as on a real 1.20 cluster.
    Built with Go >= 1.16, 1.20's CRD type validator took a decoded "" for null and answered 422
    `spec.foo in body must be of type string: "null"` (kubernetes/kubernetes#99804), so a LoRAFineTune
    (or its status) holding "" would be refused here but not on a real cluster."""
    cp = control_plane
    crd_path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{PLURAL}.{GROUP}"
    try:
        cp.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", _crd())
    except ApiError as e:
        if e.status != 409:  # left over from an earlier run against this control plane is fine
            raise

    def established() -> bool:
        conds = (cp.get(crd_path).get("status") or {}).get("conditions") or []  # may be null at first
        return any(c["type"] == "Established" and c["status"] == "True" for c in conds)

    cp.wait_for(established, timeout=30, what="CRD Established")
    base = f"/apis/{GROUP}/v1alpha1/namespaces/{cluster_namespace}/{PLURAL}"
    spec = {"foo": "", "bar": "x"}
    body = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "Gadget", "metadata": {"name": "g1"}, "spec": spec}
    obj = cp.wait_for(lambda: _try_create(cp, base, body), timeout=30, what="custom object with an empty string")
    assert obj["spec"] == spec
    assert cp.get(f"{base}/g1")["spec"] == spec  # read back from etcd
    patched = cp.merge_patch(f"{base}/g1/status", {"status": {"foo": "", "bar": ""}})
    assert patched["status"] == {"foo": "", "bar": ""}


def test_scheduler_binds_pods_to_fake_nodes(control_plane: ControlPlane, cluster_namespace: str) -> None:
    """add_fake_node registers a Ready node with the extended resources asked for, and the real
    scheduler binds a pod that requests them to it (the operator tests' placement runs on this)."""
    cp = control_plane
    group = uuid.uuid4().hex[:8]
    node = f"fake-gpu-{group}"
    cp.add_fake_node(node, {"kubelora.test/node-group": group}, {"gpu.intel.com/i915": "2"})
    try:
        got = cp.get(f"/api/v1/nodes/{node}")
        assert got["status"]["allocatable"]["gpu.intel.com/i915"] == "2"
        assert not any(t["key"] == "node.kubernetes.io/not-ready" for t in got["spec"].get("taints") or [])
        pods = f"/api/v1/namespaces/{cluster_namespace}/pods"
        container = {"name": "main", "image": "registry.invalid/none:0"}
        container["resources"] = {"limits": {"gpu.intel.com/i915": "1"}}
        pod_spec = {
            "nodeSelector": {"kubelora.test/node-group": group},
            "automountServiceAccountToken": False,
            "containers": [container],
        }
        cp.create(pods, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "fits"}, "spec": pod_spec})
        bound = cp.wait_for(lambda: cp.get(f"{pods}/fits")["spec"].get("nodeName"), timeout=60, what="pod bound")
        assert bound == node
    finally:
        cp.force_delete_pods(cluster_namespace)
        cp.delete_node(node)


def test_helm_and_kubectl_talk_to_cluster(control_plane: ControlPlane, kubeconfig_env: dict[str, str]) -> None:
    helm = find_tool("helm")
    kubectl = find_tool("kubectl")
    assert helm is not None and kubectl is not None, "run bash tests/cluster/build.sh"
    assert control_plane.workdir is not None
    env = {
        **os.environ,
        **kubeconfig_env,
        "HELM_CACHE_HOME": str(control_plane.workdir / "helm-cache"),
        "HELM_CONFIG_HOME": str(control_plane.workdir / "helm-config"),
        "HELM_DATA_HOME": str(control_plane.workdir / "helm-data"),
    }

    def run(*argv: str) -> str:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert run(str(helm), "version", "--short").startswith("v3.")
    run(str(helm), "list", "--all-namespaces")  # reaches the apiserver through the kubeconfig
    assert run(str(kubectl), "get", "namespace", "kube-system", "-o", "name").strip() == "namespace/kube-system"


def test_second_control_plane_side_by_side_and_clean_stop(control_plane: ControlPlane) -> None:
    """Free ports: a second (apiserver-only) control plane starts next to the session one,
    and stop() leaves no process and no temp dir behind."""
    with ControlPlane(controller_manager=False, scheduler=False) as cp:
        assert cp.ports["apiserver"] != control_plane.ports["apiserver"]
        assert cp.ports["etcd"] != control_plane.ports["etcd"]
        assert cp.readyz()
        pids = [p.pid for p in cp.procs.values()]
        workdir = cp.workdir
        assert set(cp.rss_mib()) == {"etcd", "kube-apiserver"}
    assert control_plane.readyz()
    assert workdir is not None and not workdir.exists()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid), pid


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
