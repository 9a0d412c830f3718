"""A queue of reconciles by resource key: a key is queued at most once, and run `delay` seconds later
on a pool of threads of its own.

Why the handlers only queue (controller/__init__.py): kopf keeps every watch event of an object in
that object's backlog until the handler of the previous one has returned. A sync handler that runs
the reconcile itself holds the event, and the whole pod or resource body in it, until one of the
handler threads is free; a burst of creations makes thousands of bodies wait so. Queued by key,
an event is done with as soon as the cache has taken what it needs, and a resource with several
events pending costs one reconcile on the newest state.

Why pod events wait `delay` seconds: a resource's worker pods change together (created, bound by the
scheduler, started by the kubelet, within milliseconds of each other); run at once, each change would cost
a reconcile and a status patch ("1/2 bound", "2/2 bound") where one does. The resources' own events
(a create, a spec change) run at once, on other threads than the pod events.

What is lost if the process dies with reconciles queued: nothing; the next start lists every pod and
resource and reconciles them (and the resync pass catches up anything missed meanwhile).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

Key = tuple[str, str]


class Deferred:
    """Runs `fn(key)` `delay` seconds after `schedule(key)`; scheduling a key that is waiting or
    queued for a thread does nothing (the run to come sees the newest state)."""

    def __init__(self, fn: Callable[[Key], object], delay: float, threads: int, name: str) -> None:
        self.fn, self.delay = fn, delay
        # Insertion order is due order (one delay for all): the loop pops from the front.
        self._due: dict[Key, float] = {}
        self._queued: set[Key] = set()
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=f"{name}-timer", daemon=True)
        self._thread.start()

    def schedule(self, key: Key) -> None:
        with self._cond:
            if key in self._due or key in self._queued:
                return
            self._due[key] = time.monotonic() + self.delay
            if len(self._due) == 1:
                self._cond.notify()

    def pending(self) -> int:
        """Keys waiting for their time or for a thread."""
        with self._cond:
            return len(self._due) + len(self._queued)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        with self._cond:
            while not self._stopped:
                if not self._due:
                    self._cond.wait()
                    continue
                key, due = next(iter(self._due.items()))
                wait = due - time.monotonic()
                if wait > 0:
                    self._cond.wait(timeout=wait)
                    continue
                del self._due[key]
                self._queued.add(key)
                self._pool.submit(self._run, key)

    def _run(self, key: Key) -> None:
        with self._cond:
            self._queued.discard(key)
        try:
            self.fn(key)
        except Exception:  # noqa: BLE001 - one resource's failure must not stop the others
            log.exception("%s/%s: reconcile failed", *key)
