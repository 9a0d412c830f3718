"""Generate the LoRAFineTune CustomResourceDefinition from the pydantic models.

Why generated: the models are the single source of truth, so the CRD can never disagree with what the
operator validates. Pydantic emits JSON Schema 2020-12; Kubernetes wants an OpenAPI v3.0 *structural*
schema (apiextensions.k8s.io/v1, valid from 1.16, so 1.20 and current servers alike). `to_structural`
bridges the two:

* `$ref`/`$defs` are inlined (Kubernetes does not resolve references);
* `anyOf [X, null]` becomes X, `nullable: true` only where null differs from absent (a scalar whose
  default is not None, `maxGradNorm: null`): elsewhere the server prunes a null like an unset field,
  and v1.20's `kubectl explain` shows a nullable node without its type or fields;
* `const` becomes a one-value `enum`; numeric `exclusiveMinimum: n` becomes `minimum: n` +
  `exclusiveMinimum: true` (the OpenAPI 3.0 spelling);
* unions of different types (`list[str] | "all-linear"`) become an untyped node with
  `x-kubernetes-preserve-unknown-fields: true` (pydantic still validates them), `int | str` becomes
  `x-kubernetes-int-or-string`, and unions of one primitive type (`"auto" | str`) become that type;
* free-form objects (`dict[str, Any]`) keep their data via `x-kubernetes-preserve-unknown-fields`;
* spec field defaults become `default:` (so `kubectl explain` and `kubectl get -o yaml` show what a run
  uses): plain values as they are; `None` never (an unset field means "follow the operator's setting"
  or "not used", and a stored value would pin it); an optional section whose pydantic default is the
  empty model (`lora`, `training`, `resources`, ...) gets `default: {}` when it holds defaults, because
  the server applies nested defaults only where the parent object exists. Status carries none: it is
  what the operator observed, not input;
* `status` is fully structural, with no `x-kubernetes-preserve-unknown-fields`: v1.20 publishes a
  preserving node to `kubectl explain` without its fields (`lft.status.progress` printed only the
  status description). Nothing else writes status: kopf handles no event of the resources
  (the operator watches them itself, controller/list_watch.py), so it stores nothing under
  `status.<handler id>`; the operator writes only declared keys (tests/operator/test_crd.py
  checks the keys it builds). A key a newer operator adds arrives with that operator's CRD;
* `title`, `examples` and `additionalProperties: false` are dropped: unknown spec keys are pruned by the
  server (its field validation reports them on current servers; `pruned_fields` names them from
  kubectl's last-applied annotation where nothing else does).

Output is YAML with sorted keys, so regenerating is byte-for-byte stable.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from .api import (
    API_VERSION,
    CATEGORIES,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    LoRAFineTuneSpec,
    LoRAFineTuneStatus,
)

CRD_NAME = f"{PLURAL}.{GROUP}"

_KEEP = {
    "type",
    "description",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
    "nullable",
    "format",
}
_FORMATS = {"int32", "int64", "float", "double", "byte", "date", "date-time", "password"}
_PRIMITIVES = {"string", "integer", "number", "boolean"}
PRESERVE = "x-kubernetes-preserve-unknown-fields"
INT_OR_STRING = "x-kubernetes-int-or-string"


class SchemaError(ValueError):
    """The models produced a schema construct this converter does not know how to make structural."""


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline one `$ref`, the referring node's own keys (description) winning over the definition's."""
    while "$ref" in node:
        ref = node["$ref"]
        prefix = "#/$defs/"
        if not ref.startswith(prefix):
            raise SchemaError(f"unsupported $ref {ref}")
        target = defs[ref[len(prefix) :]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _union(branches: list[dict[str, Any]]) -> dict[str, Any]:
    """A structural stand-in for a union of several non-null schemas."""
    types = {b.get("type") for b in branches}
    if types == {"integer", "string"}:
        return {INT_OR_STRING: True}
    if len(types) == 1 and types <= _PRIMITIVES:
        return {"type": types.pop()}  # e.g. "auto" | str: any string; enum/pattern no longer hold
    if types == {"number", "integer"}:
        return {"type": "number"}
    return {PRESERVE: True}


def _null_is_a_value(raw: dict[str, Any], converted: dict[str, Any]) -> bool:
    """Whether `X | None` keeps `nullable: true`: only where null means something else than absent, i.e.
    a scalar field whose default is not None (`maxGradNorm: null` disables clipping, absent clips at 1.0).

    Everywhere else null and absent mean the same, and a non-nullable field is the better shape: the
    server prunes a null sent for it (then applies its default), and v1.20 publishes a `nullable` node
    to `kubectl explain` with no type (`<>`) and, for an object, no fields.
    """
    if converted.get("type") == "object":
        return False
    return "default" not in raw or raw["default"] is not None


def _section_default(raw: dict[str, Any], converted: dict[str, Any]) -> bool:
    """An optional object property defaulted by a factory (no `default` in the JSON Schema), not nullable,
    with nothing required and defaults inside: absent means `{}`, and `default: {}` lets the server
    fill the nested defaults of an absent section too."""
    if "default" in raw or converted.get("type") != "object" or converted.get("nullable"):
        return False
    if converted.get("required") or "default" in converted:
        return False
    return any("default" in sub for sub in (converted.get("properties") or {}).values())


def to_structural(
    node: dict[str, Any], defs: dict[str, Any] | None = None, *, defaults: bool = False
) -> dict[str, Any]:
    """Convert one pydantic JSON Schema node (and everything below it) into a structural schema node;
    `defaults`: carry field defaults (spec) or not (status)."""
    defs = defs if defs is not None else {}
    node = _resolve(node, defs)
    out: dict[str, Any] = {}

    if "anyOf" in node or "oneOf" in node:
        branches = [_resolve(b, defs) for b in node.get("anyOf", node.get("oneOf", []))]
        rest = [b for b in branches if b.get("type") != "null"]
        nullable = len(rest) < len(branches)
        if len(rest) == 1:
            merged = {k: v for k, v in node.items() if k not in ("anyOf", "oneOf")}
            out = to_structural({**rest[0], **merged}, defs, defaults=defaults)
        else:
            out = _union([to_structural(b, defs, defaults=defaults) for b in rest])
            if "description" in node:
                out["description"] = node["description"]
            if defaults and node.get("default") is not None:
                out["default"] = node["default"]
        if nullable and _null_is_a_value(node, out):
            out["nullable"] = True
        return out

    if "allOf" in node:
        if len(node["allOf"]) != 1:
            raise SchemaError(f"allOf with {len(node['allOf'])} parts is not supported")
        merged = {k: v for k, v in node.items() if k != "allOf"}
        return to_structural({**_resolve(node["allOf"][0], defs), **merged}, defs, defaults=defaults)

    for key, value in node.items():
        if key == "const":
            out["enum"] = [value]
        elif key == "format":
            if value in _FORMATS:
                out["format"] = value
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        elif key in _KEEP or key.startswith("x-kubernetes-"):
            out[key] = value
        elif key == "default" and defaults and value is not None:
            out["default"] = value

    if "const" in node and "type" not in out:
        value = node["const"]
        out["type"] = {str: "string", bool: "boolean", int: "integer", float: "number"}.get(type(value), "string")

    kind = node.get("type")
    if kind == "object" or "properties" in node:
        out["type"] = "object"
        props = node.get("properties")
        if props:
            out["properties"] = {name: to_structural(sub, defs, defaults=defaults) for name, sub in props.items()}
            required = set(node.get("required") or ())
            for name, sub in props.items():
                if defaults and name not in required and _section_default(sub, out["properties"][name]):
                    out["properties"][name]["default"] = {}
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            if props:
                out[PRESERVE] = True
            else:
                out["additionalProperties"] = to_structural(extra, defs, defaults=defaults)
        elif (extra is True or extra == {}) or (not props and extra is None):
            out[PRESERVE] = True
    elif kind == "array":
        out["items"] = to_structural(node.get("items", {}), defs, defaults=defaults)
    elif kind is None and not any(k in out for k in (INT_OR_STRING, PRESERVE, "enum")):
        out[PRESERVE] = True  # Any
    if out.get("type") == "object" and not out.get("required"):
        out.pop("required", None)
    return out


def model_schema(model: type[BaseModel], *, defaults: bool = False) -> dict[str, Any]:
    """The structural schema of a pydantic model (camelCase names, descriptions kept, defaults on request)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return to_structural(raw, defs, defaults=defaults)


def openapi_schema() -> dict[str, Any]:
    """The `openAPIV3Schema` of the resource."""
    spec = model_schema(LoRAFineTuneSpec, defaults=True)
    status = model_schema(LoRAFineTuneStatus)
    return {
        "type": "object",
        "description": (
            "LoRAFineTune fine-tunes a language model with LoRA on Intel GPUs or AMX Xeon CPUs: the operator "
            "turns it into worker pods running the kubelora trainer and reports progress and the adapter in status."
        ),
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "APIVersion of this representation (kubelora.dev/v1alpha1).",
            },
            "kind": {"type": "string", "description": "Kind of this object (LoRAFineTune)."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
    }


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "State", "type": "string", "jsonPath": ".status.phase", "description": "Phase derived from conditions."},
    {
        "name": "Progress",
        "type": "integer",
        "jsonPath": ".status.progress.percent",
        "description": "Percent of optimiser steps done.",
    },
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.trainLoss", "description": "Last train loss."},
    {"name": "Workers", "type": "integer", "jsonPath": ".spec.workers", "description": "Worker pods."},
    {"name": "Device", "type": "string", "jsonPath": ".status.placement.device", "description": "Placed device."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition object (apiextensions.k8s.io/v1)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "kubelora", "app.kubernetes.io/part-of": "kubelora"},
            "annotations": {"kubelora.dev/generated-by": "python -m kubelora_operator crd"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def crd_yaml() -> str:
    """The CRD as deterministic YAML (sorted keys, no line folding of long descriptions)."""
    header = (
        f"# Generated by `python -m kubelora_operator crd` from kubelora_operator.api ({API_VERSION}).\n"
        "# Do not edit: change the models and regenerate.\n"
    )
    return header + yaml.safe_dump(build_crd(), sort_keys=True, width=1 << 16, allow_unicode=True)
