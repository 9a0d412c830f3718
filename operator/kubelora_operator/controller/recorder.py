"""Events posted from one background thread, in the order they were decided, as client-go's event
recorder posts them.

Why: an Event is for the people who read `kubectl describe`; nothing the operator decides waits for
it. Posted inline, a start's two Events ("valid; created 2 worker pods", "2 worker pods bound") were
two of its seven requests, each holding a reconcile thread for a round trip while other resources
waited for their worker pods. Queued here, the reconcile goes on at once, and during a burst of
creations the Events trail the pods instead of competing with them (docs/operator-benchmark.md).

What stays the same: each Event is built when it is decided (its timestamps and the resource's uid and
resourceVersion of that moment; `kube.event_manifest`), and one thread posts first in, first out, so a
resource's Events keep their order. An Event that cannot be posted is logged, as before: Events
were always best effort.

Bounded: at most `capacity` Events wait; beyond that new ones are dropped and counted in a warning (an
API server that stalls must not grow the operator's memory; client-go drops too). On shutdown
`stop` posts what waits for at most `drain_seconds`; a SIGKILL loses what waits (the status each
Event goes with is written by then, or written again by the next pass).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: Events waiting to be posted, at most.
EVENT_QUEUE_CAPACITY = 10_000
#: Seconds `stop` keeps posting what waits.
EVENT_DRAIN_SECONDS = 5.0
#: Threads posting Events: one keeps each resource's Events in order (and calls the API server, so
#: the REST layer pools a connection for it: controller.API_THREADS).
EVENT_THREADS = 1


class EventRecorder:
    """A FIFO of Event manifests and the one thread that posts them with `post(manifest)`."""

    def __init__(self, post: Callable[[dict[str, Any]], None], capacity: int = EVENT_QUEUE_CAPACITY) -> None:
        self._post = post
        self._capacity = capacity
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False  # the thread holds an Event it took from the queue
        self._dropped = 0
        self._thread = threading.Thread(target=self._loop, name="kubelora-events", daemon=True)
        self._thread.start()

    def record(self, manifest: dict[str, Any]) -> None:
        """Queue one Event (a complete core/v1 Event body); returns at once."""
        with self._cond:
            if self._stopping:
                return
            if len(self._queue) >= self._capacity:
                self._dropped += 1
                if self._dropped == 1 or self._dropped % 1000 == 0:
                    log.warning("%d Event(s) dropped: %d are waiting to be posted", self._dropped, len(self._queue))
                return
            self._queue.append(manifest)
            self._cond.notify()

    def pending(self) -> int:
        """Events queued or being posted."""
        with self._cond:
            return len(self._queue) + self._busy

    def flush(self, timeout: float) -> bool:
        """Wait until every queued Event was posted (or `timeout` seconds passed); True if all were."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self, drain_seconds: float = EVENT_DRAIN_SECONDS) -> None:
        """Post what waits for at most `drain_seconds`, then stop taking Events."""
        drained = self.flush(drain_seconds)
        with self._cond:
            self._stopping = True
            left = len(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        if not drained:
            log.warning("stopping with %d Event(s) not posted", left)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                manifest = self._queue.popleft()
                self._busy = True
            try:
                self._post(manifest)
            except Exception:  # noqa: BLE001 - one Event must not stop the others
                log.exception("posting an Event failed")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
