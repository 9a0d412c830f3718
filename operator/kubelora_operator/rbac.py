"""The operator's RBAC: exactly what the operator (its REST calls and watches) and kopf call, nothing more.

The chart's RBAC templates read the same rules from a file generated from this module
(`python -m kubelora_operator.chart_sync`). Checked by tests/operator/test_integration_rbac.py, which runs the operator with a ServiceAccount
holding only these rules against the local control plane (RBAC authorizer on).

Two roles:

* `CLUSTER_RULES` (always a ClusterRoleBinding): Nodes for placement; CRDs that kopf watches; with
  named namespaces also `NAMESPACE_OBSERVER_RULES` (kopf's namespace observer runs only then).
* `NAMESPACED_RULES`: the LoRAFineTunes and their children. Cluster-wide: a ClusterRoleBinding;
  `--namespace NS`: a RoleBinding in each watched namespace (to the same ClusterRole).

Trainer pods get none of this: their ServiceAccount token is not even mounted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .api import GROUP, PLURAL

CLUSTER_RULES: list[dict[str, Any]] = [
    # Placement: allocatable GPUs / AMX labels of every node (one list per decision).
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]},
    # kopf: resource discovery (notices the CRD being (re)installed).
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
]

#: Only when the operator serves named namespaces: kopf 1.45 then lists/watches Namespaces to follow
#: them being created or deleted, and without this rule never starts serving. Cluster-wide, it does not.
NAMESPACE_OBSERVER_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
]

NAMESPACED_RULES: list[dict[str, Any]] = [
    # The resource: read and watched; metadata patched by kopf (finalizer, annotations) and by the
    # handlers (kubelora.dev/* annotations); deleted after ttlSecondsAfterFinished. kopf and the
    # handlers only ever PATCH (no PUT), so no `update`.
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch", "delete"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["patch"]},
    # Owner references with blockOwnerDeletion: required where the OwnerReferencesPermissionEnforcement
    # admission plugin is on (OpenShift, hardened clusters; not on the test control plane).
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/finalizers"], "verbs": ["update"]},
    # Worker pods: watched for phases, read for rank 0's IP, created per attempt, deleted on
    # restart/suspend/deadline.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "delete"]},
    # ConfigMap: created (trainer config) and read (a dataVolume ConfigMap must exist). Service: created.
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["create"]},
    # References are checked (get); mpirun's `<name>-ssh` key pair is created.
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create"]},
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]

#: Only with peering (several replicas, one active): kopf's peering objects.
PEERING_CLUSTER_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"], "verbs": ["get", "list", "watch", "patch"]},
]
PEERING_NAMESPACED_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"], "verbs": ["get", "list", "watch", "patch"]},
]


def manifests(
    service_account: str,
    sa_namespace: str,
    namespaces: Sequence[str] = (),
    *,
    name: str = "kubelora-operator",
    peering: bool = False,
) -> list[dict[str, Any]]:
    """ClusterRoles and bindings for a ServiceAccount; `namespaces` empty: cluster-wide."""
    subject = [{"kind": "ServiceAccount", "name": service_account, "namespace": sa_namespace}]
    cluster_rules = CLUSTER_RULES + (NAMESPACE_OBSERVER_RULES if namespaces else [])
    cluster_rules += PEERING_CLUSTER_RULES if peering and not namespaces else []
    ns_rules = NAMESPACED_RULES + (PEERING_NAMESPACED_RULES if peering and namespaces else [])
    rbac = "rbac.authorization.k8s.io/v1"
    out: list[dict[str, Any]] = [
        {"apiVersion": rbac, "kind": "ClusterRole", "metadata": {"name": f"{name}-cluster"}, "rules": cluster_rules},
        {"apiVersion": rbac, "kind": "ClusterRole", "metadata": {"name": name}, "rules": ns_rules},
        {
            "apiVersion": rbac,
            "kind": "ClusterRoleBinding",
            "metadata": {"name": f"{name}-cluster"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": f"{name}-cluster"},
            "subjects": subject,
        },
    ]
    role_ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}
    if not namespaces:
        out.append(
            {
                "apiVersion": rbac,
                "kind": "ClusterRoleBinding",
                "metadata": {"name": name},
                "roleRef": role_ref,
                "subjects": subject,
            }
        )
    for ns in namespaces:
        out.append(
            {
                "apiVersion": rbac,
                "kind": "RoleBinding",
                "metadata": {"name": name, "namespace": ns},
                "roleRef": role_ref,
                "subjects": subject,
            }
        )
    return out
