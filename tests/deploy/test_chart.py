"""The Helm chart rendered with the real helm 3.17.2 (`helm template`), table-driven: each row is
(values, where in the rendered objects, what must be there), so a template change shows up as the rows
it breaks; `helm template` runs once per distinct set of values. Static checks of the chart:
test_chart_values.py; install, upgrade and the installed ServiceAccount's rights: test_chart_install.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubelora_operator.settings import OperatorSettings

from .deploy_helpers import (
    CLUSTER,
    CLUSTER_PEERING,
    FULL,
    NAMESPACE_OBSERVER,
    NAMESPACED,
    NAMESPACED_PEERING,
    at,
    container,
    deployment,
    find,
    one,
    pod_spec,
    rendered,
    rule_set,
    settings_file,
)

# --------------------------------------------------------------------------- values the tables use
NS2 = {"watchNamespaces": ["team-a", "team-b"]}
PEERED = {"replicaCount": 2}
NS2_PEERED = {"replicaCount": 2, "watchNamespaces": ["team-a", "team-b"], "peering": {"name": "lora"}}
FORCED_PEERING = {"peering": {"enabled": True}}
HEALTH = {
    "health": {
        "port": 9090,
        "livenessProbe": {"initialDelaySeconds": 1, "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 2},
    }
}
SCHEDULING = {
    "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
    "priorityClassName": "system-cluster-critical",
}
DIGEST = "sha256:" + "a" * 64
MONITOR = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}, "watchNamespaces": ["a"]}
EXTRA = {"extraEnv": [{"name": "KUBELORA_RESYNC_SECONDS", "value": "5"}], "verbose": True}
SA_SUBJECT = [{"kind": "ServiceAccount", "name": FULL, "namespace": "kubelora-system"}]


P = pytest.param
#: (values, where (see `at`), the rendered value there)
RENDERED = [
    # One replica: kopf standalone, no overlap between an old and a new pod.
    P({}, "deployment.spec.replicas", 1, id="replicas-default"),
    P({}, "deployment.spec.strategy", {"type": "Recreate"}, id="recreate"),
    P(PEERED, "deployment.spec.replicas", 2, id="replicas-2"),
    P(PEERED, "deployment.spec.strategy.type", "RollingUpdate", id="rolling-update"),
    P(PEERED, f"ClusterKopfPeering/{FULL}.apiVersion", "kopf.dev/v1", id="cluster-peering-object"),
    # Image: tag, digest, pull secrets.
    P({}, "container.image", "kubelora/operator:0.1.0", id="image-default"),
    P({"image": {"repository": "r.example/op", "tag": "9.9"}}, "container.image", "r.example/op:9.9", id="image-tag"),
    P(
        {"image": {"repository": "r.example/op", "digest": DIGEST}},
        "container.image",
        f"r.example/op@{DIGEST}",
        id="image-digest",
    ),
    P({"imagePullSecrets": [{"name": "regcred"}]}, "pod.imagePullSecrets", [{"name": "regcred"}], id="pull-secrets"),
    # Scheduling and resources pass through unchanged.
    P(SCHEDULING, "container.resources", SCHEDULING["resources"], id="resources"),
    P(SCHEDULING, "pod.nodeSelector", SCHEDULING["nodeSelector"], id="node-selector"),
    P(SCHEDULING, "pod.tolerations", SCHEDULING["tolerations"], id="tolerations"),
    P(SCHEDULING, "pod.affinity", SCHEDULING["affinity"], id="affinity"),
    P(SCHEDULING, "pod.priorityClassName", "system-cluster-critical", id="priority-class"),
    # Probes hit kopf's liveness endpoint on the health port.
    P(HEALTH, "container.ports", [{"name": "health", "containerPort": 9090, "protocol": "TCP"}], id="health-port"),
    P(HEALTH, "container.livenessProbe.httpGet", {"path": "/healthz", "port": "health"}, id="liveness-get"),
    P(HEALTH, "container.livenessProbe.periodSeconds", 5, id="liveness-period"),
    P(HEALTH, "container.readinessProbe.httpGet.path", "/healthz", id="readiness-path"),
    # PodSecurity "restricted" (the rest of it: test_pod_spec_is_podsecurity_restricted).
    P({}, "pod.securityContext.runAsNonRoot", True, id="run-as-non-root"),
    P({}, "pod.securityContext.runAsUser", 65532, id="run-as-user"),
    P({}, "pod.securityContext.seccompProfile", {"type": "RuntimeDefault"}, id="seccomp"),
    P({}, "container.securityContext.allowPrivilegeEscalation", False, id="no-privilege-escalation"),
    P({}, "container.securityContext.capabilities", {"drop": ["ALL"]}, id="drop-all-capabilities"),
    P({}, "container.securityContext.readOnlyRootFilesystem", True, id="read-only-root"),
    P({}, "container.securityContext.privileged", False, id="unprivileged"),
    P({}, "pod.automountServiceAccountToken", True, id="token-mounted"),
    # Bindings: to the operator's ServiceAccount, in the release namespace.
    P({}, f"ClusterRoleBinding/{FULL}.subjects", SA_SUBJECT, id="binding-subjects"),
    P({}, f"ClusterRoleBinding/{FULL}-cluster.subjects", SA_SUBJECT, id="cluster-binding-subjects"),
    P(
        {},
        f"ClusterRoleBinding/{FULL}.roleRef",
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": FULL},
        id="binding-role",
    ),
    P(
        {},
        f"ClusterRoleBinding/{FULL}-cluster.roleRef",
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": f"{FULL}-cluster"},
        id="cluster-binding-role",
    ),
    P(NS2, f"RoleBinding/{FULL}@team-a.roleRef.kind", "Role", id="namespaced-binding-role-a"),
    P(NS2, f"RoleBinding/{FULL}@team-b.roleRef.kind", "Role", id="namespaced-binding-role-b"),
    P(NS2, f"RoleBinding/{FULL}@team-a.subjects.0.namespace", "kubelora-system", id="namespaced-binding-subject-a"),
    P(NS2, f"RoleBinding/{FULL}@team-b.subjects.0.namespace", "kubelora-system", id="namespaced-binding-subject-b"),
    # Metrics: the Service on the health port; the ServiceMonitor scrapes the workers' `metrics` port.
    P({}, f"Service/{FULL}.spec.ports.0.targetPort", "health", id="service-port"),
    P(MONITOR, "ServiceMonitor.metadata.labels.release", "prom", id="monitor-labels"),
    P(MONITOR, "ServiceMonitor.spec.namespaceSelector", {"matchNames": ["a"]}, id="monitor-watched-namespaces"),
    P(
        {"metrics": {"serviceMonitor": {"enabled": True}}},
        "ServiceMonitor.spec.namespaceSelector",
        {"any": True},
        id="monitor-all-namespaces",
    ),
    P(MONITOR, "ServiceMonitor.spec.endpoints.0.port", "metrics", id="monitor-port"),
]


@pytest.mark.parametrize(("values", "where", "expected"), RENDERED)
def test_rendered(values: dict[str, Any], where: str, expected: Any) -> None:
    assert at(rendered(values), where) == expected


#: (values, where, item, present): present means `item in` the list there; absent means no element of it
#: starts with `item` (so "--peering" covers every --peering=NAME).
CONTAINS = [
    P({}, "container.args", "--standalone", True, id="standalone"),
    P({}, "container.args", "--peering", False, id="no-peering"),
    P({}, "container.args", "--namespace", False, id="clusterwide"),
    P(NS2, "container.args", "--namespace=team-a", True, id="namespace-a"),
    P(NS2, "container.args", "--namespace=team-b", True, id="namespace-b"),
    P(PEERED, "container.args", f"--peering={FULL}", True, id="peering"),
    P(PEERED, "container.args", "--standalone", False, id="peering-not-standalone"),
    P(NS2_PEERED, "container.args", "--peering=lora", True, id="peering-named"),
    P(FORCED_PEERING, "container.args", f"--peering={FULL}", True, id="peering-forced"),
    P(HEALTH, "container.args", "--liveness=http://0.0.0.0:9090/healthz", True, id="liveness-endpoint"),
    P(EXTRA, "container.args", "--verbose", True, id="verbose"),
    P(EXTRA, "container.env", EXTRA["extraEnv"][0], True, id="extra-env"),
]


@pytest.mark.parametrize(("values", "where", "item", "present"), CONTAINS)
def test_rendered_contains(values: dict[str, Any], where: str, item: Any, present: bool) -> None:
    found = at(rendered(values), where)
    if present:
        assert item in found
    else:
        assert not [x for x in found if isinstance(x, str) and x.startswith(item)]


#: (values, kind, name, namespace, how many such objects render)
OBJECTS = [
    P({}, "Role", None, None, 0, id="clusterwide-no-role"),
    P({}, "RoleBinding", None, None, 0, id="clusterwide-no-rolebinding"),
    P({}, "ClusterKopfPeering", None, None, 0, id="standalone-no-cluster-peering"),
    P({}, "KopfPeering", None, None, 0, id="standalone-no-peering"),
    P({}, "ServiceMonitor", None, None, 0, id="no-service-monitor"),
    P({"metrics": {"service": {"enabled": False}}}, "Service", None, None, 0, id="service-off"),
    P(NS2, "ClusterRole", FULL, None, 0, id="namespaced-no-clusterrole"),
    P(NS2, "ClusterRoleBinding", FULL, None, 0, id="namespaced-no-clusterrolebinding"),
    P(NS2, "Role", None, "kubelora-system", 0, id="namespaced-no-role-in-release-namespace"),
    P(FORCED_PEERING, "ClusterKopfPeering", FULL, None, 1, id="forced-cluster-peering"),
    P(NS2_PEERED, "KopfPeering", "lora", "team-a", 1, id="namespaced-peering-a"),
    P(NS2_PEERED, "KopfPeering", "lora", "team-b", 1, id="namespaced-peering-b"),
    P(NS2_PEERED, "KopfPeering", "lora", None, 2, id="namespaced-peering-only-watched"),
    P(NS2_PEERED, "ClusterKopfPeering", None, None, 0, id="namespaced-no-cluster-peering"),
]


@pytest.mark.parametrize(("values", "kind", "name", "namespace", "count"), OBJECTS)
def test_rendered_objects(
    values: dict[str, Any], kind: str, name: str | None, namespace: str | None, count: int
) -> None:
    assert len(find(rendered(values), kind, name, namespace)) == count


#: (values, kind, name, namespace, the (apiGroup, resource, verb) it grants, exactly)
RULES = [
    P({}, "ClusterRole", f"{FULL}-cluster", None, CLUSTER, id="clusterwide-cluster"),
    P({}, "ClusterRole", FULL, None, NAMESPACED, id="clusterwide-namespaced"),
    P(NS2, "ClusterRole", f"{FULL}-cluster", None, CLUSTER | NAMESPACE_OBSERVER, id="namespaced-cluster"),
    P(NS2, "Role", FULL, "team-a", NAMESPACED, id="namespaced-a"),
    P(NS2, "Role", FULL, "team-b", NAMESPACED, id="namespaced-b"),
    P(PEERED, "ClusterRole", f"{FULL}-cluster", None, CLUSTER | CLUSTER_PEERING, id="peering-cluster"),
    P(NS2_PEERED, "Role", FULL, "team-a", NAMESPACED | NAMESPACED_PEERING, id="namespaced-peering-a"),
    P(NS2_PEERED, "Role", FULL, "team-b", NAMESPACED | NAMESPACED_PEERING, id="namespaced-peering-b"),
    P(
        NS2_PEERED,
        "ClusterRole",
        f"{FULL}-cluster",
        None,
        CLUSTER | NAMESPACE_OBSERVER,
        id="namespaced-peering-cluster",
    ),
]


@pytest.mark.parametrize(("values", "kind", "name", "namespace", "expected"), RULES)
def test_rbac_rules(
    values: dict[str, Any], kind: str, name: str, namespace: str | None, expected: set[tuple[str, str, str]]
) -> None:
    assert rule_set(one(rendered(values), kind, name, namespace)["rules"]) == expected


MODES = [
    P({}, id="clusterwide"),
    P({"watchNamespaces": ["team-a"]}, id="namespaced"),
    P({"replicaCount": 2}, id="clusterwide-peering"),
    P({"replicaCount": 2, "watchNamespaces": ["team-a"]}, id="namespaced-peering"),
]


@pytest.mark.parametrize("values", MODES)
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
    objs = rendered(values)
    assert rule_set(one(objs, "ClusterRole", f"{FULL}-cluster")["rules"]) == expected["-cluster"]
    if namespaces:
        assert rule_set(one(objs, "Role", FULL, namespaces[0])["rules"]) == expected[""]
    else:
        assert rule_set(one(objs, "ClusterRole", FULL)["rules"]) == expected[""]


#: Rights the operator never needs, so no mode may grant them.
DANGEROUS = [
    ("", "pods/exec", "create"),
    ("", "pods", "update"),
    ("", "secrets", "list"),
    ("", "secrets", "watch"),
    ("", "nodes", "delete"),
    ("", "nodes", "patch"),
    ("rbac.authorization.k8s.io", "roles", "create"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "create"),
]


@pytest.mark.parametrize("values", MODES)
def test_no_wildcards_and_no_dangerous_rights(values: dict[str, Any]) -> None:
    rules = [r for o in rendered(values) if o["kind"] in ("Role", "ClusterRole") for r in o["rules"]]
    flat = rule_set(rules)
    assert not any("*" in part for t in flat for part in t)
    assert not flat & set(DANGEROUS)


#: (OperatorSettings read, value) after rendering SETTINGS: each chart value reaches the operator.
SETTINGS = {
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
SETTINGS_READ: list[Any] = [
    P(lambda s: s.gpu_resource, "gpu.intel.com/xe", id="gpu-resource"),
    P(lambda s: s.gpu_node_label, "intel.feature.node.kubernetes.io/gpu=true", id="gpu-node-label"),
    P(lambda s: s.gpu_supplemental_groups, [109], id="gpu-supplemental-groups"),
    P(lambda s: s.amx_node_label, "feature.node.kubernetes.io/cpu-cpuid.AMXTILE", id="amx-node-label"),
    P(lambda s: s.image_for("cpu"), "registry.example/kubelora/trainer-cpu:1.2.3", id="cpu-image"),
    P(lambda s: s.image_for("xpu"), "registry.example/kubelora/trainer-xpu:1.2.3", id="xpu-image"),
    P(lambda s: s.ccl_env["FI_PROVIDER"], "psm3", id="ccl-env-set"),
    P(lambda s: s.ccl_env["CCL_WORKER_COUNT"], "1", id="ccl-env-merged"),  # Helm merges maps: defaults stay
    P(lambda s: s.shm_size_limit, "8Gi", id="shm-size-limit"),
    P(lambda s: s.resync_seconds, 15, id="resync-seconds"),
    P(lambda s: s.image_pull_secrets, ["regcred"], id="image-pull-secrets"),
    P(lambda s: s.master_port, 29500, id="untouched-default"),
]


@pytest.mark.parametrize(("read", "expected"), SETTINGS_READ)
def test_settings_reach_the_operator(read: Callable[[OperatorSettings], Any], expected: Any, tmp_path: Path) -> None:
    assert read(settings_file(rendered({"settings": SETTINGS}), tmp_path)) == expected


def test_settings_file_is_mounted_and_rolls_the_pods() -> None:
    """The operator reads the settings from the mounted ConfigMap; a change rolls the pods."""
    objs = rendered({"settings": SETTINGS})
    c = container(objs)
    env = {e["name"]: e.get("value") for e in c["env"]}
    mount = next(m for m in c["volumeMounts"] if m["name"] == "settings")
    assert env["KUBELORA_SETTINGS_FILE"] == mount["mountPath"] + "/settings.yaml"
    cm_volume = next(v for v in pod_spec(objs)["volumes"] if v["name"] == "settings")
    assert cm_volume["configMap"]["name"] == f"{FULL}-settings"
    checksum = "deployment.spec.template.metadata.annotations.checksum/settings"
    assert at(objs, checksum) != at(rendered(), checksum)


def test_pod_spec_is_podsecurity_restricted() -> None:
    """What RENDERED's security rows cannot say: no host namespaces, ports or volume types."""
    pod = pod_spec(rendered())
    (c,) = pod["containers"]
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    for v in pod["volumes"]:
        assert set(v) & {"configMap", "emptyDir", "secret", "projected"}, v  # restricted volume types only
    assert not any("hostPort" in p for p in c["ports"])
    # Writable scratch under the read-only root (ssh-keygen for mpirun key pairs).
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])


