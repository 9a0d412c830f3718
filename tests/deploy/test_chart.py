"""The Helm chart (charts/kubelora) with the real helm 3.17.2: lint, rendering, the closed values
schema, and install/upgrade/uninstall against the local control plane, after which the operator's
ServiceAccount can do exactly what the operator does (checked by SubjectAccessReviews, by
`kubectl auth can-i --list` as that ServiceAccount, and by running the real operator with its token).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubelora_operator.settings import OperatorSettings, load_settings
from pydantic.alias_generators import to_camel

from tests.cluster.controlplane import ApiError, ControlPlane
from tests.cluster.log_checks import denials

from .deploy_helpers import CHART, CRD_FILE, REPO, find, helm, kubectl_bin, one, render, rule_set

FULL = "rel-kubelora"

# --------------------------------------------------------------------------- what the operator calls
# Derived from operator/kubelora_operator/kube.py (every REST call) and controller/ (which of them run),
# plus kopf's own needs (watching LoRAFineTunes and worker pods, its finalizer/annotation patches, CRD
# observation, peering). (apiGroup, resource, verb).
NAMESPACED = {
    ("kubelora.dev", "lorafinetunes", "get"),  # Kube.get_lft
    ("kubelora.dev", "lorafinetunes", "list"),  # kopf watch-stream (initial list)
    ("kubelora.dev", "lorafinetunes", "watch"),  # kopf watch-stream
    ("kubelora.dev", "lorafinetunes", "patch"),  # kopf finalizer/annotations, Kube.patch_lft_annotations
    ("kubelora.dev", "lorafinetunes", "delete"),  # Kube.delete_lft (ttlSecondsAfterFinished)
    ("kubelora.dev", "lorafinetunes/status", "patch"),  # Kube.patch_lft_status
    ("kubelora.dev", "lorafinetunes/finalizers", "update"),  # blockOwnerDeletion owner references
    ("", "pods", "get"),  # Kube.get_pod (progress scrape)
    ("", "pods", "list"),  # Kube.list_pods, kopf on.event
    ("", "pods", "watch"),  # kopf on.event (worker pods)
    ("", "pods", "create"),  # Kube.create_if_absent(pod)
    ("", "pods", "delete"),  # Kube.delete_pod
    ("", "services", "create"),  # headless Service
    ("", "configmaps", "get"),  # Kube.read_config_map (dataVolume.configMap reference)
    ("", "configmaps", "create"),  # trainer config
    ("", "secrets", "get"),  # Kube.read_secret (references, ssh secret presence)
    ("", "secrets", "create"),  # mpirun `<name>-ssh`
    ("", "persistentvolumeclaims", "get"),  # Kube.read_pvc
    ("", "events", "create"),  # Kube.post_event
}
CLUSTER = {
    ("", "nodes", "list"),  # Kube.list_nodes (placement)
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),  # kopf resource observer
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}
#: Namespaced mode only: kopf's namespace observer (cluster-wide mode watches everything anyway).
NAMESPACE_OBSERVER = {("", "namespaces", "list"), ("", "namespaces", "watch")}
PEERING_VERBS = ("get", "list", "watch", "patch")


def _deployment(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "Deployment", FULL)


def _container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = _deployment(objs)["spec"]["template"]["spec"]["containers"]
    return c


def _settings_file(objs: list[dict[str, Any]], tmp_path: Path) -> OperatorSettings:
    cm = one(objs, "ConfigMap", f"{FULL}-settings")
    path = tmp_path / "settings.yaml"
    path.write_text(cm["data"]["settings.yaml"])
    return load_settings(environ={}, path=path)


# --------------------------------------------------------------------------- static checks


def test_chart_crd_is_the_repository_crd() -> None:
    """One CRD file: the chart's (Helm packages only what is inside the chart); crds/ links to it."""
    assert CRD_FILE.is_symlink(), "crds/lorafinetunes.kubelora.dev.yaml must stay a link into the chart"
    assert CRD_FILE.resolve() == (CHART / "crds" / CRD_FILE.name).resolve()


