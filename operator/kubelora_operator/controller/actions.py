"""The reconcile's small shared actions: delete worker pods, mark a run failed, place, make an ssh key.

Each is one idempotent API effect (or one status change) used by several steps of reconcile.py and
attempt.py; they decide nothing themselves.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from ..api import LoRAFineTuneSpec
from ..conditions import ConditionReason as R
from ..conditions import ConditionType as T
from ..kube import Kube
from ..placement import NodeFacts, PlacementDecision, decide_placement
from ..plan import worker_selector
from ..settings import OperatorSettings
from .pods import WorkerState, worker_state
from .status import StatusUpdate


def parse_time(stamp: str) -> datetime:
    """A condition/status timestamp (`format_time`'s format) as an aware datetime."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def delete_pods(kube: Kube, namespace: str, pods: Sequence[WorkerState], *, keep_terminated: bool) -> int:
    """Delete these pods (this incarnation only: uid precondition); pods already being deleted and,
    with `keep_terminated`, finished ones (kept for `kubectl logs`) are left. Returns how many went."""
    n = 0
    for w in pods:
        if w.deleting or (keep_terminated and w.terminated):
            continue
        if kube.delete_pod(namespace, w.name, uid=w.uid):
            n += 1
    return n


def stop_pods(kube: Kube, namespace: str, name: str, *, keep_terminated: bool) -> None:
    """Delete a resource's worker pods as etcd lists them (the error path: no cached view trusted)."""
    pods = [worker_state(p) for p in kube.list_pods(namespace, worker_selector(name))]
    delete_pods(kube, namespace, pods, keep_terminated=keep_terminated)


def fail(u: StatusUpdate, reason: R, message: str) -> None:
    """Failed=True (with a Warning Event), Running=False, completionTime, no ready workers."""
    u.condition(T.FAILED, True, reason, message, event="Warning")
    u.condition(T.RUNNING, False, reason, message)
    u.status.setdefault("completionTime", u.stamp)
    total = (u.status.get("workers") or {}).get("total")
    if total is not None:
        u.status["workers"] = {"ready": 0, "total": total}


def place(kube: Kube, settings: OperatorSettings, spec: LoRAFineTuneSpec) -> PlacementDecision:
    nodes = [NodeFacts.from_k8s(node) for node in kube.list_nodes()]
    return decide_placement(spec, nodes, settings)


def ssh_keypair(comment: str) -> tuple[str, str]:
    """An ed25519 key pair for mpirun's sshd (ssh-keygen must be on PATH in the operator image)."""
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "id"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
            check=True,
            capture_output=True,
            env={**os.environ, "LC_ALL": "C"},
        )
        return key.read_text(), (Path(tmp) / "id.pub").read_text()
