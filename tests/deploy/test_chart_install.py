"""The Helm chart installed on the local control plane: install, upgrade and uninstall, after which the
operator's ServiceAccount can do exactly what the operator does (checked by SubjectAccessReviews, by
`kubectl auth can-i --list` as that ServiceAccount, and by running the real operator with its token).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from tests.cluster.controlplane import ApiError, ControlPlane
from tests.cluster.log_checks import denials
from tests.cluster.service_accounts import service_account_kubeconfig, service_account_token

from .deploy_helpers import (
    CHART,
    CLUSTER,
    CLUSTER_PEERING,
    NAMESPACE_OBSERVER,
    NAMESPACED,
    REPO,
    helm,
    kubectl_bin,
    set_args,
)


def _allowed(
    cp: ControlPlane, user_ns: str, sa: str, verb: str, group: str, resource: str, namespace: str | None
) -> bool:
    res, _, sub = resource.partition("/")
    attrs: dict[str, Any] = {"verb": verb, "group": group, "resource": res}
    if sub:
        attrs["subresource"] = sub
    if namespace:
        attrs["namespace"] = namespace
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": f"system:serviceaccount:{user_ns}:{sa}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{user_ns}", "system:authenticated"],
            "resourceAttributes": attrs,
        },
    }
    return bool(cp.create("/apis/authorization.k8s.io/v1/subjectaccessreviews", review)["status"].get("allowed"))


def _can_i_list(cp: ControlPlane, ns: str, sa: str, namespace: str) -> set[tuple[str, str, str]]:
    """`kubectl auth can-i --list` impersonating the ServiceAccount -> (group, resource, verb)."""
    assert cp.workdir is not None
    proc = subprocess.run(
        [kubectl_bin(), "auth", "can-i", "--list", f"--as=system:serviceaccount:{ns}:{sa}", "-n", namespace],
        # HOME: kubectl's discovery cache (~/.kube/cache) goes to the control plane's temp dir.
        env={"KUBECONFIG": str(cp.kubeconfig), "PATH": "/usr/bin:/bin", "HOME": str(cp.workdir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = set()
    for line in proc.stdout.splitlines()[1:]:
        m = re.match(r"^(\S+)\s+(\[.*?\])\s+(\[.*?\])\s+(\[.*?\])\s*$", line)
        if not m or m.group(1).startswith("/"):
            continue  # non-resource URLs
        resource = m.group(1)
        res, _, group = resource.partition(".")
        if "/" in group:  # "lorafinetunes.kubelora.dev/status"
            group, _, sub = group.partition("/")
            res = f"{res}/{sub}"
        for verb in m.group(4).strip("[]").split():
            out.add((group, res, verb))
    return out


#: What every authenticated identity may do anyway (system:basic-user, system:discovery, ...).
BASELINE = {
    ("authorization.k8s.io", "selfsubjectaccessreviews", "create"),
    ("authorization.k8s.io", "selfsubjectrulesreviews", "create"),
}


def _helm_env(cp: ControlPlane, tmp_path: Path) -> dict[str, str]:
    return {
        **cp.env(),
        "HELM_CACHE_HOME": str(tmp_path / "hc"),
        "HELM_CONFIG_HOME": str(tmp_path / "hcfg"),
        "HELM_DATA_HOME": str(tmp_path / "hd"),
    }


class Release(NamedTuple):
    name: str
    namespace: str
    full: str  # the chart's fullname: Deployment, ServiceAccount, ClusterRole, ...
    env: dict[str, str]  # helm's environment (kubeconfig, private cache and config dirs)


@contextlib.contextmanager
def _release(cp: ControlPlane, values: dict[str, Any], tmp_path: Path) -> Iterator[Release]:
    """helm install in a fresh namespace; uninstalls (whatever is left) and deletes the namespace after."""
    ns = f"kl-{uuid.uuid4().hex[:8]}"
    release = f"kl{uuid.uuid4().hex[:6]}"
    cp.create_namespace(ns)
    env = _helm_env(cp, tmp_path)
    try:
        helm("install", release, str(CHART), "-n", ns, *set_args(values), env=env)
        yield Release(release, ns, f"{release}-kubelora", env)
    finally:
        helm("uninstall", release, "-n", ns, env=env, check=False)
        with contextlib.suppress(ApiError):
            cp.delete_namespace(ns)


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_install_upgrade_uninstall(control_plane: ControlPlane, tmp_path: Path) -> None:
    cp = control_plane
    with _release(cp, {}, tmp_path) as rel:
        release, ns, full, env = rel
        # The CRDs are served (the chart's crds/ or an earlier install: helm skips existing CRDs).
        for crd in ("lorafinetunes.kubelora.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
            cp.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}")
        dep = cp.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{full}")
        assert dep["spec"]["replicas"] == 1
        cp.get(f"/api/v1/namespaces/{ns}/serviceaccounts/{full}")
        cp.get(f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{full}")
        cm = cp.get(f"/api/v1/namespaces/{ns}/configmaps/{full}-settings")
        assert yaml.safe_load(cm["data"]["settings.yaml"])["gpuResource"] == "gpu.intel.com/i915"
        # The Deployment's pod passes admission (ServiceAccount, security context) and is created.
        cp.wait_for(
            lambda: [
                p for p in cp.get(f"/api/v1/namespaces/{ns}/pods")["items"] if p["metadata"]["name"].startswith(full)
            ],
            timeout=60,
            what="operator pod created by the Deployment",
        )

        # Upgrade: new settings and two replicas (peering on).
        helm(
            "upgrade",
            release,
            str(CHART),
            "-n",
            ns,
            *set_args({"replicaCount": 2, "settings": {"gpuResource": "gpu.intel.com/xe"}}),
            env=env,
        )
        cm = cp.get(f"/api/v1/namespaces/{ns}/configmaps/{full}-settings")
        assert yaml.safe_load(cm["data"]["settings.yaml"])["gpuResource"] == "gpu.intel.com/xe"
        dep = cp.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{full}")
        assert dep["spec"]["replicas"] == 2
        assert f"--peering={full}" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
        cp.get(f"/apis/kopf.dev/v1/clusterkopfpeerings/{full}")
        status = helm("status", release, "-n", ns, "-o", "json", env=env)
        assert json.loads(status.stdout)["version"] == 2

        helm("uninstall", release, "-n", ns, env=env)
        for path in (
            f"/apis/apps/v1/namespaces/{ns}/deployments/{full}",
            f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{full}",
            f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{full}-cluster",
            f"/apis/kopf.dev/v1/clusterkopfpeerings/{full}",
        ):
            with pytest.raises(ApiError) as err:
                cp.get(path)
            assert err.value.status == 404
        # CRDs stay (Helm never deletes crds/): LoRAFineTunes survive an uninstall.
        cp.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/lorafinetunes.kubelora.dev")


#: Cluster-wide mode, peering on: (verb, group, resource, where: "other" = a namespace, None = cluster).
CLUSTER_WIDE_DENIED = [
    ("delete", "", "nodes", None),
    ("get", "", "nodes", None),
    ("create", "", "pods/exec", "other"),
    ("get", "", "pods/log", "other"),
    ("update", "", "pods", "other"),
    ("list", "", "secrets", "other"),
    ("delete", "", "secrets", "other"),
    ("delete", "", "services", "other"),
    ("create", "apps", "deployments", "other"),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings", None),
    ("delete", "apiextensions.k8s.io", "customresourcedefinitions", None),
    ("create", "kubelora.dev", "lorafinetunes", "other"),
]


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_cluster_wide_service_account_rights(control_plane: ControlPlane, tmp_path: Path) -> None:
    cp = control_plane
    other = f"kl-other-{uuid.uuid4().hex[:6]}"
    cp.create_namespace(other, wait_service_account=False)
    try:
        with _release(cp, {"replicaCount": 2}, tmp_path) as rel:
            ns, sa = rel.namespace, rel.full
            for group, resource, verb in sorted(NAMESPACED):
                assert _allowed(cp, ns, sa, verb, group, resource, other), (verb, group, resource)
            for group, resource, verb in sorted(CLUSTER | CLUSTER_PEERING):
                assert _allowed(cp, ns, sa, verb, group, resource, None), (verb, group, resource)
            for verb, group, resource, where in CLUSTER_WIDE_DENIED:
                where = other if where == "other" else None
                assert not _allowed(cp, ns, sa, verb, group, resource, where), (verb, group, resource, where)
            granted = _can_i_list(cp, ns, sa, other) - BASELINE
            expected = NAMESPACED | CLUSTER | CLUSTER_PEERING
            assert granted == expected, f"extra: {granted - expected}; missing: {expected - granted}"
    finally:
        with contextlib.suppress(ApiError):
            cp.delete_namespace(other)


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_namespaced_service_account_runs_the_operator(control_plane: ControlPlane, tmp_path: Path) -> None:
    """Namespaced mode: exactly the expected rights in the watched namespace, none in others, and the real
    operator, authenticated with the chart's ServiceAccount token, runs a resource from validation to
    worker pods (mpirun: Secret creation too) without a single 403."""
    cp = control_plane
    watched = f"kl-w-{uuid.uuid4().hex[:6]}"
    other = f"kl-o-{uuid.uuid4().hex[:6]}"
    cp.create_namespace(watched)
    cp.create_namespace(other, wait_service_account=False)
    proc: subprocess.Popen[bytes] | None = None
    try:
        with _release(cp, {"watchNamespaces": [watched]}, tmp_path) as rel:
            ns, sa = rel.namespace, rel.full
            for group, resource, verb in sorted(NAMESPACED):
                assert _allowed(cp, ns, sa, verb, group, resource, watched), (verb, group, resource)
                assert not _allowed(cp, ns, sa, verb, group, resource, other), (verb, group, resource, other)
            for group, resource, verb in sorted(CLUSTER | NAMESPACE_OBSERVER):
                assert _allowed(cp, ns, sa, verb, group, resource, None), (verb, group, resource)
            assert not _allowed(cp, ns, sa, "get", "", "secrets", other)
            assert not _allowed(cp, ns, sa, "get", "", "secrets", ns)  # not even its own namespace
            assert not _allowed(cp, ns, sa, "list", "kubelora.dev", "lorafinetunes", None)  # no cluster-wide list
            assert not _allowed(cp, ns, sa, "create", "", "pods/exec", watched)
            assert _can_i_list(cp, ns, sa, watched) - BASELINE == NAMESPACED | CLUSTER | NAMESPACE_OBSERVER
            assert _can_i_list(cp, ns, sa, other) - BASELINE == CLUSTER | NAMESPACE_OBSERVER

            # The real operator with the ServiceAccount's token.
            token = service_account_token(cp, ns, sa)
            kubeconfig = service_account_kubeconfig(cp, token, ns, tmp_path / "sa-kubeconfig")
            # Real impersonated calls: allowed and refused.
            kubectl = [kubectl_bin(), f"--kubeconfig={kubeconfig}", f"--cache-dir={tmp_path / 'kube-cache'}"]
            ok = subprocess.run([*kubectl, "get", "nodes", "-o", "name"], capture_output=True, text=True, timeout=60)
            assert ok.returncode == 0, ok.stderr
            denied = subprocess.run(
                [*kubectl, "-n", other, "get", "secrets"], capture_output=True, text=True, timeout=60
            )
            assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

            pool = uuid.uuid4().hex[:6]
            for i in range(2):
                cp.add_fake_node(
                    f"gpu-{pool}-{i}",
                    {"intel.feature.node.kubernetes.io/gpu": "true", "kubelora-test/pool": pool},
                    {"gpu.intel.com/i915": "2"},
                )
            log_path = tmp_path / "operator.log"
            env = {
                "PATH": "/usr/bin:/bin:" + str(Path(sys.executable).parent),
                "KUBECONFIG": str(kubeconfig),
                "KUBELORA_RESYNC_SECONDS": "1",
                "PYTHONUNBUFFERED": "1",
                "NO_PROXY": "*",
                "HOME": str(tmp_path),
            }
            settings_cm = cp.get(f"/api/v1/namespaces/{ns}/configmaps/{sa}-settings")
            (tmp_path / "settings.yaml").write_text(settings_cm["data"]["settings.yaml"])
            env["KUBELORA_SETTINGS_FILE"] = str(tmp_path / "settings.yaml")
            deployment = cp.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{sa}")
            chart_args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
            chart_args = [a for a in chart_args if not a.startswith("--liveness")]
            with log_path.open("wb") as fh:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "kubelora_operator", "run", *chart_args, "--verbose"],
                    env=env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                    start_new_session=True,
                )
            name = f"rbac-{pool}"
            lft = {
                "apiVersion": "kubelora.dev/v1alpha1",
                "kind": "LoRAFineTune",
                "metadata": {"name": name},
                "spec": {
                    "data": {"path": "sample://train.jsonl"},
                    "training": {"maxSteps": 5},
                    "device": "xpu",
                    "workers": 2,
                    "resources": {"gpus": 1, "cpu": "2", "memory": "4Gi"},
                    "placement": {"nodeSelector": {"kubelora-test/pool": pool}},
                    "distributed": {"launcher": "mpirun", "backend": "ccl"},
                    "output": {"s3": {"uri": "s3://bucket/rbac", "credentialsSecret": {"name": "s3-creds"}}},
                },
            }
            cp.create(
                f"/api/v1/namespaces/{watched}/secrets",
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "s3-creds"},
                    "stringData": {"AWS_ACCESS_KEY_ID": "placeholder", "AWS_SECRET_ACCESS_KEY": "placeholder"},
                },
            )
            cp.create(f"/apis/kubelora.dev/v1alpha1/namespaces/{watched}/lorafinetunes", lft)

            def pods_bound() -> list[dict[str, Any]] | None:
                assert proc is not None and proc.poll() is None, log_path.read_text()[-4000:]
                pods = cp.get(
                    f"/api/v1/namespaces/{watched}/pods", params={"labelSelector": f"kubelora.dev/name={name}"}
                )["items"]
                return pods if len(pods) == 2 and all(p["spec"].get("nodeName") for p in pods) else None

            cp.wait_for(pods_bound, timeout=90, what="worker pods created by the restricted operator")
            assert cp.get(f"/api/v1/namespaces/{watched}/secrets/{name}-ssh")["type"] == "kubernetes.io/ssh-auth"
            cp.get(f"/api/v1/namespaces/{watched}/configmaps/{name}-config")
            cp.get(f"/api/v1/namespaces/{watched}/services/{name}-workers")

            def scheduled() -> bool:
                obj = cp.get(f"/apis/kubelora.dev/v1alpha1/namespaces/{watched}/lorafinetunes/{name}")
                conds = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}
                return conds.get("Scheduled", {}).get("status") == "True"

            cp.wait_for(scheduled, timeout=60, what="status patched by the restricted operator")
            evs = cp.get(f"/api/v1/namespaces/{watched}/events")["items"]
            assert any(e["involvedObject"].get("name") == name and e["reason"] == "PodsCreated" for e in evs)
            time.sleep(1)
            log = log_path.read_text(errors="replace")
            refused = denials(log)
            assert not refused, "\n".join(refused[:10])
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for n in (watched, other):
            with contextlib.suppress(ApiError):
                for obj in cp.get(f"/apis/kubelora.dev/v1alpha1/namespaces/{n}/lorafinetunes")["items"]:
                    cp.merge_patch(
                        f"/apis/kubelora.dev/v1alpha1/namespaces/{n}/lorafinetunes/{obj['metadata']['name']}",
                        {"metadata": {"finalizers": None}},
                    )
            with contextlib.suppress(ApiError):
                cp.delete_namespace(n)
        with contextlib.suppress(ApiError, NameError):
            for i in range(2):
                cp.delete(f"/api/v1/nodes/gpu-{pool}-{i}")
