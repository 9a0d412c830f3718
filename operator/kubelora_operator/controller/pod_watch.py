"""The operator's watch of its own pods (worker and fetch pods), outside kopf.

Why not a kopf watch: pods make two thirds of the events the operator receives (each worker pod is
created, bound, started, finished: 4,000 events for 1,000 two-worker starts), and kopf spends its
per-event machinery on each (a worker task per object, the body wrapped and patched into kopf's
views, indexers and handler selection), on the same event loop as the LoRAFineTune events, while the
operator only needs a few fields per pod. Measured with `bench/operator_scale.py`:
docs/operator-benchmark.md, "2026-12-03, fifth round".

What this module keeps, as kopf's index did:

* the worker pods by owner, `(namespace, resource name) -> (WorkerState, ...)` (`PodWatch.index`,
  read by `cache.workers_of`): a tuple per owner, replaced whole on every change, so reconciles on
  other threads read it without a lock and never see it half-written;
* complete before any reconcile reads it: `list_all` runs in the operator's startup handler, which
  kopf finishes before it starts any watch, so no LoRAFineTune event is handled earlier (a restarted
  operator sees every existing pod: no duplicate creates). Until then `CachedKube.workers` LISTs.

What it calls: `on_event(namespace, owner, event_type, pod)` for every event of a pod of the
operator's (worker or fetch role), after the index has the event; the Runner decides whether a
reconcile is due (`Runner.pod_event`).

The watch resumes from the last resourceVersion it saw (bookmarks keep it fresh while nothing
changes); when that has expired (410 Gone) it lists again and reports what the listing changed: the
worker pods that went away as DELETED, every listed pod as MODIFIED (the Runner skips unchanged
states). A fetch pod that went away during such a gap is caught by the resync pass.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..fetch import FETCH_ROLE
from ..kube import ApiError, Kube
from ..plan import LABEL_NAME, LABEL_ROLE, WORKER_ROLE
from .pods import WorkerState, worker_state

log = logging.getLogger(__name__)

Key = tuple[str, str]
PodEvent = Callable[[str, str, str, Mapping[str, Any]], object]

#: The label selector of the operator's pod watch: worker pods and fetch pods (fetch.py), and no
#: other pod of the cluster (server-side, which matters cluster-wide).
POD_SELECTOR = f"{LABEL_NAME},{LABEL_ROLE} in ({FETCH_ROLE},{WORKER_ROLE})"
#: Seconds the API server keeps one watch request open; the watch then resumes where it was.
WATCH_SECONDS = 300
#: Seconds without a byte (bookmarks arrive about every minute) before the connection counts as dead.
READ_TIMEOUT = WATCH_SECONDS + 30
#: Seconds to wait before watching again after a connection problem (doubling up to RETRY_MAX).
RETRY_DELAY, RETRY_MAX = 1.0, 30.0
#: The pseudo-namespace of a cluster-wide watch.
ALL = ""
GLOB_CHARS = "*?[!"


def watch_scopes(namespaces: Sequence[str]) -> tuple[list[str], Callable[[str], bool]]:
    """The namespaces to list and watch (`[ALL]` for cluster-wide) and which namespaces to accept.

    Plain names are watched one by one (a namespaced operator may read pods only there); kopf-style
    patterns (`team-*`, `!team-x`) need a cluster-wide watch, filtered here as kopf filters them."""
    if not namespaces:
        return [ALL], lambda ns: True
    if not any(c in n for n in namespaces for c in GLOB_CHARS):
        return list(dict.fromkeys(namespaces)), lambda ns: True
    include = [n for n in namespaces if not n.startswith("!")]
    exclude = [n[1:] for n in namespaces if n.startswith("!")]

    def wanted(ns: str) -> bool:
        ok = not include or any(fnmatch.fnmatchcase(ns, p) for p in include)
        return ok and not any(fnmatch.fnmatchcase(ns, p) for p in exclude)

    return [ALL], wanted


def _pods_path(namespace: str) -> str:
    return "/api/v1/pods" if namespace == ALL else f"/api/v1/namespaces/{namespace}/pods"


class Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class PodWatch:
    """List + watch of the operator's pods in its namespaces (module docstring)."""

    def __init__(self, kube: Kube, namespaces: Sequence[str], on_event: PodEvent) -> None:
        self.kube = kube
        self.on_event = on_event
        self.scopes, self._wanted = watch_scopes(namespaces)
        #: (namespace, owner) -> the owner's worker pods (see module docstring); written by the watch
        #: threads only, under `_lock`
        self.index: dict[Key, tuple[WorkerState, ...]] = {}
        self._lock = threading.Lock()
        self._versions: dict[str, str] = {}  # scope -> resourceVersion to resume from
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ----- listing --------------------------------------------------------------------------------

    def list_all(self) -> None:
        """List every scope and fill the index; no events (the resources' own initial listing
        reconciles each of them, and reads the index). Raises ApiError (the caller retries)."""
        for scope in self.scopes:
            self._list(scope, report=False)

    def _list(self, scope: str, *, report: bool) -> None:
        out = self.kube.request("GET", _pods_path(scope), params={"labelSelector": POD_SELECTOR}) or {}
        pods = [(p, ours) for p in out.get("items") or () if (ours := self._ours(p)) is not None]
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
            self._versions[scope] = str((out.get("metadata") or {}).get("resourceVersion") or "")
        if report:
            for (ns, owner), w in gone:
                self.on_event(ns, owner, "DELETED", {"metadata": {"name": w.name, "namespace": ns, "uid": w.uid}})
            for p, ((ns, owner), _) in pods:
                self.on_event(ns, owner, "MODIFIED", p)

    def _ours(self, pod: Mapping[str, Any]) -> tuple[Key, str] | None:
        """((namespace, owner), role) of a pod of the operator's in a wanted namespace, else None."""
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        ns, owner, role = meta.get("namespace") or "", labels.get(LABEL_NAME), labels.get(LABEL_ROLE)
        if not ns or not owner or role not in (WORKER_ROLE, FETCH_ROLE) or not self._wanted(ns):
            return None
        return (ns, owner), role

    # ----- watching -------------------------------------------------------------------------------

    def start(self) -> None:
        """One daemon thread per scope, watching from where `list_all` ended."""
        for scope in self.scopes:
            t = threading.Thread(target=self._run, args=(scope,), name=f"kubelora-pods-{scope or 'all'}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self.kube.close_watches()
        for t in self._threads:
            t.join(timeout=5)

    def _run(self, scope: str) -> None:
        delay = RETRY_DELAY
        while not self._stop.is_set():
            try:
                if self._watch(scope):
                    delay = RETRY_DELAY
                else:  # ended without a byte (no bookmarks, or a proxy that cuts streams): do not spin
                    self._stop.wait(delay)
                    delay = min(RETRY_MAX, delay * 2)
                continue
            except Gone:
                log.info("pod watch of %s: resourceVersion expired; listing again", scope or "all namespaces")
            except ApiError as err:
                if self._stop.is_set():
                    return
                log.warning("pod watch of %s: %s; again in %.0f s", scope or "all namespaces", err, delay)
                self._stop.wait(delay)
                delay = min(RETRY_MAX, delay * 2)
            except Exception:  # noqa: BLE001 - a bug in one event must not end the watch for good
                log.exception("pod watch of %s failed; listing again", scope or "all namespaces")
                self._stop.wait(delay)
                delay = min(RETRY_MAX, delay * 2)
            try:
                if not self._stop.is_set():
                    self._list(scope, report=True)
            except ApiError as err:
                log.warning("pod list of %s: %s", scope or "all namespaces", err)

    def _watch(self, scope: str) -> bool:
        """One watch request from the scope's resourceVersion; True if it delivered any event."""
        params = {
            "labelSelector": POD_SELECTOR,
            "resourceVersion": self._versions[scope],
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        got = False
        for event in self.kube.watch(_pods_path(scope), params, READ_TIMEOUT):
            if self._stop.is_set():
                return got
            got = True
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Gone()
                raise ApiError("WATCH", _pods_path(scope), int(obj.get("code") or 0), str(obj.get("message") or obj))
            version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
            if kind != "BOOKMARK":
                self._apply(str(kind), obj)
            if version:
                self._versions[scope] = version
        return got

    def _apply(self, kind: str, pod: Mapping[str, Any]) -> None:
        """The index first, then `on_event`: the reconcile it triggers reads the new state."""
        ours = self._ours(pod)
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
