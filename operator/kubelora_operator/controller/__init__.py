"""The controller: the operator's watches, thin triggers around `reconcile.reconcile`, the progress scrape.

Triggers (all run the same level-based reconcile of one LoRAFineTune):

* the operator's own watch of the resources (lft_watch.py; its initial listing, ADDED, MODIFIED):
  level-based, so it needs no create/update/resume bookkeeping; the echo of the operator's own patch
  is skipped (the pass that wrote it saw that state);
* its own watch of its worker and fetch pods (pod_watch.py), so pod phases reach status (neither
  watch is kopf's: list_watch.py says why; kopf runs the startup and cleanup, peering and liveness);
* a resync pass every `resyncSeconds` (resync.py, from the cache): NoMatchingNodes and missing
  references are re-evaluated (a node or Secret added later unblocks the run),
  activeDeadlineSeconds/ttlSecondsAfterFinished are checked, missed events are caught up;
* a progress pass every `progressSeconds` over the Running ones: rank 0's metrics -> `status.progress`.

The watches only queue the reconcile by resource (deferred.py): an event never waits for a
thread, with its body; pod events wait `POD_EVENT_DELAY` so that the pods of one resource that
change together cost one reconcile.

What the reconcile reads comes from memory (cache.py): the pod watch's index of the worker pods by
owner and the LoRAFineTune bodies from the resource watch (plus the operator's own patch
responses). A resync of a settled resource therefore sends no request at all.

Why pod events are filtered: many pod updates change nothing the reconcile reads (the kubelet's
condition timestamps, readiness probes). The Runner remembers each worker pod's reduced state
(`WorkerState`: phase, node, exit code, ...) and triggers only when it changed or the pod went away;
the ADDED event of a pod this process created, in the state it created it in, triggers nothing
either (the pass that created it decided with that state; the scheduler's binding is the next
event); the resync pass still catches anything missed.

Why `Runner` coalesces: the triggers above run on several threads (the queues' pools, the resync
pass) and can fire for the same resource at once. Two reconciles of one resource at once could both
start a restart; instead, a trigger that finds a reconcile of its resource running only marks it
dirty, and the running one does one more pass. Nothing waits on a lock, so threads are never held.

Errors: transient API errors become `kopf.TemporaryError` (logged by the queues: the next event or
resync pass runs the reconcile again); permanent ones are recorded by the reconcile as Failed/ApiError.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import kopf

from ..kube import Conflict, Kube, PermanentApiError, TransientApiError
from ..settings import OperatorSettings
from ..wiring import worker_name
from .attempt import CREATE_THREADS
from .cache import CachedKube
from .deferred import Deferred
from .lft_watch import LftWatch
from .list_watch import stop_all
from .peering import Peer, PeeringWatch
from .pod_watch import PodWatch
from .pods import WorkerState, worker_state
from .progress import EVENT_METRICS_UNREACHABLE, SCRAPE_FAILURES_TO_REPORT, scrape
from .reconcile import reconcile
from .resync import PASS_THREADS, Periodic

log = logging.getLogger(__name__)

Key = tuple[str, str]

#: Seconds a reconcile triggered by worker pod events waits, so that the pods of one resource that
#: change together (created, bound, started) cost one reconcile and one status patch (deferred.py).
POD_EVENT_DELAY = 1.0
#: Threads running those reconciles.
POD_EVENT_THREADS = 8
#: Threads running the reconciles of the resources' own events (creates, spec changes).
RECONCILE_THREADS = 32
#: Threads that call the API server at once at most: the REST layer pools as many connections.
API_THREADS = RECONCILE_THREADS + POD_EVENT_THREADS + CREATE_THREADS + PASS_THREADS


class Runner:
    """Runs reconciles, at most one per resource at a time, coalescing triggers that arrive meanwhile."""

    def __init__(
        self, kube: Kube, settings: OperatorSettings, fn: Callable[[Kube, OperatorSettings, str, str], None] = reconcile
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.fn = fn
        self._lock = threading.Lock()
        self._running: set[Key] = set()
        self._dirty: set[Key] = set()
        self._pod_states: dict[str, WorkerState] = {}  # pod uid -> state last acted on
        self._seen_states: dict[Key, dict[str, WorkerState]] = {}  # deferred: states not acted on yet
        self._resources: Deferred | None = None
        self._pods: Deferred | None = None
        self._scrape_failures: dict[Key, int] = {}  # consecutive failed scrapes per resource
        #: False while another replica is active (peering.py): then no reconcile or scrape acts.
        self.active: Callable[[], bool] = lambda: True

    def start_queues(self, pod_delay: float = POD_EVENT_DELAY) -> None:
        """From now on, `resource_event` and `pod_event` queue their reconcile (deferred.py) instead
        of running it in the caller's thread; pod events wait `pod_delay` seconds."""
        self._resources = Deferred(self._queued_reconcile, 0.0, RECONCILE_THREADS, "kubelora-reconcile")
        self._pods = Deferred(self._pod_reconcile, pod_delay, POD_EVENT_THREADS, "kubelora-pod-events")

    def stop_queues(self) -> None:
        for queue in (self._resources, self._pods):
            if queue is not None:
                queue.stop()

    def pending(self) -> int:
        """Reconciles queued and not started yet."""
        return sum(q.pending() for q in (self._resources, self._pods) if q is not None)

    def resource_event(self, namespace: str, name: str) -> None:
        """Reconcile after an event of the resource itself: queued, or at once without queues."""
        if self._resources is None:
            self.trigger(namespace, name)
        else:
            self._resources.schedule((namespace, name))

    def pod_event(self, namespace: str, owner: str, event_type: str | None, pod: Mapping[str, Any]) -> bool:
        """Reconcile `owner` (queued, or at once without queues) if this worker pod event changed what
        the reconcile reads; True if it did.

        The state is remembered only after that reconcile ran, so an event whose reconcile failed
        (TemporaryError) is not skipped when it comes again.
        """
        uid = str((pod.get("metadata") or {}).get("uid") or "")
        key = (namespace, owner)
        if event_type == "DELETED":
            with self._lock:
                self._pod_states.pop(uid, None)
                self._seen_states.get(key, {}).pop(uid, None)
            self._reconcile_for_pods(key, {})
            return True
        state = worker_state(pod)
        with self._lock:
            if uid and self._pod_states.get(uid) == state:
                return False
        if uid and event_type == "ADDED" and isinstance(self.kube, CachedKube) and self.kube.created_as(namespace, owner, state):
            with self._lock:
                self._pod_states[uid] = state
            return False
        self._reconcile_for_pods(key, {uid: state} if uid else {})
        return True

    def _reconcile_for_pods(self, key: Key, states: dict[str, WorkerState]) -> None:
        """Reconcile now (no queues) or queue it; the states count as acted on once it ran."""
        if self._pods is None:
            self.trigger(*key)
            with self._lock:
                self._pod_states.update(states)
            return
        with self._lock:
            self._seen_states.setdefault(key, {}).update(states)
        self._pods.schedule(key)

    def _pod_reconcile(self, key: Key) -> None:
        with self._lock:
            states = self._seen_states.pop(key, {})
        if self._queued_reconcile(key):
            with self._lock:
                self._pod_states.update(states)
        # else not remembered: the same pod state triggers again

    def _queued_reconcile(self, key: Key) -> bool:
        """A queued reconcile; True when it ran (a transient error is logged: kopf does not retry
        events, the next event or resync pass runs it again)."""
        try:
            self.trigger(*key)
        except kopf.TemporaryError as err:
            log.warning("%s/%s: %s", key[0], key[1], err)
            return False
        return True

    def trigger(self, namespace: str, name: str, retry: int = 0) -> None:
        if not self.active():
            return
        key = (namespace, name)
        with self._lock:
            if key in self._running:
                self._dirty.add(key)
                return
            self._running.add(key)
        try:
            while True:
                with self._lock:
                    self._dirty.discard(key)
                self.fn(self.kube, self.settings, namespace, name)
                with self._lock:
                    if key not in self._dirty:
                        self._running.discard(key)
                        return
        except TransientApiError as err:
            with self._lock:
                self._running.discard(key)
                self._dirty.discard(key)
            raise kopf.TemporaryError(f"transient API error: {err}", delay=min(60.0, 2.0 ** min(retry, 6))) from None
        except BaseException:
            with self._lock:
                self._running.discard(key)
                self._dirty.discard(key)
            raise

    def progress(self, namespace: str, name: str, status: Any, resource_version: str | None = None) -> None:
        """Scrape worker 0 (rank 0) and patch status.progress when it changed.

        The patch carries the resourceVersion the decision was based on: if the reconcile changed
        the resource meanwhile (e.g. Succeeded with progress 100 %), the stale scrape is dropped (409).
        """
        if not self.active():
            return
        if isinstance(self.kube, CachedKube):
            w0 = next((w for w in self.kube.workers(namespace, name) if w.index == 0 and not w.deleting), None)
        else:
            pod = self.kube.get_pod(namespace, worker_name(name, 0))
            w0 = None if pod is None else worker_state(pod)
        if w0 is None or w0.phase != "Running" or not w0.ip:
            return
        ip = w0.ip
        try:
            fresh = scrape(ip, self.settings.metrics_port, self.settings.scrape_timeout_seconds)
        except (OSError, ValueError) as err:
            log.debug("%s/%s: metrics of %s not readable: %s", namespace, name, ip, err)
            self._scrape_failed(namespace, name, ip, err)
            return
        self._scrape_succeeded(namespace, name)
        old = dict((status or {}).get("progress") or {})
        new = {**old, **fresh}
        if new != old:
            try:
                self.kube.patch_lft_status(namespace, name, {"progress": new}, resource_version=resource_version)
            except Conflict:
                log.debug("%s/%s: resource changed while scraping; progress dropped", namespace, name)


    def _scrape_failed(self, namespace: str, name: str, ip: str, err: BaseException) -> None:
        """After SCRAPE_FAILURES_TO_REPORT failures in a row: a Warning Event and the reason in the
        Running condition's message (a NetworkPolicy that blocks the port otherwise only empties the
        PROGRESS and LOSS columns)."""
        key = (namespace, name)
        with self._lock:
            count = self._scrape_failures[key] = self._scrape_failures.get(key, 0) + 1
        if count != SCRAPE_FAILURES_TO_REPORT or not isinstance(self.kube, CachedKube):
            return
        port = self.settings.metrics_port
        problem = (
            f"progress unknown: rank 0's metrics at {ip}:{port} not readable in {count} scrapes in a row "
            f"({err}); allow the operator to reach port {port} of the worker pods (NetworkPolicy)"
        )
        self.kube.metrics_problems[key] = problem
        body = self.kube.get_lft(namespace, name)
        if body is not None:
            self.kube.post_event(body, "Warning", EVENT_METRICS_UNREACHABLE, problem)
        self._retrigger(namespace, name)

    def _scrape_succeeded(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        with self._lock:
            self._scrape_failures.pop(key, None)
        if isinstance(self.kube, CachedKube) and self.kube.metrics_problems.pop(key, None) is not None:
            self._retrigger(namespace, name)  # the Running message drops the problem

    def _retrigger(self, namespace: str, name: str) -> None:
        try:
            self.trigger(namespace, name)
        except kopf.TemporaryError as err:  # the next resync pass writes it
            log.debug("%s/%s: %s", namespace, name, err)


def register(
    registry: kopf.OperatorRegistry,
    settings: OperatorSettings,
    kube: CachedKube,
    namespaces: Sequence[str] = (),
    peering: Peer | None = None,
) -> Runner:
    """Register the startup and cleanup handlers on `registry` (intervals from `settings`); returns
    the Runner. `namespaces`: the operator's (none: cluster-wide), for its watches; `peering`: this
    replica, as given to kopf, when replicas take turns (peering.py).

    kopf watches nothing of the operator's: it logs in, runs these two handlers, peering and the
    liveness probe; the LoRAFineTunes and the pods come from the operator's own watches
    (list_watch.py says why)."""
    runner = Runner(kube, settings)
    gate = PeeringWatch(kube, namespaces, *peering) if peering else None
    if gate is not None:
        runner.active = gate.active
    kube.carried_status = {}  # worker pods' events reach the reconcile: a start's status can wait for them
    pods = PodWatch(kube, namespaces, runner.pod_event)
    lfts = LftWatch(kube, namespaces, runner.resource_event)
    kube.claim_index = lfts.claim_index
    watches = [pods, lfts, *([gate] if gate is not None else [])]
    periodic = Periodic(runner, kube, settings.resync_seconds, settings.progress_seconds)

    # The pods are listed before the resources, and both before any reconcile runs: the first pass
    # over each resource sees every existing pod (a restarted operator creates no pod twice).
    @kopf.on.startup(id="watches", registry=registry)
    def start_watches(**_: Any) -> None:
        try:
            if gate is not None:
                gate.list_all()
            pods.list_all()
            lfts.list_all()
        except TransientApiError as err:
            raise kopf.TemporaryError(f"listing the operator's objects: {err}", delay=5) from None
        except PermanentApiError as err:  # e.g. 403: the RBAC lacks list/watch; nothing can work
            raise kopf.PermanentError(f"listing the operator's objects: {err}") from None
        kube.pod_index = pods.index
        runner.start_queues()
        for namespace, name in lfts.known():  # the initial listing: every resource once
            runner.resource_event(namespace, name)
        for watch in watches:
            watch.start()
        periodic.start()

    @kopf.on.cleanup(id="watches", registry=registry)
    def stop_watches(**_: Any) -> None:
        stop_all(kube, watches)
        periodic.stop()
        runner.stop_queues()

    return runner
