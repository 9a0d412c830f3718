"""The generated CRD: committed file in sync, structural for Kubernetes 1.20+, described everywhere."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubelora_operator.__main__ import main
from kubelora_operator.api import parse_spec
from kubelora_operator.crd import build_crd, crd_yaml, to_structural

from tests.deploy.deploy_helpers import validate_structural

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "crds" / "lorafinetunes.kubelora.dev.yaml"

# The OpenAPI v3 subset apiextensions.k8s.io/v1 accepts in a structural schema.
ALLOWED = {
    "type", "format", "description", "enum", "maximum", "minimum", "exclusiveMaximum", "exclusiveMinimum", "default",
    "maxLength", "minLength", "pattern", "maxItems", "minItems", "multipleOf", "maxProperties",
    "minProperties", "required", "items", "properties", "additionalProperties", "nullable",
}  # fmt: skip
TYPES = {"object", "array", "string", "integer", "number", "boolean"}
PY_TYPE = {"string": str, "integer": int, "number": (int, float), "boolean": bool}


def structural_problems(node: Any, path: str = "") -> list[str]:
    """A small checker of Kubernetes' structural-schema rules (plus what 1.20 rejects)."""
    out: list[str] = []
    if not isinstance(node, dict):
        return [f"{path}: schema is not an object"]
    for key in node:
        if key not in ALLOWED and not key.startswith("x-kubernetes-"):
            out.append(f"{path}: key {key!r} not allowed (no $ref, anyOf, title, default, const...)")
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    kind = node.get("type")
    if kind is None and not (int_or_string or preserve):
        out.append(f"{path}: no type (only int-or-string or preserve-unknown-fields nodes may omit it)")
    if kind is not None and kind not in TYPES:
        out.append(f"{path}: unknown type {kind!r}")
    if int_or_string and kind is not None:
        out.append(f"{path}: int-or-string with a type")
    if "properties" in node and "additionalProperties" in node:
        out.append(f"{path}: properties and additionalProperties together")
    if "additionalProperties" in node and not isinstance(node["additionalProperties"], dict):
        out.append(f"{path}: additionalProperties must be a schema")
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if bound in node and not isinstance(node[bound], bool):
            out.append(f"{path}: {bound} must be a boolean in OpenAPI v3.0")
    if "nullable" in node and not isinstance(node["nullable"], bool):
        out.append(f"{path}: nullable must be a boolean")
    if "pattern" in node:
        re.compile(node["pattern"])
    if "default" in node:  # a default must validate against its own node (the server refuses the CRD else)
        out += [f"{path}: default {e}" for e in validate_structural(node["default"], node, path)]
    if "enum" in node and kind in PY_TYPE:
        bad = [
            v for v in node["enum"] if not isinstance(v, PY_TYPE[kind]) or isinstance(v, bool) != (kind == "boolean")
        ]
        if bad:
            out.append(f"{path}: enum values {bad} are not {kind}")
    if (kind == "array") != ("items" in node):
        out.append(f"{path}: arrays need exactly one items schema")
    if ("properties" in node or "additionalProperties" in node) and kind != "object":
        out.append(f"{path}: properties on a non-object")
    for req in node.get("required", []):
        if req not in node.get("properties", {}):
            out.append(f"{path}: required {req!r} is not a property")
    for name, sub in node.get("properties", {}).items():
        out += structural_problems(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        out += structural_problems(node["additionalProperties"], f"{path}[*]")
    if "items" in node:
        out += structural_problems(node["items"], f"{path}[]")
    return out


def undescribed(node: dict[str, Any], path: str = "") -> list[str]:
    """Properties without a description (kubectl explain would show nothing)."""
    out = []
    for name, sub in node.get("properties", {}).items():
        if not str(sub.get("description", "")).strip() and f"{path}.{name}" != ".metadata":
            out.append(f"{path}.{name}")
        out += undescribed(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out += undescribed(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += undescribed(node["additionalProperties"], f"{path}[*]")
    return out


def schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def lookup(root: dict[str, Any], json_path: str) -> dict[str, Any]:
    node = root
    for part in json_path.strip(".").split("."):
        node = node["properties"][part]
    return node


def test_committed_crd_matches_the_generator() -> None:
    assert COMMITTED.exists(), "run: python -m kubelora_operator crd > crds/lorafinetunes.kubelora.dev.yaml"
    assert COMMITTED.read_text() == crd_yaml(), (
        "crds/lorafinetunes.kubelora.dev.yaml drifted from the models; regenerate it with "
        "`python -m kubelora_operator crd > crds/lorafinetunes.kubelora.dev.yaml`"
    )


def test_cli_prints_the_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crd"]) == 0
    assert capsys.readouterr().out == crd_yaml()
    with pytest.raises(SystemExit):
        main([])


def test_yaml_is_deterministic_and_loads() -> None:
    text = crd_yaml()
    assert text == crd_yaml()
    assert yaml.safe_load(text) == build_crd()


def test_names_scope_subresources() -> None:
    crd = build_crd()
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "lorafinetunes.kubelora.dev"
    spec = crd["spec"]
    assert spec["group"] == "kubelora.dev" and spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "LoRAFineTune",
        "listKind": "LoRAFineTuneList",
        "plural": "lorafinetunes",
        "singular": "lorafinetune",
        "shortNames": ["lft"],
        "categories": ["kubelora"],
    }
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_schema_is_structural() -> None:
    root = schema()
    assert structural_problems(root) == []
    assert root["properties"]["metadata"] == {"type": "object"}
    assert root["required"] == ["spec"]
    assert "$ref" not in crd_yaml() and "anyOf" not in crd_yaml() and "title:" not in crd_yaml()


def test_every_property_has_a_description() -> None:
    assert undescribed(schema()) == []


def test_conversions_of_tricky_fields() -> None:
    root = schema()
    spec = root["properties"]["spec"]
    assert lookup(spec, "lora.targetModules") == {
        "description": lookup(spec, "lora.targetModules")["description"],
        "x-kubernetes-preserve-unknown-fields": True,
        "default": "all-linear",
    }
    assert lookup(spec, "training.resume")["type"] == "string" and "enum" not in lookup(spec, "training.resume")
    assert lookup(spec, "resources.cpu")["x-kubernetes-int-or-string"] is True
    assert lookup(spec, "training.learningRate") == {
        "description": "Peak learning rate of AdamW.",
        "type": "number",
        "minimum": 0,
        "exclusiveMinimum": True,
        "default": 2e-4,
    }
    assert lookup(spec, "distributed.deepspeedStage")["enum"] == [0, 2, 3]
    # null is pruned like absent where the default is None; kept where it means "off" (maxGradNorm: null).
    assert "nullable" not in lookup(spec, "training.maxSteps") and "nullable" not in lookup(spec, "image")
    assert lookup(spec, "training.maxGradNorm")["nullable"] is True
    tolerations = lookup(spec, "placement.tolerations")
    assert tolerations["items"] == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    affinity = lookup(spec, "placement.affinity")
    assert affinity["x-kubernetes-preserve-unknown-fields"] is True and affinity["type"] == "object"
    assert lookup(spec, "data.fieldMap")["additionalProperties"] == {"type": "string"}
    assert lookup(spec, "workers")["minimum"] == 1
    assert set(spec["required"]) == {"data", "output"}
    # S3 credentials live only in the Secret reference.
    assert set(lookup(spec, "output.s3.credentialsSecret")["properties"]) == {
        "name", "accessKeyIdKey", "secretAccessKeyKey", "sessionTokenKey",
    }  # fmt: skip


def test_status_schema_and_printer_columns() -> None:
    root = schema()
    status = root["properties"]["status"]
    # Fully structural (v1.20's kubectl explain lists no fields below a preserving node), no nulls.
    assert "x-kubernetes-preserve-unknown-fields" not in json.dumps(status)
    assert "nullable" not in json.dumps(status)
    assert lookup(status, "progress.trainLoss")["type"] == "number"
    cond = lookup(status, "conditions")["items"]
    assert set(cond["properties"]) >= {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    columns = build_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in columns] == ["State", "Progress", "Loss", "Workers", "Device", "Age"]
    for col in columns:
        if col["jsonPath"].startswith((".spec", ".status")):
            node = lookup(root, col["jsonPath"])
            assert node["type"] == col["type"], col


def _written_status_keys() -> set[str]:
    """Top-level status keys the operator's code writes (`status["k"] = `, `.setdefault("k"`, `.update(k=`)."""
    keys: set[str] = set()
    for path in (REPO / "operator" / "kubelora_operator").rglob("*.py"):
        text = path.read_text()
        keys |= set(re.findall(r'status\["(\w+)"\]\s*=', text))
        keys |= set(re.findall(r'status\.setdefault\("(\w+)"', text))
        for args in re.findall(r"status\.update\(([^)]*)\)", text):
            keys |= set(re.findall(r"(\w+)=", args))
    return keys


def test_every_status_key_the_operator_writes_is_declared() -> None:
    """The status schema keeps no unknown fields, so a key the operator writes without declaring it
    would be pruned by the server without a word: each key it builds must be in the schema."""
    from kubelora_operator.conditions import ConditionReason, ConditionType, set_condition
    from kubelora_operator.controller.progress import GAUGES, progress_from_metrics
    from kubelora_operator.placement import PlacementDecision
    from kubelora_trainer.contract import parse_success_message

    status = lookup(schema(), "status")
    written = _written_status_keys()
    assert {"conditions", "phase", "observedGeneration", "startTime", "completionTime", "placement"} <= written
    assert written <= set(status["properties"]), written - set(status["properties"])
    progress = progress_from_metrics({gauge: 1.0 for gauge in GAUGES} | {"kubelora_total_steps": 4.0})
    assert set(progress) | {"percent", "etaSeconds"} <= set(lookup(status, "progress")["properties"])
    (cond,) = set_condition([], ConditionType.RUNNING, True, ConditionReason.WORKERS_RUNNING, "m", 3, "t")
    assert set(cond) <= set(status["properties"]["conditions"]["items"]["properties"]), cond
    decision = PlacementDecision("cpu", "why", ConditionReason.PODS_CREATED, node_pool="pool")
    assert set(decision.to_status()) <= set(lookup(status, "placement")["properties"])
    message = json.dumps({"artifact": {"uri": "s3://b/p", "sha256": "ab", "sizeBytes": 3}})
    assert set(parse_success_message(message) or {"missing": 1}) <= set(lookup(status, "artifact")["properties"])


def test_nullable_only_where_null_is_a_value() -> None:
    """`X | None = None`: a null is pruned like absent (no `nullable`, so v1.20's explain shows the type);
    `X | None = 1.0` keeps `nullable` (null means off); a required `X | None` too; objects never."""
    opt = {"anyOf": [{"type": "integer"}, {"type": "null"}]}
    assert to_structural({**opt, "default": None}, defaults=True) == {"type": "integer"}
    assert to_structural({**opt, "default": 3}, defaults=True) == {"type": "integer", "nullable": True, "default": 3}
    assert to_structural(opt) == {"type": "integer", "nullable": True}
    obj = {"anyOf": [{"type": "object", "properties": {"a": {"type": "string"}}}, {"type": "null"}], "default": None}
    assert "nullable" not in to_structural(obj)
    nullable = re.findall(r"\n(\s+)nullable: true", COMMITTED.read_text())
    assert 0 < len(nullable) <= 8, "only the few null-means-off fields are nullable"


def test_converter_edge_cases() -> None:
    assert to_structural({"anyOf": [{"type": "integer"}, {"type": "number"}]}) == {"type": "number"}
    assert to_structural({"const": "x", "description": "d"}) == {"enum": ["x"], "type": "string", "description": "d"}
    assert to_structural({}) == {"x-kubernetes-preserve-unknown-fields": True}
    assert to_structural({"type": "string", "format": "uri", "title": "T", "default": "a"}) == {"type": "string"}
    assert to_structural(
        {"allOf": [{"$ref": "#/$defs/A"}], "description": "outer"}, {"A": {"type": "object", "description": "inner"}}
    ) == {"type": "object", "description": "outer", "x-kubernetes-preserve-unknown-fields": True}


def _fill_defaults(obj: Any, node: dict[str, Any]) -> Any:
    """What the API server's structural defaulting does: set each absent property's default, then
    walk into present objects and array items (nested defaults apply only where the parent exists)."""
    if isinstance(obj, dict) and "properties" in node:
        for name, sub in node["properties"].items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                obj[name] = _fill_defaults(obj[name], sub)
    elif isinstance(obj, list) and isinstance(node.get("items"), dict):
        return [_fill_defaults(item, node["items"]) for item in obj]
    return obj


def test_spec_defaults_are_in_the_schema() -> None:
    spec = lookup(schema(), "spec")
    assert lookup(spec, "lora.r")["default"] == 8
    assert lookup(spec, "training.learningRate")["default"] == 2e-4
    assert lookup(spec, "evaluation.exactMatch")["default"] is True
    assert lookup(spec, "output.overwrite")["default"] is False
    assert lookup(spec, "resources.memory")["default"] == "16Gi"
    assert lookup(spec, "workers")["default"] == 1
    # Sections the pydantic model defaults to the empty model: {} so that nested defaults apply.
    for section in ("lora", "training", "evaluation", "model", "resources", "distributed"):
        assert lookup(spec, section)["default"] == {}, section
    # "Unset means follow the operator's setting / not used": never pinned by a stored default.
    for unset in ("image", "imagePullPolicy", "distributed.procsPerWorker", "pod.shmSize", "dataVolume",
                  "activeDeadlineSeconds", "output.s3"):
        assert "default" not in lookup(spec, unset), unset
    assert "default" not in lookup(spec, "pod")  # nothing to fill inside: no {} noise
    assert "default: null" not in COMMITTED.read_text()


def test_status_has_no_defaults() -> None:
    assert "default" not in json.dumps(lookup(schema(), "status"))


@pytest.mark.parametrize(
    "raw",
    [
        {"data": {"path": "sample://train.jsonl"}, "output": {"pvc": {"claimName": "runs"}}},
        {
            "data": {"path": "sample://train.jsonl", "template": "chat"},
            "lora": {"r": 32},
            "output": {"s3": {"uri": "s3://b/p", "credentialsSecret": {"name": "c"}}},
            "dataVolume": {"pvc": {"claimName": "d"}},
            "pod": {"volumes": [{"name": "s", "emptyDir": {}}], "volumeMounts": [{"name": "s", "mountPath": "/s"}]},
        },
    ],
    ids=["minimal", "nested"],
)
def test_server_filled_defaults_mean_what_pydantic_means(raw: dict[str, Any]) -> None:
    """Whatever the server fills in parses to the very spec pydantic makes of the sparse object (and
    validates against the schema it came from)."""
    filled = _fill_defaults(copy.deepcopy(raw), lookup(schema(), "spec"))
    assert filled["lora"]["r"] == raw.get("lora", {}).get("r", 8) and filled["training"]["learningRate"] == 2e-4
    assert parse_spec(filled) == parse_spec(raw)
    assert validate_structural(filled, lookup(schema(), "spec")) == []
