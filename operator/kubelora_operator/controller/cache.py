"""What the operator already knows, so that a reconcile reads memory instead of the API server.

Why: without it every reconcile GETs its resource and LISTs its pods, two requests per resource and
resync pass forever, finished resources included, so an idle fleet keeps the API server busy (figures:
docs/benchmarks.md, "Figures behind design choices"). The state is
already streamed to the operator by its watches; this module keeps the part the reconcile reads:

* `pod_index`, the worker pods by owner: `(namespace, lft name) -> (WorkerState, ...)` (the reduced
  pod, a few hundred bytes, never the whole pod), kept by the operator's pod watch (pod_watch.py),
  which updates it before it reports the event and lists every pod before the first reconcile, so
  a restarted operator sees every existing pod (no duplicate creates).
* `CachedKube`, the REST layer with these reads served from memory:
  - `get_lft`: the newest body seen on the LoRAFineTune watch or returned by the operator's own
    patches (newest = higher resourceVersion), a GET only on a miss;
  - `workers`: the index above (a cached LIST without it: tools, tests), plus the pods this
    operator created that the watch has not delivered yet ("expectations", as controller-runtime
    calls them): without them a reconcile right after the create (triggered by our own status
    patch) would see the pods missing and POST them again (409s, wasted requests);
  - `list_nodes`: one list shared by all reconciles for `NODE_LIST_TTL` seconds (placement already
    tolerates a node seen a moment late; without the TTL a burst of N starts lists every node N times).
  - `records`: the start records this process committed or read (record.py), so that a started
    resource's record costs a request only the first time a restarted operator meets it.
  - `claim_index`: the run directories of the namespace's resources (claims.py), which a start with a
    directory on a PVC checks instead of listing every resource.

What stays a quorum read: the one destructive decision taken on an absence (a worker missing while
its peers run restarts the attempt) re-lists the pods from etcd first (`attempt.advance`), and
run-directory ownership lists the resources from etcd where there is no claim index (tools, tests).
Everything else the reconcile does on a cached view is idempotent (deterministic names +
AlreadyExists, uid preconditions) or, for run directories, guarded by the trainer's owner file.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..kube import Kube
from ..plan import LABEL_NAME, LABEL_ROLE, WORKER_ROLE, worker_selector
from .pods import WorkerState, worker_state
from .started import StartRecord

#: Seconds a node list is reused by other reconciles.
NODE_LIST_TTL = 2.0
#: Seconds a created pod counts as existing before the watch shows it (it normally takes milliseconds).
EXPECTATION_TTL = 60.0

Key = tuple[str, str]


def workers_of(index: Mapping[Key, Iterable[WorkerState]], namespace: str, name: str) -> list[WorkerState]:
    """The worker pods of one resource from the index: a dict lookup, no request."""
    return sorted(index_values(index, (namespace, name)), key=lambda w: (w.index, w.name))


def index_values(index: Mapping[Any, Iterable[Any]], key: Any) -> list[Any]:
    """One key's values of an index whose values are tuples replaced whole by the watch threads
    (pod_watch.py, lft_watch.py): a reader never sees one half-written."""
    return list(index.get(key) or ())


def _listed_workers(kube: Kube, namespace: str, name: str) -> list[WorkerState]:
    return [worker_state(p) for p in kube.list_pods(namespace, worker_selector(name), from_cache=True)]


def _slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body without metadata.managedFields (nothing reads them; they are most of its size)."""
    meta = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    return {**body, "metadata": meta}


def _rv(body: Mapping[str, Any] | None) -> int:
    """resourceVersion as a number (etcd's revision); -1 when absent or not numeric."""
    try:
        return int(((body or {}).get("metadata") or {}).get("resourceVersion") or -1)
    except ValueError:
        return -1


