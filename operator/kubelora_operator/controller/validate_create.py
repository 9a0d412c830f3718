"""Validation before anything is created: the spec (validation.check_resource) and the objects it references.

A missing Secret/PVC/ConfigMap (or a missing key in a Secret) is reported with a specific reason
(SecretNotFound, PVCNotFound, ConfigMapNotFound) and message; nothing is created until it exists.
It is not an error loop: the periodic reconcile and every change of the resource check again, so
creating the Secret later unblocks the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..api import LoRAFineTuneSpec
from ..conditions import ConditionReason
from ..kube import Kube
from ..settings import OperatorSettings
from ..validation import Reference, check_resource, pvc_problems, references


@dataclasses.dataclass(frozen=True)
class Validation:
    """Outcome: a parsed spec when everything is fine, else the first reason and all messages."""

    spec: LoRAFineTuneSpec | None
    reason: ConditionReason
    messages: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.spec is not None

    @property
    def message(self) -> str:
        return "; ".join(self.messages) if self.messages else "spec and referenced objects are valid"


def _read(kube: Kube, namespace: str, ref: Reference) -> dict[str, Any] | None:
    if ref.kind == "Secret":
        return kube.read_secret(namespace, ref.name)
    if ref.kind == "PersistentVolumeClaim":
        return kube.read_pvc(namespace, ref.name)
    return kube.read_config_map(namespace, ref.name)


def reference_problems(kube: Kube, namespace: str, spec: LoRAFineTuneSpec) -> list[tuple[ConditionReason, str]]:
    """(reason, message) for each missing object or key, and for PVC access modes that cannot work."""
    seen: dict[tuple[str, str], dict[str, Any] | None] = {}
    out: list[tuple[ConditionReason, str]] = []
    for ref in references(spec):
        key = (ref.kind, ref.name)
        if key not in seen:
            seen[key] = _read(kube, namespace, ref)
            obj = seen[key]
            if obj is None:
                whole = Reference(ref.kind, ref.name, ref.field)
                out.append((ref.reason, whole.missing_message()))
            elif ref.kind == "PersistentVolumeClaim":
                modes = list(((obj.get("spec") or {}).get("accessModes")) or [])
                # the data volume and pvc:// sources (model.nameOrPath, data.path, ...) are mounted read-only
                read_only = ref.field.startswith(("dataVolume", "model.", "data."))
                out += [
                    (ConditionReason.INVALID_SPEC, m) for m in pvc_problems(spec, ref.name, modes, read_only=read_only)
                ]
        obj = seen[key]
        if obj is not None and ref.key is not None:
            data: Mapping[str, Any] = {**(obj.get("data") or {}), **(obj.get("stringData") or {})}
            if ref.key not in data:
                out.append((ref.reason, ref.missing_message()))
    return out


def validate(
    kube: Kube, name: str, namespace: str, raw_spec: Mapping[str, Any], settings: OperatorSettings
) -> Validation:
    """Spec checks first (no API calls when the spec itself is wrong), then the references."""
    spec, problems = check_resource(name, raw_spec, settings)
    if spec is None:
        return Validation(None, ConditionReason.INVALID_SPEC, tuple(problems))
    refs = reference_problems(kube, namespace, spec)
    if refs:
        return Validation(None, refs[0][0], tuple(dict.fromkeys(m for _, m in refs)))
    return Validation(spec, ConditionReason.SPEC_VALID)
