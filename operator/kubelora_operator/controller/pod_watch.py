"""The operator's watch of its own pods (worker and fetch pods), outside kopf (list_watch.py).

Why it was the first watch taken off kopf: pods make two thirds of the events the operator receives (each worker pod is
created, bound, started, finished: 4,000 events for 1,000 two-worker starts), and kopf spends its
per-event machinery on each (a worker task per object, the body wrapped and patched into kopf's
views, indexers and handler selection), on the same event loop as the LoRAFineTune events, while the
operator only needs a few fields per pod. Measured with `bench/operator_scale.py`:
docs/operator-benchmark.md, "2026-12-03, fifth round".

What this module keeps, as kopf's index did:

* the worker pods by owner, `(namespace, resource name) -> (WorkerState, ...)` (`PodWatch.index`,
  read by `cache.workers_of`): a tuple per owner, replaced whole on every change, so reconciles on
  other threads read it without a lock and never see it half-written;
* complete before any reconcile reads it: `list_all` runs in the operator's startup handler before
  the resources are listed and any reconcile is queued (controller/__init__.py, `register`), so a
  restarted operator sees every existing pod: no duplicate creates. Until then `CachedKube.workers`
  LISTs.

What it calls: `on_event(namespace, owner, event_type, pod)` for every event of a pod of the
operator's (worker or fetch role), after the index has the event; the Runner decides whether a
reconcile is due (`Runner.pod_event`).

Listing, watching, resuming: list_watch.py. After a 410 Gone the listing reports what it changed:
the worker pods that went away as DELETED, every listed pod as MODIFIED (the Runner skips unchanged
states). A fetch pod that went away during such a gap is caught by the resync pass.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..fetch import FETCH_ROLE
from ..kube import Kube
from ..plan import LABEL_NAME, LABEL_ROLE, WORKER_ROLE
from .list_watch import ALL, ListWatch
from .pods import WorkerState, worker_state

log = logging.getLogger(__name__)

Key = tuple[str, str]
PodEvent = Callable[[str, str, str, Mapping[str, Any]], object]

#: The label selector of the operator's pod watch: worker pods and fetch pods (fetch.py), and no
#: other pod of the cluster (server-side, which matters cluster-wide).
POD_SELECTOR = f"{LABEL_NAME},{LABEL_ROLE} in ({FETCH_ROLE},{WORKER_ROLE})"


class PodWatch(ListWatch):
    """List + watch of the operator's pods in its namespaces (module docstring)."""

    WHAT = "pod"
    SELECTOR = POD_SELECTOR

    def __init__(self, kube: Kube, namespaces: Sequence[str], on_event: PodEvent) -> None:
        super().__init__(kube, namespaces)
        self.on_event = on_event
        #: (namespace, owner) -> the owner's worker pods (see module docstring); written by the watch
        #: threads only, under `_lock`
        self.index: dict[Key, tuple[WorkerState, ...]] = {}
        self._lock = threading.Lock()

    def _path(self, scope: str) -> str:
        return "/api/v1/pods" if scope == ALL else f"/api/v1/namespaces/{scope}/pods"

    def _listed(self, scope: str, items: list[dict[str, Any]], *, report: bool) -> None:
        pods = [(p, ours) for p in items if (ours := _ours(p)) is not None]
        fresh: dict[Key, tuple[WorkerState, ...]] = {}
        for p, (key, role) in pods:
            if role == WORKER_ROLE:
                fresh[key] = (*fresh.get(key, ()), worker_state(p))
        with self._lock:
            listed = {(key, w.name) for key, states in fresh.items() for w in states}
            old = [key for key in self.index if scope in (ALL, key[0])]
            gone = [(key, w) for key in old for w in self.index[key] if (key, w.name) not in listed]
            for key in old:
                del self.index[key]
            self.index.update(fresh)
        if report:
            for (ns, owner), w in gone:
                self.on_event(ns, owner, "DELETED", {"metadata": {"name": w.name, "namespace": ns, "uid": w.uid}})
            for p, ((ns, owner), _) in pods:
                self.on_event(ns, owner, "MODIFIED", p)

    def _apply(self, kind: str, pod: Mapping[str, Any]) -> None:
        """The index first, then `on_event`: the reconcile it triggers reads the new state."""
        ours = _ours(pod)
        if ours is None:
            return
        (ns, owner), role = ours
        if role == WORKER_ROLE:
            state = worker_state(pod)
            with self._lock:
                others = tuple(w for w in self.index.get((ns, owner), ()) if w.name != state.name)
                if kind == "DELETED":
                    if others:
                        self.index[(ns, owner)] = others
                    else:
                        self.index.pop((ns, owner), None)
                else:
                    self.index[(ns, owner)] = (*others, state)
        self.on_event(ns, owner, kind, pod)


def _ours(pod: Mapping[str, Any]) -> tuple[Key, str] | None:
    """((namespace, owner), role) of a pod of the operator's, else None (the namespace was checked
    by the watch)."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    ns, owner, role = meta.get("namespace") or "", labels.get(LABEL_NAME), labels.get(LABEL_ROLE)
    if not ns or not owner or role not in (WORKER_ROLE, FETCH_ROLE):
        return None
    return (ns, owner), role
