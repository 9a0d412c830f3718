"""Status conditions: the fixed vocabulary and pure functions over Kubernetes-style condition lists.

Why a fixed vocabulary: users, dashboards and tests match on `type` and `reason`, so they must not
drift between handlers. Why pure functions over plain dicts: kopf hands handlers `status` as JSON-like
mappings and patches them back, so the helpers take and return exactly that shape (camelCase keys),
never mutating their input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]


class ConditionType(str, Enum):
    """Condition types a LoRAFineTune can carry (each at most once)."""

    VALIDATED = "Validated"
    """The spec passed schema, model and reference checks (Secrets, PVCs exist)."""
    SCHEDULED = "Scheduled"
    """A placement was decided and worker pods exist / are bound to nodes."""
    RUNNING = "Running"
    """All workers of the current attempt are running."""
    SUCCEEDED = "Succeeded"
    """Training finished and the artifact was delivered."""
    FAILED = "Failed"
    """The run ended without an artifact (terminal)."""
    SUSPENDED = "Suspended"
    """`spec.suspend` is true and no worker pods exist."""
    SPEC_CHANGE_REFUSED = "SpecChangeRefused"
    """A spec change after start was not applied to the running job."""


class ConditionReason(str, Enum):
    """Machine-readable reasons (CamelCase, as Kubernetes conventions ask)."""

    # Validated
    SPEC_VALID = "SpecValid"
    INVALID_SPEC = "InvalidSpec"
    SECRET_NOT_FOUND = "SecretNotFound"
    PVC_NOT_FOUND = "PVCNotFound"
    CONFIG_MAP_NOT_FOUND = "ConfigMapNotFound"
    RUN_DIR_IN_USE = "RunDirInUse"
    # Scheduled
    NO_MATCHING_NODES = "NoMatchingNodes"
    PODS_CREATED = "PodsCreated"
    PODS_SCHEDULED = "PodsScheduled"
    PODS_PENDING = "PodsPending"
    WAITING_FOR_NODES = "WaitingForNodes"
    # Running
    WORKERS_STARTING = "WorkersStarting"
    WORKERS_RUNNING = "WorkersRunning"
    RESTARTING = "Restarting"
    FETCHING_SOURCES = "FetchingSources"
    SOURCES_FETCHED = "SourcesFetched"
    # Succeeded / Failed
    TRAINING_COMPLETE = "TrainingComplete"
    WORKER_FAILED = "WorkerFailed"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    NODES_NOT_AVAILABLE = "NodesNotAvailable"
    API_ERROR = "ApiError"
    SOURCE_UNAVAILABLE = "SourceUnavailable"
    # Suspended
    SUSPENDED_BY_USER = "SuspendedByUser"
    RESUMED = "Resumed"
    # SpecChangeRefused
    SPEC_CHANGED_AFTER_START = "SpecChangedAfterStart"


class Phase(str, Enum):
    """One-word summary of the conditions, for `kubectl get` (status.phase)."""

    PENDING = "Pending"
    INVALID = "Invalid"
    UNSCHEDULABLE = "Unschedulable"
    STARTING = "Starting"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


def format_time(now: datetime) -> str:
    """RFC 3339 in UTC with a `Z` and whole seconds, as Kubernetes writes metav1.Time."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status_str(status: bool | str) -> ConditionStatus:
    if isinstance(status, bool):
        return "True" if status else "False"
    if status not in ("True", "False", "Unknown"):
        raise ValueError(f"condition status must be True, False or Unknown, not {status!r}")
    return status  # type: ignore[return-value]


def _value(v: Enum | str) -> str:
    return v.value if isinstance(v, Enum) else str(v)


def get_condition(conditions: Sequence[Mapping[str, Any]] | None, type_: ConditionType | str) -> dict[str, Any] | None:
    """The condition of this type (a copy), or None."""
    wanted = _value(type_)
    for cond in conditions or ():
        if cond.get("type") == wanted:
            return dict(cond)
    return None


def is_true(conditions: Sequence[Mapping[str, Any]] | None, type_: ConditionType | str) -> bool:
    """Whether the condition exists with status True."""
    cond = get_condition(conditions, type_)
    return cond is not None and cond.get("status") == "True"


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None,
    type_: ConditionType | str,
    status: bool | ConditionStatus,
    reason: ConditionReason | str,
    message: str,
    generation: int | None,
    now: datetime | str,
) -> list[dict[str, Any]]:
    """Return a new list with the condition of `type_` set; the input is not changed.

    `lastTransitionTime` moves only when the status flips (Kubernetes semantics: it answers "since
    when is this true/false", not "when did we last look"); reason, message and observedGeneration
    always take the new values. A new type is appended so that existing order stays stable.
    """
    stamp = now if isinstance(now, str) else format_time(now)
    new: dict[str, Any] = {
        "type": _value(type_),
        "status": _status_str(status),
        "reason": _value(reason),
        "lastTransitionTime": stamp,
    }
    if message:
        # An empty message is left out rather than written as "": absent means the same, and the
        # project's local v1.20 control plane turns "" inside custom resources into null (422).
        new["message"] = message
    if generation is not None:
        new["observedGeneration"] = generation
    out: list[dict[str, Any]] = []
    replaced = False
    for cond in conditions or ():
        if cond.get("type") == new["type"] and not replaced:
            if cond.get("status") == new["status"] and cond.get("lastTransitionTime"):
                new["lastTransitionTime"] = cond["lastTransitionTime"]
            out.append(new)
            replaced = True
        else:
            out.append(dict(cond))
    if not replaced:
        out.append(new)
    return out


def remove_condition(
    conditions: Sequence[Mapping[str, Any]] | None, type_: ConditionType | str
) -> list[dict[str, Any]]:
    """Return a new list without the condition of `type_`."""
    wanted = _value(type_)
    return [dict(c) for c in conditions or () if c.get("type") != wanted]


def phase_of(conditions: Sequence[Mapping[str, Any]] | None) -> Phase:
    """Derive the one-word phase from the conditions (terminal states win, then user intent).

    Order: Succeeded, Failed, Invalid (Validated=False), Suspended, Running, Restarting,
    Unschedulable (Scheduled=False with NoMatchingNodes), Starting (Scheduled=True), else Pending.
    """
    if is_true(conditions, ConditionType.SUCCEEDED):
        return Phase.SUCCEEDED
    if is_true(conditions, ConditionType.FAILED):
        return Phase.FAILED
    validated = get_condition(conditions, ConditionType.VALIDATED)
    if validated is not None and validated.get("status") == "False":
        return Phase.INVALID
    if is_true(conditions, ConditionType.SUSPENDED):
        return Phase.SUSPENDED
    running = get_condition(conditions, ConditionType.RUNNING)
    if running is not None:
        if running.get("status") == "True":
            return Phase.RUNNING
        if running.get("reason") == ConditionReason.RESTARTING.value:
            return Phase.RESTARTING
    scheduled = get_condition(conditions, ConditionType.SCHEDULED)
    if scheduled is not None:
        if scheduled.get("status") == "True":
            return Phase.STARTING
        if scheduled.get("reason") == ConditionReason.NO_MATCHING_NODES.value:
            return Phase.UNSCHEDULABLE
    return Phase.PENDING