def test_chart_ships_kopf_peering_crds() -> None:
    docs = list(yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text()))
    names = {d["metadata"]["name"]: d for d in docs}
    assert set(names) == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    assert names["clusterkopfpeerings.kopf.dev"]["spec"]["scope"] == "Cluster"
    assert names["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"
    for d in docs:
        assert d["spec"]["group"] == "kopf.dev"
        assert [v["name"] for v in d["spec"]["versions"]] == ["v1"]


@pytest.mark.parametrize(
    "values",
    [{}, {"watchNamespaces": ["team-a", "team-b"], "replicaCount": 2}, {"replicaCount": 3}],
    ids=["default", "namespaced-peering", "clusterwide-peering"],
)
def test_helm_lint(values: dict[str, Any]) -> None:
    from .deploy_helpers import set_args

    helm("lint", str(CHART), *set_args(values))
    out = helm("lint", "--strict", str(CHART), *set_args(values))
    assert "0 chart(s) failed" in out.stdout


def _key_lines(text: str) -> list[tuple[int, int, str, bool]]:
    """(line number, indent, key, documented) for every mapping key of values.yaml."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z_][A-Za-z0-9_]*):", line)
        if not m:
            continue
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        documented = j >= 0 and lines[j].strip().startswith("#")
        out.append((i, len(m.group(1)), m.group(2), documented))
    return out


def test_every_value_is_documented() -> None:
    """Each key has a comment right above it, or is a section whose keys all do (values of a documented
    key, e.g. the entries of settings.cclEnv, are covered by its comment)."""
    keys = _key_lines((CHART / "values.yaml").read_text())
    undocumented = []
    covered_until_indent: int | None = None
    for idx, (lineno, indent, key, documented) in enumerate(keys):
        if covered_until_indent is not None and indent > covered_until_indent:
            continue
        covered_until_indent = None
        if documented:
            covered_until_indent = indent
            continue
        children = [k for k in keys[idx + 1 :] if k[1] > indent]
        nxt = keys[idx + 1 : idx + 1 + len(children)]
        # A bare section: fine only when it has children (each checked in turn).
        if not nxt or nxt[0][1] <= indent:
            undocumented.append(f"line {lineno + 1}: {key}")
    assert not undocumented, f"values without a comment: {undocumented}"


def _walk_schema(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            yield path, node
        for key, sub in (node.get("properties") or {}).items():
            yield from _walk_schema(sub, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                yield from _walk_schema(node[key], f"{path}.{key}")
        for sub in node.get("oneOf", []) + node.get("anyOf", []):
            yield from _walk_schema(sub, path)


#: Kubernetes pass-through objects left open on purpose (their full schemas are the API server's job).
OPEN_PASS_THROUGH = {
    ".podSecurityContext.seLinuxOptions",
    ".podSecurityContext.sysctls.items",
    ".securityContext.seLinuxOptions",
    ".affinity.nodeAffinity",
    ".affinity.podAffinity",
    ".affinity.podAntiAffinity",
    ".extraEnv.items.valueFrom",
}


def test_values_schema_is_closed() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    problems = []
    for path, node in _walk_schema(schema):
        if "properties" in node:
            if node.get("additionalProperties") is not False:
                problems.append(f"{path or '<root>'}: additionalProperties must be false")
        elif not isinstance(node.get("additionalProperties"), dict) and path not in OPEN_PASS_THROUGH:
            problems.append(f"{path}: open object")
    assert not problems, problems
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"])


def test_settings_values_mirror_the_operator_settings(tmp_path: Path) -> None:
    """values.settings and its schema hold every OperatorSettings field (but peeringName: the chart passes
    --peering), and the chart's defaults are the operator's defaults."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["settings"]["properties"]
    fields = {to_camel(n) for n in OperatorSettings.model_fields} - {"peeringName"}
    values = yaml.safe_load((CHART / "values.yaml").read_text())["settings"]
    assert set(schema) == fields
    assert set(values) == fields
    assert _settings_file(render(), tmp_path) == OperatorSettings()


@pytest.mark.parametrize(
    "bad",
    [
        {"settings": {"gpuResourse": "gpu.intel.com/xe"}},
        {"replicaCout": 2},
        {"health": {"livenessProbe": {"periodSecond": 5}}},
        {"securityContext": {"readOnlyRootFileSystem": True}},
        {"settings": {"imagePullPolicy": "Sometimes"}},
        {"watchNamespaces": ["Not_A_Namespace"]},
        {"settings": {"masterPort": "29500"}},
        {"settings": {"imagePullSecrets": [{"name": "regcred"}]}},
    ],
    ids=[
        "settings-typo", "top-typo", "nested-typo", "securitycontext-typo", "enum", "namespace", "type",
        "pull-secret-names",
    ],
)
def test_invalid_values_fail(bad: dict[str, Any]) -> None:
    from .deploy_helpers import set_args

    proc = helm("template", "rel", str(CHART), *set_args(bad), check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- rendering


def test_cluster_wide_rbac() -> None:
    objs = render()
    assert not find(objs, "Role") and not find(objs, "RoleBinding")
    cluster_role = one(objs, "ClusterRole", f"{FULL}-cluster")
    assert rule_set(cluster_role["rules"]) == CLUSTER
    ns_role = one(objs, "ClusterRole", FULL)
    assert rule_set(ns_role["rules"]) == NAMESPACED
    for name in (FULL, f"{FULL}-cluster"):
        binding = one(objs, "ClusterRoleBinding", name)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULL, "namespace": "kubelora-system"}]
    assert "--namespace" not in " ".join(_container(objs)["args"])


