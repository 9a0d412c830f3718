"""The local control plane itself: apiserver, CRDs, real scheduling onto fake nodes, GC, helm."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from .controlplane import ApiError, ControlPlane, find_tool

pytestmark = pytest.mark.cluster

GROUP = "test.kubelora.io"
PLURAL = "widgets"


def _uid() -> str:
    return uuid.uuid4().hex[:8]


def test_apiserver_ready_and_authenticated(control_plane: ControlPlane) -> None:
    assert control_plane.readyz()
    version = control_plane.get("/version")
    assert version["gitVersion"].startswith("v1.20."), version
    names = {n["metadata"]["name"] for n in control_plane.get("/api/v1/namespaces")["items"]}
    assert {"default", "kube-system"} <= names
    # Token auth and RBAC are on: a wrong token is rejected, anonymous may not list namespaces.
    with pytest.raises(ApiError) as e:
        control_plane.get("/api/v1/namespaces", token="not-a-valid-token")
    assert e.value.status == 401
    with pytest.raises(ApiError) as e:
        control_plane.get("/api/v1/namespaces", token="")
    assert e.value.status in (401, 403)
    assert control_plane.kubeconfig is not None and control_plane.kubeconfig.is_file()
    assert control_plane.ca_file is not None and control_plane.ca_file.is_file()
    assert control_plane.server.startswith("https://127.0.0.1:")


def _crd() -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
            "versions": [
                {
                    "name": "v1alpha1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["size"],
                                    "properties": {"size": {"type": "integer", "minimum": 1}},
                                },
                                "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                            },
                        }
                    },
                }
            ],
        },
    }


def test_crd_established_and_status_subresource(control_plane: ControlPlane, cluster_namespace: str) -> None:
    cp = control_plane
    crd_path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{PLURAL}.{GROUP}"
    try:
        cp.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", _crd())
    except ApiError as e:
        if e.status != 409:  # left over from an earlier test in this session is fine
            raise

    def established() -> bool:
        # right after creation the status may carry "conditions": null
        conds = (cp.get(crd_path).get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conds)

    cp.wait_for(established, timeout=30, what="CRD Established")

    base = f"/apis/{GROUP}/v1alpha1/namespaces/{cluster_namespace}/{PLURAL}"
    # Discovery of the new resource can lag Established by a moment.
    obj = cp.wait_for(
        lambda: _try_create(
            cp,
            base,
            {"apiVersion": f"{GROUP}/v1alpha1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 3}},
        ),
        timeout=30,
        what="custom object create",
    )
    assert obj["spec"] == {"size": 3}
    gen = obj["metadata"]["generation"]

    # Schema validation is enforced.
    with pytest.raises(ApiError) as bad:
        cp.create(
            base,
            {"apiVersion": f"{GROUP}/v1alpha1", "kind": "Widget", "metadata": {"name": "bad"}, "spec": {"size": "big"}},
        )
    assert bad.value.status == 422

    # Status subresource: the status patch sticks, does not bump generation, and spec is untouched.
    patched = cp.merge_patch(f"{base}/w1/status", {"status": {"phase": "Ready"}, "spec": {"size": 99}})
    assert patched["status"] == {"phase": "Ready"}
    assert patched["spec"] == {"size": 3}
    assert patched["metadata"]["generation"] == gen
    # ... and the main resource ignores status changes.
    main = cp.merge_patch(f"{base}/w1", {"status": {"phase": "Hacked"}, "spec": {"size": 4}})
    assert main["status"] == {"phase": "Ready"}
    assert main["spec"] == {"size": 4}
    assert main["metadata"]["generation"] == gen + 1


def _try_create(cp: ControlPlane, path: str, obj: dict) -> dict | None:
    try:
        return cp.create(path, obj)
    except ApiError as e:
        if e.status in (404, 503):
            return None
        raise


GADGETS = "gadgets"


def _gadget_crd() -> dict:
    str_props = {"foo": {"type": "string"}, "bar": {"type": "string"}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{GADGETS}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": GADGETS, "singular": "gadget", "kind": "Gadget", "listKind": "GadgetList"},
            "versions": [
                {
                    "name": "v1alpha1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        **str_props,
                                        "count": {"type": "integer"},
                                        "enabled": {"type": "boolean"},
                                        "items": {"type": "array", "items": {"type": "string"}},
                                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                    },
                                },
                                "status": {"type": "object", "properties": str_props},
                            },
                        }
                    },
                }
            ],
        },
    }


def test_empty_string_survives_in_custom_object(control_plane: ControlPlane, cluster_namespace: str) -> None:
    """Regression: "" (and other zero values) in a custom object are valid and stay as sent, as on a real
    1.20 cluster. Built with Go >= 1.16, 1.20's CRD type validator took a decoded "" for null and answered
    422 `spec.foo in body must be of type string: "null"` (kubernetes/kubernetes#99804); build.sh patches it."""
    cp = control_plane
    crd_path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{GADGETS}.{GROUP}"
    try:
        cp.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", _gadget_crd())
    except ApiError as e:
        if e.status != 409:
            raise

    def established() -> bool:
        conds = (cp.get(crd_path).get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conds)

    cp.wait_for(established, timeout=30, what="CRD Established")
    base = f"/apis/{GROUP}/v1alpha1/namespaces/{cluster_namespace}/{GADGETS}"
    spec = {"foo": "", "bar": "x", "count": 0, "enabled": False, "items": ["", "a"], "labels": {"empty": "", "k": "v"}}
    obj = cp.wait_for(
        lambda: _try_create(
            cp, base, {"apiVersion": f"{GROUP}/v1alpha1", "kind": "Gadget", "metadata": {"name": "g1"}, "spec": spec}
        ),
        timeout=30,
        what="custom object create with empty strings",
    )
    assert obj["spec"] == spec
    assert cp.get(f"{base}/g1")["spec"] == spec  # read back from etcd

    # Status subresource and a plain merge patch keep "" too.
    patched = cp.merge_patch(f"{base}/g1/status", {"status": {"foo": "", "bar": ""}})
    assert patched["status"] == {"foo": "", "bar": ""}
    patched = cp.merge_patch(f"{base}/g1", {"spec": {"bar": ""}})
    assert patched["spec"]["bar"] == "" and patched["spec"]["foo"] == ""
    got = cp.get(f"{base}/g1")
    assert got["status"] == {"foo": "", "bar": ""}
    assert got["spec"] == {**spec, "bar": ""}
    # Empty strings in built-in objects as well (ConfigMap data, labels).
    cm = cp.create(
        f"/api/v1/namespaces/{cluster_namespace}/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "e", "labels": {"l": ""}}, "data": {"k": ""}},
    )
    assert cm["data"] == {"k": ""} and cm["metadata"]["labels"] == {"l": ""}


def _gpu_pod(name: str, node_label: str, gpus: int) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubelora.test/node-group": node_label},
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "main",
                    "image": "registry.invalid/none:0",
                    "resources": {"limits": {"gpu.intel.com/i915": str(gpus)}},
                }
            ],
        },
    }