class CachedKube(Kube):
    """`Kube` with the resource bodies, worker pods and nodes served from memory (module docstring)."""

    def __init__(self, *args: Any, clock: Callable[[], float] = time.monotonic, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._lock = threading.Lock()
        self._bodies: dict[Key, dict[str, Any]] = {}
        self._own_writes: dict[Key, int] = {}  # resourceVersion returned by our latest patch
        self.pod_index: Mapping[Key, Iterable[WorkerState]] | None = None
        #: namespace -> the resources' run-directory claims (claims.py), kept by lft_watch.py
        self.claim_index: Mapping[str, Iterable[Any]] | None = None
        self._clock = clock
        self._nodes: tuple[float, list[dict[str, Any]]] | None = None
        self._nodes_lock = threading.Lock()
        self._expected: dict[Key, dict[str, tuple[float, WorkerState]]] = {}  # owner -> pod name -> created
        #: resource -> why rank 0's metrics cannot be read (set by the progress pass after repeated
        #: failures, read by the reconcile into the Running condition's message)
        self.metrics_problems: dict[Key, str] = {}
        #: resource -> status keys a pass decided but left to the next pass to write (reconcile.py,
        #: `_carry`); None: every pass writes its own (tests, tools). One pass per resource at a time
        #: (Runner) and single dict operations: no lock needed.
        self.carried_status: dict[Key, dict[str, Any]] | None = None
        #: resource -> (uid, StartRecord): the start records this process wrote or read (record.py).
        #: The operator is their only writer, so what it remembers stays true.
        self.records: dict[Key, tuple[str, StartRecord]] = {}

    # ----- the LoRAFineTune bodies ----------------------------------------------------------------

    def observe_lft(self, event_type: str | None, body: Mapping[str, Any]) -> bool:
        """A watch event of a LoRAFineTune (lft_watch.py): remember the body, forget it when deleted.

        True when the event is the echo of this process's own latest patch of the resource (the same
        resourceVersion as the patch's response): the reconcile that wrote it has seen that state,
        so another one would find nothing to do."""
        meta = body.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        rv = _rv(body)
        with self._lock:
            own = event_type == "MODIFIED" and rv >= 0 and self._own_writes.get(key) == rv
            if own or event_type == "DELETED":
                self._own_writes.pop(key, None)
            if event_type == "DELETED":
                self._bodies.pop(key, None)
                self.records.pop(key, None)
                if self.carried_status is not None:
                    self.carried_status.pop(key, None)
            elif rv >= _rv(self._bodies.get(key)):
                self._bodies[key] = _slim(body)
        return own

    def bodies(self) -> list[dict[str, Any]]:
        """Every known resource's newest body (a snapshot: the periodic passes walk it)."""
        with self._lock:
            return list(self._bodies.values())

    def _remember(self, body: Any) -> None:
        """The object returned by one of our writes, if it is newer than what the watch delivered."""
        if not isinstance(body, dict):
            return
        meta = body.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        with self._lock:
            self._own_writes[key] = _rv(body)
            if key in self._bodies and _rv(body) > _rv(self._bodies.get(key)):
                self._bodies[key] = _slim(body)

    def get_lft(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            body = self._bodies.get((namespace, name))
        if body is not None:
            return body
        body = super().get_lft(namespace, name)
        if body is not None:
            self.observe_lft("GET", body)
        return body

    def patch_lft_status(
        self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str | None = None
    ) -> Any:
        out = super().patch_lft_status(namespace, name, status, resource_version)
        self._remember(out)
        return out

    def patch_lft_annotations(self, namespace: str, name: str, annotations: Mapping[str, str | None]) -> Any:
        out = super().patch_lft_annotations(namespace, name, annotations)
        self._remember(out)
        return out

    # ----- worker pods and nodes ------------------------------------------------------------------

    def create_if_absent(self, obj: Mapping[str, Any]) -> bool:
        created = super().create_if_absent(obj)
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if created and obj.get("kind") == "Pod" and labels.get(LABEL_NAME) and labels.get(LABEL_ROLE) == WORKER_ROLE:
            key = (obj["metadata"]["namespace"], labels[LABEL_NAME])
            with self._lock:
                self._expected.setdefault(key, {})[obj["metadata"]["name"]] = (self._clock(), worker_state(obj))
        return created

    def created_as(self, namespace: str, name: str, state: WorkerState) -> bool:
        """True when `state` (a worker pod of resource `name`, from the watch) is the pod this process
        created, still as it created it (the pass that created it decided with that state)."""
        with self._lock:
            created = (self._expected.get((namespace, name)) or {}).get(state.name)
        return created is not None and dataclasses.replace(state, uid=None) == created[1]

    def workers(self, namespace: str, name: str) -> list[WorkerState]:
        """The resource's worker pods as last seen on the watch (see `workers_of`), plus the ones it
        created that the watch has not shown yet."""
        if self.pod_index is None:
            return _listed_workers(self, namespace, name)
        seen = workers_of(self.pod_index, namespace, name)
        key = (namespace, name)
        with self._lock:
            expected = self._expected.get(key)
            if not expected:
                return seen
            now, names = self._clock(), {w.name for w in seen}
            for pod, (t, _) in list(expected.items()):
                if pod in names or now - t > EXPECTATION_TTL:
                    del expected[pod]
            extra = [w for _, w in expected.values()]
            if not expected:
                del self._expected[key]
        return sorted(seen + extra, key=lambda w: (w.index, w.name))

    def list_nodes(self) -> list[dict[str, Any]]:
        """All nodes, one list per NODE_LIST_TTL seconds for all reconciles (the first caller lists)."""
        with self._nodes_lock:
            now = self._clock()
            if self._nodes is None or now - self._nodes[0] >= NODE_LIST_TTL:
                self._nodes = (now, super().list_nodes())
            return self._nodes[1]


def metrics_problem(kube: Kube, namespace: str, name: str) -> str | None:
    """Why the progress pass cannot read this resource's metrics, when it has given up for now."""
    return kube.metrics_problems.get((namespace, name)) if isinstance(kube, CachedKube) else None


def cached_workers(kube: Kube, namespace: str, name: str) -> list[WorkerState]:
    """The worker pods as the reconcile observes them: the index when there is one, else a cached LIST."""
    if isinstance(kube, CachedKube):
        return kube.workers(namespace, name)
    return _listed_workers(kube, namespace, name)