def test_namespaced_rbac() -> None:
    objs = render({"watchNamespaces": ["team-a", "team-b"]})
    assert not find(objs, "ClusterRole", FULL) and not find(objs, "ClusterRoleBinding", FULL)
    assert rule_set(one(objs, "ClusterRole", f"{FULL}-cluster")["rules"]) == CLUSTER | NAMESPACE_OBSERVER
    for ns in ("team-a", "team-b"):
        assert rule_set(one(objs, "Role", FULL, ns)["rules"]) == NAMESPACED
        binding = one(objs, "RoleBinding", FULL, ns)
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == "kubelora-system"
    assert not find(objs, "Role", namespace="kubelora-system")
    args = _container(objs)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


@pytest.mark.parametrize(
    "values",
    [{}, {"watchNamespaces": ["team-a"]}, {"replicaCount": 2}, {"replicaCount": 2, "watchNamespaces": ["team-a"]}],
    ids=["clusterwide", "namespaced", "clusterwide-peering", "namespaced-peering"],
)
def test_rules_match_the_operator_rbac_module(values: dict[str, Any]) -> None:
    """The chart grants what kubelora_operator.rbac (checked by tests/operator/test_integration_rbac.py)
    lists, in both modes (the chart reads the rules from a file generated from that module)."""
    from kubelora_operator import rbac

    namespaces = values.get("watchNamespaces", [])
    expected = {
        o["metadata"]["name"].removeprefix("kubelora-operator"): rule_set(o["rules"])
        for o in rbac.manifests("sa", "ns", namespaces, peering="replicaCount" in values)
        if o["kind"] == "ClusterRole"
    }
    objs = render(values)
    assert rule_set(one(objs, "ClusterRole", f"{FULL}-cluster")["rules"]) == expected["-cluster"]
    if namespaces:
        assert rule_set(one(objs, "Role", FULL, namespaces[0])["rules"]) == expected[""]
    else:
        assert rule_set(one(objs, "ClusterRole", FULL)["rules"]) == expected[""]


def test_no_wildcards_and_no_dangerous_rights() -> None:
    for values in ({}, {"watchNamespaces": ["a"], "replicaCount": 2}, {"replicaCount": 2}):
        rules = [r for o in render(values) if o["kind"] in ("Role", "ClusterRole") for r in o["rules"]]
        flat = rule_set(rules)
        assert not any("*" in part for t in flat for part in t)
        for forbidden in [
            ("", "pods/exec", "create"),
            ("", "pods", "update"),
            ("", "secrets", "list"),
            ("", "secrets", "watch"),
            ("", "nodes", "delete"),
            ("", "nodes", "patch"),
            ("rbac.authorization.k8s.io", "roles", "create"),
            ("apiextensions.k8s.io", "customresourcedefinitions", "create"),
        ]:
            assert forbidden not in flat


def test_single_replica_is_standalone() -> None:
    objs = render()
    dep = _deployment(objs)
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert "--standalone" in _container(objs)["args"]
    assert not any(a.startswith("--peering") for a in _container(objs)["args"])
    assert not find(objs, "ClusterKopfPeering") and not find(objs, "KopfPeering")


def test_replicas_enable_cluster_peering() -> None:
    objs = render({"replicaCount": 2})
    dep = _deployment(objs)
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    args = _container(objs)["args"]
    assert "--peering=rel-kubelora" in args and "--standalone" not in args
    assert one(objs, "ClusterKopfPeering", "rel-kubelora")["apiVersion"] == "kopf.dev/v1"
    rules = rule_set(one(objs, "ClusterRole", f"{FULL}-cluster")["rules"])
    assert rules == CLUSTER | {("kopf.dev", "clusterkopfpeerings", v) for v in PEERING_VERBS}