def test_scheduler_binds_gpu_pod_to_fake_node(control_plane: ControlPlane, cluster_namespace: str) -> None:
    cp = control_plane
    group = _uid()
    node = f"fake-gpu-{group}"
    cp.add_fake_node(
        node, {"kubelora.test/node-group": group, "gpu.intel.com/family": "i915"}, {"gpu.intel.com/i915": "2"}
    )
    try:
        got = cp.get(f"/api/v1/nodes/{node}")
        assert got["status"]["allocatable"]["gpu.intel.com/i915"] == "2"
        assert not any(t["key"] == "node.kubernetes.io/not-ready" for t in got["spec"].get("taints") or [])

        pods = f"/api/v1/namespaces/{cluster_namespace}/pods"
        cp.create(pods, _gpu_pod("fits", group, 1))
        cp.create(pods, _gpu_pod("too-big", group, 3))

        bound = cp.wait_for(lambda: cp.get(f"{pods}/fits")["spec"].get("nodeName"), timeout=60, what="pod 'fits' bound")
        assert bound == node

        def unschedulable() -> dict | None:
            pod = cp.get(f"{pods}/too-big")
            for c in (pod.get("status") or {}).get("conditions") or []:
                if c["type"] == "PodScheduled" and c["status"] == "False" and c.get("reason") == "Unschedulable":
                    return pod
            return None

        pod = cp.wait_for(unschedulable, timeout=60, what="pod 'too-big' Unschedulable")
        assert pod["status"]["phase"] == "Pending"
        assert not pod["spec"].get("nodeName")
        msg = next(c["message"] for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
        assert "gpu.intel.com/i915" in msg, msg
    finally:
        cp.force_delete_pods(cluster_namespace)
        cp.delete_node(node)


def test_owner_reference_garbage_collection(control_plane: ControlPlane, cluster_namespace: str) -> None:
    cp = control_plane
    cms = f"/api/v1/namespaces/{cluster_namespace}/configmaps"
    owner = cp.create(cms, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}, "data": {"k": "v"}})
    cp.create(
        cms,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "child",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
                ],
            },
        },
    )
    cp.delete(f"{cms}/owner")

    def child_gone() -> bool:
        try:
            cp.get(f"{cms}/child")
            return False
        except ApiError as e:
            if e.status == 404:
                return True
            raise

    cp.wait_for(child_gone, timeout=60, what="GC of the owned ConfigMap")


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
    v = subprocess.run([str(helm), "version", "--short"], env=env, capture_output=True, text=True, timeout=60)
    assert v.returncode == 0, v.stderr
    assert v.stdout.startswith("v3."), v.stdout
    # helm and kubectl reach the apiserver through the generated kubeconfig.
    ls = subprocess.run([str(helm), "list", "--all-namespaces"], env=env, capture_output=True, text=True, timeout=60)
    assert ls.returncode == 0, ls.stderr
    ns = subprocess.run(
        [str(kubectl), "get", "namespace", "kube-system", "-o", "name"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ns.returncode == 0, ns.stderr
    assert ns.stdout.strip() == "namespace/kube-system"


def test_second_control_plane_side_by_side_and_clean_stop(control_plane: ControlPlane) -> None:
    """Free ports: a second (apiserver-only) control plane starts next to the session one,
    and stop() leaves no process and no temp dir behind."""
    with ControlPlane(controller_manager=False, scheduler=False) as cp:
        assert cp.ports["apiserver"] != control_plane.ports["apiserver"]
        assert cp.ports["etcd"] != control_plane.ports["etcd"]
        assert cp.readyz()
        # Without the controller-manager, ServiceAccount admission is off: pods can be created at once.
        cp.create(
            "/api/v1/namespaces/default/pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "c", "image": "registry.invalid/none:0"}]},
            },
        )
        pids = [p.pid for p in cp.procs.values()]
        workdir = cp.workdir
        rss = cp.rss_mib()
        assert set(rss) == {"etcd", "kube-apiserver"}
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
