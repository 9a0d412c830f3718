"""What the operator remembers between reconciles: the start record, and a few annotations.

Never `status` (which is for users) and never only memory (cache.py merely mirrors the cluster):

* The **start record** (`StartRecord`): the spec the job was started with, its generation, the placed
  device (so that `auto` never flips between attempts) and the start time. It is written as annotations
  of the run's ConfigMap (`<name>-config`, created before any other child: the commit point), not of
  the resource. Why: a write of the resource costs the API server more than any other request a start
  makes (it validates the whole object against the CRD's schema, and the annotation doubled the size of
  every later write and watch event of it); the ConfigMap is created anyway. Measured at 1,000
  resources: docs/operator-benchmark.md, "the start record on the ConfigMap". Later attempts are
  planned from the record, and a spec change after start is compared against it and refused
  (SpecChangeRefused names the fields). Only the run policy (`RUN_POLICY`) is taken from the live spec.
  Resources started by an operator before this change carry the same keys on the resource itself;
  they are read from there (`record_of_resource`).
* Annotations on the resource, written only when they change from their start values:
  `kubelora.dev/attempt` (the pods' `kubelora.dev/attempt` label; absent: 0) and
  `kubelora.dev/active-since` (start of the activeDeadlineSeconds clock, reset on resume as Kubernetes
  Jobs do; absent: the record's start time; time spent suspended does not count).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ANN_STARTED_SPEC = "kubelora.dev/started-spec"
ANN_STARTED_GENERATION = "kubelora.dev/started-generation"
ANN_DEVICE = "kubelora.dev/device"
ANN_STARTED_AT = "kubelora.dev/started-at"
ANN_ATTEMPT = "kubelora.dev/attempt"
ANN_ACTIVE_SINCE = "kubelora.dev/active-since"

@dataclass(frozen=True)
class StartRecord:
    """The commit point of a run: what it was started with (module docstring)."""

    spec: dict[str, Any]
    """The stored spec at start (camelCase, server-side defaults included)."""
    generation: int
    device: str | None
    started_at: str | None
    """When the job started (the activeDeadlineSeconds clock before any resume); None in old records."""

    def annotations(self) -> dict[str, str]:
        """The record as the annotations that carry it."""
        out = {
            ANN_STARTED_SPEC: json.dumps(self.spec, sort_keys=True, separators=(",", ":")),
            ANN_STARTED_GENERATION: str(self.generation),
        }
        if self.device:
            out[ANN_DEVICE] = self.device
        if self.started_at:
            out[ANN_STARTED_AT] = self.started_at
        return out

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str], generation: int) -> StartRecord | None:
        """The record carried by these annotations; None without one. Raises ValueError when its spec
        is not JSON (only a hand edit does that). `generation`: for records without their own."""
        if ANN_STARTED_SPEC not in annotations:
            return None
        spec = json.loads(annotations[ANN_STARTED_SPEC])
        if not isinstance(spec, dict):
            raise ValueError(f"{ANN_STARTED_SPEC} is not a JSON object")
        return cls(
            spec=spec,
            generation=int(annotations.get(ANN_STARTED_GENERATION) or generation),
            device=annotations.get(ANN_DEVICE) or None,
            started_at=annotations.get(ANN_STARTED_AT) or None,
        )


def record_from_status(body: Mapping[str, Any]) -> StartRecord:
    """A started resource's record rebuilt from its live spec and status (startTime, placed device),
    where the record itself cannot be read: spec changes after start are refused, so they agree."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    return StartRecord(
        spec=dict(body.get("spec") or {}),
        generation=int(status.get("observedGeneration") or meta.get("generation") or 1),
        device=(status.get("placement") or {}).get("device"),
        started_at=status.get("startTime"),
    )


def record_of_resource(body: Mapping[str, Any]) -> StartRecord | None:
    """The start record an operator before the ConfigMap record wrote on the resource itself, if any."""
    meta = body.get("metadata") or {}
    return StartRecord.from_annotations(meta.get("annotations") or {}, int(meta.get("generation") or 1))


#: Spec fields that may change after start (camelCase, as stored).
RUN_POLICY = ("suspend", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished")


def changed_fields(old: Any, new: Any, prefix: str = "spec") -> list[str]:
    """Dotted paths where two specs differ (run-policy fields ignored at the top level)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            if prefix == "spec" and key in RUN_POLICY:
                continue
            out += changed_fields(old.get(key), new.get(key), f"{prefix}.{key}")
        return out
    return [] if old == new else [prefix]


def effective_spec(started: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    """The started spec with the live run policy."""
    out = {k: v for k, v in started.items() if k not in RUN_POLICY}
    out.update({k: live[k] for k in RUN_POLICY if k in live and live[k] is not None})
    return out
