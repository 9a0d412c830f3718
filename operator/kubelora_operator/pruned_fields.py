"""Spec keys the API server pruned: typos made loud where the server itself says nothing.

Why: the CRD declares every spec field but does not reject unknown ones (`additionalProperties:
false` is not allowed beside `properties` in a structural schema), so the server prunes them. A
typo (`lora.rank` for `lora.r`) then vanishes and the default is used. Current servers report it
themselves (server-side field validation, `kubectl --validate=strict`, the default since 1.27);
older servers (1.20 included) and clients that skip validation do not. For objects written by
`kubectl apply` (client-side), the `kubectl.kubernetes.io/last-applied-configuration` annotation
still holds what the user wrote: a key there that the stored spec lacks and that the schema does
not declare was pruned as unknown.

A key the schema declares is never reported, even when absent from the stored spec: it was sent as
null (pruned like unset) or removed since by a patch that left the annotation as it was.

Pure: reads the body it is given, no API calls (the controller posts the Warning Event).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
#: Reason of the Warning Event the controller posts when `pruned_spec_fields` names any.
PRUNED_FIELDS_EVENT = "PrunedFields"
_PRESERVE = "x-kubernetes-preserve-unknown-fields"


@cache
def _spec_schema() -> Mapping[str, Any]:
    from .crd import openapi_schema  # the schema the server prunes with

    spec: Mapping[str, Any] = openapi_schema()["properties"]["spec"]
    return spec


def _last_applied_spec(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    try:
        applied = json.loads(annotations.get(LAST_APPLIED) or "null")
    except ValueError:
        return None
    spec = applied.get("spec") if isinstance(applied, Mapping) else None
    return spec if isinstance(spec, Mapping) else None


def _pruned(applied: Any, stored: Any, node: Mapping[str, Any], path: str) -> list[str]:
    """Dotted paths below `path` of keys in `applied` that `stored` lacks and `node` does not declare."""
    if isinstance(applied, Mapping) and isinstance(stored, Mapping):
        props: Mapping[str, Any] = node.get("properties") or {}
        if not props:  # a map (additionalProperties) or a free-form object keeps every key
            return []
        out: list[str] = []
        for key, value in applied.items():
            if key not in props:
                if key not in stored and not node.get(_PRESERVE):
                    out.append(f"{path}.{key}")
            elif key in stored:
                out += _pruned(value, stored[key], props[key], f"{path}.{key}")
        return out
    if isinstance(applied, Sequence) and not isinstance(applied, str) and isinstance(stored, Sequence):
        items = node.get("items")
        if not isinstance(items, Mapping) or len(applied) != len(stored):
            return []  # not the same list any more: nothing to compare item by item
        return [
            p
            for i, (a, s) in enumerate(zip(applied, stored, strict=True))
            for p in _pruned(a, s, items, f"{path}[{i}]")
        ]
    return []


def pruned_spec_fields(body: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> list[str]:
    """The spec keys (dotted paths, `spec.lora.rank`, `spec.distributed.env[0].valu`) that the last applied
    configuration has and the server pruned as unknown; [] without that annotation.

    `schema`: the spec's structural schema (default: the CRD's, from the models)."""
    applied = _last_applied_spec(body)
    if applied is None:
        return []
    stored = body.get("spec") or {}
    return _pruned(applied, stored, schema if schema is not None else _spec_schema(), "spec")
