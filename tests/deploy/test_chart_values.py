"""The Helm chart (charts/kubelora) as files, with the real helm 3.17.2: lint, the CRDs it ships, a
comment on every value, the closed values schema (typos fail), and the generated parts (settings schema,
RBAC rules) current with the operator code. Rendering: test_chart.py; installing: test_chart_install.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubelora_operator.settings import OperatorSettings
from pydantic.alias_generators import to_camel

from .deploy_helpers import CHART, CRD_FILE, helm, rendered, set_args, settings_file


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
    assert settings_file(rendered(), tmp_path) == OperatorSettings()


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
        "settings-typo",
        "top-typo",
        "nested-typo",
        "securitycontext-typo",
        "enum",
        "namespace",
        "type",
        "pull-secret-names",
    ],
)
def test_invalid_values_fail(bad: dict[str, Any]) -> None:
    proc = helm("template", "rel", str(CHART), *set_args(bad), check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr


def test_generated_chart_files_are_current() -> None:
    """values.schema.json's settings and rbac-rules.yaml are what chart_sync writes from settings.py and
    rbac.py: a field or rule changed there without `python -m kubelora_operator.chart_sync` fails here."""
    from kubelora_operator import chart_sync

    assert chart_sync.main(["--check", "--chart", str(CHART)]) == 0
