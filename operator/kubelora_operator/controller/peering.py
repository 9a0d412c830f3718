"""Whether this replica may act, when several run with kopf peering (chart: replicaCount > 1).

Why here: kopf pauses its own watches while another replica is active, but the operator's watches
are its own (list_watch.py), so the pause has to reach the Runner. This watch reads the same peering
objects kopf keeps (kopf writes this replica's entry under the identity `register` gave it) and
decides as kopf 1.45 decides: pause while any live other peer has a higher or the same priority
(kopf pauses every one of several equal peers, itself included, until only one is left alive).
A peer is live until its `lastseen` plus `lifetime` (kopf's keepalive renews it), so the decision is
made at each question against the clock, not only at each event.

While paused the watches keep memory warm and reconciles do nothing (`Runner.trigger`); the resync
pass after the pause catches every resource up.

Priority: a replica's start time in seconds (`Peer.starting`), so that the newest replica is the
active one and the others stand by, as the chart promises; with equal priorities (kopf's default, 0
for all) kopf would pause every replica for good. In a rolling update the new pod takes over and the
old one pauses; when the active one dies, its entry expires after its lifetime and the next newest
resumes.
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from .list_watch import ALL, ListWatch

log = logging.getLogger(__name__)

KOPF_API = "/apis/kopf.dev/v1"
#: kopf's default peer lifetime (seconds) for an entry that does not say its own.
DEFAULT_LIFETIME = 60


class Peer(NamedTuple):
    """This replica in the peering named `name`, as it is given to kopf too (`kopf.run`)."""

    name: str
    identity: str
    priority: int

    @classmethod
    def starting(cls, name: str) -> Peer:
        """A new replica: its identity is the pod, the process and a random tail (a restarted process
        is a new peer, as with kopf's own identities); its priority its start time (module docstring)."""
        host = os.environ.get("POD_ID") or socket.gethostname()
        return cls(name, f"kubelora@{host}/{os.getpid()}/{secrets.token_hex(3)}", int(time.time()))


def _deadline(entry: Mapping[str, Any]) -> float:
    """When a peer's entry expires (seconds since the epoch); 0 when it cannot be read (dead)."""
    try:
        seen = datetime.datetime.fromisoformat(str(entry["lastseen"]).replace("Z", "+00:00"))
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=datetime.timezone.utc)
        return seen.timestamp() + int(entry.get("lifetime") or DEFAULT_LIFETIME)
    except (KeyError, TypeError, ValueError):
        return 0.0


class PeeringWatch(ListWatch):
    """The peering objects named `name` in the operator's scope (module docstring)."""

    WHAT = "peering"

    def __init__(
        self,
        kube: Any,
        namespaces: Sequence[str],
        name: str,
        identity: str,
        priority: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(kube, namespaces)
        self.name, self.identity, self.priority = name, identity, priority
        self._clusterwide = not namespaces
        self._clock = clock
        #: namespace ("" cluster-wide) -> its object's peers as (identity, deadline, priority), parsed
        #: once per event: `active` runs before every reconcile
        self._peers: dict[str, list[tuple[str, float, int]]] = {}
        self._lock = threading.Lock()
        self._was_active: bool | None = None

    def _path(self, scope: str) -> str:
        if self._clusterwide:
            return f"{KOPF_API}/clusterkopfpeerings"
        return f"{KOPF_API}/kopfpeerings" if scope == ALL else f"{KOPF_API}/namespaces/{scope}/kopfpeerings"

    def _params(self) -> dict[str, str]:
        return {"fieldSelector": f"metadata.name={self.name}"}

    def _listed(self, scope: str, items: list[dict[str, Any]], *, report: bool) -> None:
        with self._lock:
            for where in [w for w in self._peers if scope in (ALL, w)]:
                del self._peers[where]
        for obj in items:
            self._apply("ADDED", obj)

    def _apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        if meta.get("name") != self.name:
            return
        where = "" if self._clusterwide else str(meta.get("namespace") or "")
        with self._lock:
            if kind == "DELETED":
                self._peers.pop(where, None)
            else:
                self._peers[where] = [
                    (peer, _deadline(entry), int(entry.get("priority") or 0))
                    for peer, entry in (obj.get("status") or {}).items()
                    if isinstance(entry, Mapping)
                ]

    def active(self) -> bool:
        """True unless a live other peer has a higher or the same priority (logged on each change)."""
        now = self._clock()
        with self._lock:
            rivals = sorted(
                peer
                for peers in self._peers.values()
                for peer, deadline, priority in peers
                if peer != self.identity and deadline > now and priority >= self.priority
            )
            changed, self._was_active = self._was_active != (not rivals), not rivals
        if changed:
            if rivals:
                log.info("peering %s: paused while %s is active", self.name, ", ".join(rivals))
            else:
                log.info("peering %s: active", self.name)
        return not rivals
