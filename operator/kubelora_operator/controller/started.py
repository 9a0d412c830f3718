"""What the operator remembers between reconciles: annotations on the resource, and the started spec.

Never `status` (which is for users) and never only memory (cache.py merely mirrors the cluster):

* `kubelora.dev/started-spec`: the spec the job was started with (JSON). It is written *before* the
  first child is created (the commit point); later attempts are planned from it, and a spec change
  after start is compared against it and refused (SpecChangeRefused names the fields). Only the run
  policy (`RUN_POLICY`) is taken from the live spec.
* `kubelora.dev/started-generation`, `kubelora.dev/device` (the placed device, so that `auto` never
  flips between attempts), `kubelora.dev/attempt` (the pods' `kubelora.dev/attempt` label),
  `kubelora.dev/active-since` (start of the activeDeadlineSeconds clock: set at start and reset on
  resume, as Kubernetes Jobs do; time spent suspended does not count).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ANN_STARTED_SPEC = "kubelora.dev/started-spec"
ANN_STARTED_GENERATION = "kubelora.dev/started-generation"
ANN_DEVICE = "kubelora.dev/device"
ANN_ATTEMPT = "kubelora.dev/attempt"
ANN_ACTIVE_SINCE = "kubelora.dev/active-since"

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