def test_service_monitor_selects_rank_0_of_the_workers() -> None:
    """The Service selects the operator pod; the ServiceMonitor the workers' headless Services as the
    operator labels them (plan.common_labels), keeping only rank 0 (the one serving metrics)."""
    from kubelora_operator.plan import LABEL_WORKER_INDEX, common_labels

    objs = rendered(MONITOR)
    assert one(objs, "Service", FULL)["spec"]["selector"] == deployment(objs)["spec"]["selector"]["matchLabels"]
    sm = one(objs, "ServiceMonitor")
    labels = common_labels("x")
    assert all(labels[k] == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    (keep,) = sm["spec"]["endpoints"][0]["relabelings"]
    meta_label = "__meta_kubernetes_pod_label_" + "".join(c if c.isalnum() else "_" for c in LABEL_WORKER_INDEX)
    assert (keep["sourceLabels"], keep["regex"], keep["action"]) == ([meta_label], "0", "keep")


@pytest.mark.parametrize("values", [P({}, id="default"), P({**NS2_PEERED, "verbose": True}, id="namespaced-peering")])
def test_chart_args_parse_with_the_operator_cli(values: dict[str, Any]) -> None:
    """The rendered flags are accepted by `python -m kubelora_operator run` (the image's entrypoint)."""
    from kubelora_operator.__main__ import build_parser

    args = build_parser().parse_args(["run", *container(rendered(values))["args"]])
    assert args.liveness.endswith("/healthz")
    assert args.standalone == (values == {})
    assert args.namespace == values.get("watchNamespaces", [])
