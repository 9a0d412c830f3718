"""Reading worker pods: what the kubelet reported, reduced to the facts the reconcile acts on.

Pure functions over pod dicts (as the API returns them), so the rules (which exit code means what,
where the artifact info comes from) are unit-tested without a cluster.

Exit codes and the termination message are the trainer's (`kubelora_trainer.contract`, which the
pods' launcher wrapper carries through torchrun/mpirun): 0 success (the artifact JSON), 2 bad input,
143 preempted by SIGTERM after a checkpoint, each failure with the trainer's one-line message.
Anything else is a failure that a restart from the newest checkpoint may fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubelora_trainer.contract import EXIT_BAD_INPUT

from ..plan import CONTAINER_NAME, LABEL_ATTEMPT, LABEL_WORKER_INDEX


@dataclass(frozen=True)
class WorkerState:
    """One worker pod, reduced."""

    name: str
    index: int
    attempt: int
    phase: str
    node: str | None
    ip: str | None
    deleting: bool
    exit_code: int | None
    message: str | None
    """The container's termination message (or the kubelet's reason when there is none)."""
    uid: str | None
    unschedulable: str | None
    """The scheduler's message while the pod cannot be placed."""
    waiting: str | None = None
    """Why the container is not running yet (e.g. `ImagePullBackOff: ...`), when the kubelet says."""

    @property
    def failed(self) -> bool:
        return self.phase == "Failed" or (self.exit_code is not None and self.exit_code != 0)

    @property
    def succeeded(self) -> bool:
        return self.phase == "Succeeded" and not self.failed

    @property
    def running(self) -> bool:
        return self.phase == "Running" and self.exit_code is None

    @property
    def terminated(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    def describe_failure(self) -> str:
        """`worker 1 (demo-worker-1) exited with code 1: message`."""
        what = f"worker {self.index} ({self.name})"
        if self.exit_code is not None:
            what += f" exited with code {self.exit_code}"
        else:
            what += " failed"
        return what + (f": {self.message}" if self.message else "")


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def worker_state(pod: Mapping[str, Any]) -> WorkerState:
    """Reduce a pod to a WorkerState."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    exit_code: int | None = None
    message: str | None = None
    statuses = status.get("containerStatuses") or []
    trainer = next((c for c in statuses if c.get("name") == CONTAINER_NAME), statuses[0] if statuses else None)
    waiting: str | None = None
    if trainer is not None:
        wait = (trainer.get("state") or {}).get("waiting") or {}
        if wait.get("reason") and wait.get("reason") != "ContainerCreating":
            waiting = wait["reason"] + (f": {wait['message']}" if wait.get("message") else "")
        terminated = (trainer.get("state") or {}).get("terminated")
        if terminated:
            exit_code = _int(terminated.get("exitCode"), 1)
            message = (terminated.get("message") or "").strip() or terminated.get("reason") or None
    if message is None and status.get("phase") == "Failed":
        message = status.get("message") or status.get("reason") or None
    unschedulable = None
    for cond in status.get("conditions") or ():
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            unschedulable = cond.get("message") or cond.get("reason") or "not scheduled yet"
    return WorkerState(
        name=meta.get("name", ""),
        index=_int(labels.get(LABEL_WORKER_INDEX), -1),
        attempt=_int(labels.get(LABEL_ATTEMPT), -1),
        phase=status.get("phase") or "Pending",
        node=spec.get("nodeName") or None,
        ip=status.get("podIP") or None,
        deleting=bool(meta.get("deletionTimestamp")),
        exit_code=exit_code,
        message=message,
        uid=meta.get("uid"),
        unschedulable=unschedulable,
        waiting=waiting,
    )


def first_failure(workers: Sequence[WorkerState]) -> WorkerState | None:
    """The failed worker to report: bad input first (it explains the others), then the lowest index."""
    failed = sorted((w for w in workers if w.failed), key=lambda w: (w.exit_code != EXIT_BAD_INPUT, w.index))
    return failed[0] if failed else None