def test_replicas_enable_namespaced_peering() -> None:
    objs = render({"replicaCount": 2, "watchNamespaces": ["team-a", "team-b"], "peering": {"name": "lora"}})
    assert "--peering=lora" in _container(objs)["args"]
    assert {o["metadata"]["namespace"] for o in find(objs, "KopfPeering", "lora")} == {"team-a", "team-b"}
    assert not find(objs, "ClusterKopfPeering")
    for ns in ("team-a", "team-b"):
        rules = rule_set(one(objs, "Role", FULL, ns)["rules"])
        assert rules == NAMESPACED | {("kopf.dev", "kopfpeerings", v) for v in PEERING_VERBS}
    assert rule_set(one(objs, "ClusterRole", f"{FULL}-cluster")["rules"]) == CLUSTER | NAMESPACE_OBSERVER


def test_peering_can_be_forced_with_one_replica() -> None:
    objs = render({"peering": {"enabled": True}})
    assert "--peering=rel-kubelora" in _container(objs)["args"]
    assert find(objs, "ClusterKopfPeering")


def test_settings_rendered_into_the_operator_settings_file(tmp_path: Path) -> None:
    default = render()
    values = {
        "settings": {
            "gpuResource": "gpu.intel.com/xe",
            "gpuNodeLabel": "intel.feature.node.kubernetes.io/gpu=true",
            "gpuSupplementalGroups": [109],
            "amxNodeLabel": "feature.node.kubernetes.io/cpu-cpuid.AMXTILE",
            "cpuImage": "registry.example/kubelora/trainer-cpu:1.2.3",
            "xpuImage": "registry.example/kubelora/trainer-xpu:1.2.3",
            "cclEnv": {"CCL_ATL_TRANSPORT": "ofi", "FI_PROVIDER": "psm3"},
            "shmSizeLimit": "8Gi",
            "resyncSeconds": 15,
            "imagePullSecrets": ["regcred"],
        }
    }
    objs = render(values)
    settings = _settings_file(objs, tmp_path)
    assert settings.gpu_resource == "gpu.intel.com/xe"
    assert settings.gpu_node_label == "intel.feature.node.kubernetes.io/gpu=true"
    assert settings.gpu_supplemental_groups == [109]
    assert settings.amx_node_label == "feature.node.kubernetes.io/cpu-cpuid.AMXTILE"
    assert settings.image_for("cpu") == "registry.example/kubelora/trainer-cpu:1.2.3"
    assert settings.image_for("xpu") == "registry.example/kubelora/trainer-xpu:1.2.3"
    # Helm merges maps: one oneCCL key changes, the other defaults stay.
    assert settings.ccl_env["FI_PROVIDER"] == "psm3" and settings.ccl_env["CCL_WORKER_COUNT"] == "1"
    assert settings.shm_size_limit == "8Gi" and settings.resync_seconds == 15
    assert settings.image_pull_secrets == ["regcred"]
    assert settings.master_port == 29500  # untouched keys keep the defaults
    # The operator reads it from the mounted ConfigMap; a change rolls the pods.
    c = _container(objs)
    env = {e["name"]: e.get("value") for e in c["env"]}
    mount = next(m for m in c["volumeMounts"] if m["name"] == "settings")
    assert env["KUBELORA_SETTINGS_FILE"] == mount["mountPath"] + "/settings.yaml"
    cm_volume = next(v for v in _deployment(objs)["spec"]["template"]["spec"]["volumes"] if v["name"] == "settings")
    assert cm_volume["configMap"]["name"] == f"{FULL}-settings"
    ann = lambda o: _deployment(o)["spec"]["template"]["metadata"]["annotations"]["checksum/settings"]  # noqa: E731
    assert ann(objs) != ann(default)


def test_pod_spec_is_podsecurity_restricted() -> None:
    pod = _deployment(render())["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 65532
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc.get("privileged") is False
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    for v in pod["volumes"]:
        assert set(v) & {"configMap", "emptyDir", "secret", "projected"}, v  # restricted volume types only
    assert not any("hostPort" in p for p in c["ports"])
    # Writable scratch under the read-only root (ssh-keygen for mpirun key pairs).
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
    assert pod["automountServiceAccountToken"] is True


def test_probes_hit_kopf_liveness_endpoint() -> None:
    c = _container(
        render(
            {
                "health": {
                    "port": 9090,
                    "livenessProbe": {
                        "initialDelaySeconds": 1,
                        "periodSeconds": 5,
                        "timeoutSeconds": 2,
                        "failureThreshold": 2,
                    },
                }
            }
        )
    )
    assert "--liveness=http://0.0.0.0:9090/healthz" in c["args"]
    assert c["ports"] == [{"name": "health", "containerPort": 9090, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["livenessProbe"]["periodSeconds"] == 5
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_image_tag_digest_and_pull_secrets() -> None:
    assert _container(render())["image"] == "kubelora/operator:0.1.0"
    assert _container(render({"image": {"repository": "r.example/op", "tag": "9.9"}}))["image"] == "r.example/op:9.9"
    digest = "sha256:" + "a" * 64
    assert (
        _container(render({"image": {"repository": "r.example/op", "digest": digest}}))["image"]
        == f"r.example/op@{digest}"
    )
    pod = _deployment(render({"imagePullSecrets": [{"name": "regcred"}]}))["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]


def test_scheduling_and_resources_rendered() -> None:
    values = {
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
        "priorityClassName": "system-cluster-critical",
    }
    objs = render(values)
    pod = _deployment(objs)["spec"]["template"]["spec"]
    assert _container(objs)["resources"] == values["resources"]
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["affinity"] == values["affinity"]
    assert pod["priorityClassName"] == "system-cluster-critical"


def test_service_and_service_monitor() -> None:
    objs = render()
    svc = one(objs, "Service", FULL)
    assert svc["spec"]["ports"][0]["targetPort"] == "health"
    assert svc["spec"]["selector"] == _deployment(objs)["spec"]["selector"]["matchLabels"]
    assert not find(objs, "ServiceMonitor")
    assert not find(render({"metrics": {"service": {"enabled": False}}}), "Service")
    objs = render(
        {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}, "watchNamespaces": ["a"]}
    )
    sm = one(objs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["a"]}
    # It selects the workers' headless Services as the operator labels them (plan.common_labels).
    from kubelora_operator.plan import common_labels

    labels = common_labels("x")
    assert all(labels[k] == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    # Only rank 0 serves metrics: the relabeling keeps the pod with the operator's worker-index label 0.
    from kubelora_operator.plan import LABEL_WORKER_INDEX

    (keep,) = sm["spec"]["endpoints"][0]["relabelings"]
    meta_label = "__meta_kubernetes_pod_label_" + "".join(c if c.isalnum() else "_" for c in LABEL_WORKER_INDEX)
    assert (keep["sourceLabels"], keep["regex"], keep["action"]) == ([meta_label], "0", "keep")
    assert one(render({"metrics": {"serviceMonitor": {"enabled": True}}}), "ServiceMonitor")["spec"][
        "namespaceSelector"
    ] == {"any": True}


def test_extra_env_and_verbose() -> None:
    c = _container(render({"extraEnv": [{"name": "KUBELORA_RESYNC_SECONDS", "value": "5"}], "verbose": True}))
    assert {"name": "KUBELORA_RESYNC_SECONDS", "value": "5"} in c["env"]
    assert "--verbose" in c["args"]


def test_chart_args_parse_with_the_operator_cli() -> None:
    """The rendered flags are accepted by `python -m kubelora_operator run` (the image's entrypoint)."""
    from kubelora_operator.__main__ import build_parser

    for values in ({}, {"replicaCount": 2, "watchNamespaces": ["a", "b"], "verbose": True}):
        args = build_parser().parse_args(["run", *_container(render(values))["args"]])
        assert args.liveness.endswith("/healthz")
        assert args.standalone == (values == {})
        assert args.namespace == values.get("watchNamespaces", [])


# --------------------------------------------------------------------------- against the control plane


def _sa_token(cp: ControlPlane, ns: str, sa: str) -> str:
    obj = cp.wait_for(
        lambda: (s := cp.get(f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}")).get("secrets") and s,
        timeout=60,
        what=f"token of service account {ns}/{sa}",
    )
    secret = cp.get(f"/api/v1/namespaces/{ns}/secrets/{obj['secrets'][0]['name']}")
    return base64.b64decode(secret["data"]["token"]).decode()


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


@contextlib.contextmanager
def _release(cp: ControlPlane, values: dict[str, Any], tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """helm install in a fresh namespace; yields (release, namespace, ServiceAccount); uninstalls after."""
    from .deploy_helpers import set_args

    ns = f"kl-{uuid.uuid4().hex[:8]}"
    release = f"kl{uuid.uuid4().hex[:6]}"
    cp.create_namespace(ns)
    env = {
        **cp.env(),
        "HELM_CACHE_HOME": str(tmp_path / "hc"),
        "HELM_CONFIG_HOME": str(tmp_path / "hcfg"),
        "HELM_DATA_HOME": str(tmp_path / "hd"),
    }
    try:
        helm("install", release, str(CHART), "-n", ns, *set_args(values), env=env)
        yield release, ns, f"{release}-kubelora"
    finally:
        helm("uninstall", release, "-n", ns, env=env, check=False)
        with contextlib.suppress(ApiError):
            cp.delete_namespace(ns)


def _helm_env(cp: ControlPlane, tmp_path: Path) -> dict[str, str]:
    return {
        **cp.env(),
        "HELM_CACHE_HOME": str(tmp_path / "hc"),
        "HELM_CONFIG_HOME": str(tmp_path / "hcfg"),
        "HELM_DATA_HOME": str(tmp_path / "hd"),
    }


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_install_upgrade_uninstall(control_plane: ControlPlane, tmp_path: Path) -> None:
    from .deploy_helpers import set_args

    cp = control_plane
    env = _helm_env(cp, tmp_path)
    ns = f"kl-{uuid.uuid4().hex[:8]}"
    release = f"kl{uuid.uuid4().hex[:6]}"
    full = f"{release}-kubelora"
    cp.create_namespace(ns)
    try:
        helm("install", release, str(CHART), "-n", ns, env=env)
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
    finally:
        helm("uninstall", release, "-n", ns, env=env, check=False)
        with contextlib.suppress(ApiError):
            cp.delete_namespace(ns)


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_cluster_wide_service_account_rights(control_plane: ControlPlane, tmp_path: Path) -> None:
    cp = control_plane
    other = f"kl-other-{uuid.uuid4().hex[:6]}"
    cp.create_namespace(other, wait_service_account=False)
    try:
        with _release(cp, {"replicaCount": 2}, tmp_path) as (_release_name, ns, sa):
            for group, resource, verb in sorted(NAMESPACED):
                assert _allowed(cp, ns, sa, verb, group, resource, other), (verb, group, resource)
            for group, resource, verb in sorted(
                CLUSTER | {("kopf.dev", "clusterkopfpeerings", v) for v in PEERING_VERBS}
            ):
                assert _allowed(cp, ns, sa, verb, group, resource, None), (verb, group, resource)
            for verb, group, resource, where in [
                ("delete", "", "nodes", None),
                ("get", "", "nodes", None),
                ("create", "", "pods/exec", other),
                ("get", "", "pods/log", other),
                ("update", "", "pods", other),
                ("list", "", "secrets", other),
                ("delete", "", "secrets", other),
                ("delete", "", "services", other),
                ("create", "apps", "deployments", other),
                ("create", "rbac.authorization.k8s.io", "clusterrolebindings", None),
                ("delete", "apiextensions.k8s.io", "customresourcedefinitions", None),
                ("create", "kubelora.dev", "lorafinetunes", other),
            ]:
                assert not _allowed(cp, ns, sa, verb, group, resource, where), (verb, group, resource, where)
            granted = _can_i_list(cp, ns, sa, other) - BASELINE
            expected = NAMESPACED | CLUSTER | {("kopf.dev", "clusterkopfpeerings", v) for v in PEERING_VERBS}
            assert granted == expected, f"extra: {granted - expected}; missing: {expected - granted}"
    finally:
        with contextlib.suppress(ApiError):
            cp.delete_namespace(other)


def _sa_kubeconfig(cp: ControlPlane, token: str, ns: str, path: Path) -> Path:
    assert cp.ca_file is not None
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": cp.server,
                            "certificate-authority-data": base64.b64encode(cp.ca_file.read_bytes()).decode(),
                        },
                    }
                ],
                "users": [{"name": "sa", "user": {"token": token}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "sa", "namespace": ns}}],
                "current-context": "c",
            }
        )
    )
    return path


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
        with _release(cp, {"watchNamespaces": [watched]}, tmp_path) as (_rel, ns, sa):
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
            token = _sa_token(cp, ns, sa)
            kubeconfig = _sa_kubeconfig(cp, token, ns, tmp_path / "sa-kubeconfig")
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


def test_generated_chart_files_are_current() -> None:
    """values.schema.json's settings and rbac-rules.yaml are what chart_sync writes from settings.py and
    rbac.py: a field or rule changed there without `python -m kubelora_operator.chart_sync` fails here."""
    from kubelora_operator import chart_sync

    assert chart_sync.main(["--check", "--chart", str(CHART)]) == 0
