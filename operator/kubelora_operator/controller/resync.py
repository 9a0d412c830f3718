"""The periodic passes, driven from the operator's cache instead of one kopf timer per resource.

* every `resyncSeconds`: a reconcile of each known LoRAFineTune (NoMatchingNodes and missing references
  re-evaluated, activeDeadlineSeconds / ttlSecondsAfterFinished checked, missed events caught up). It
  reads memory (cache.py), so a settled or finished resource costs no request.
* every `progressSeconds`: rank 0's metrics of each Running resource -> `status.progress`.

Why not kopf timers: a kopf timer is an asyncio task per resource and makes kopf put a finalizer on
every resource (a patch at creation, one more at deletion, and kopf's finalizer JSON-patch is refused
with 422 whenever the resource changed meanwhile, which during a start it always has). One thread
walking the cache does the same work with neither.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import kopf

from ..conditions import ConditionType, is_true
from ..kube import TransientApiError
from .cache import CachedKube

if TYPE_CHECKING:
    from . import Runner

log = logging.getLogger(__name__)

#: Threads running the periodic passes (the handler threads stay free for events).
PASS_THREADS = 4


class Periodic:
    """Two loops on one thread: resync and progress, over the resources in `kube`'s cache."""

    def __init__(self, runner: Runner, kube: CachedKube, resync_seconds: float, progress_seconds: float) -> None:
        self.runner, self.kube = runner, kube
        self.resync_seconds, self.progress_seconds = resync_seconds, progress_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(PASS_THREADS, thread_name_prefix="kubelora-periodic")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kubelora-periodic", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        """Each pass starts one period after the previous one ended: passes never overlap."""
        now = time.monotonic
        next_resync, next_progress = now() + self.resync_seconds, now() + self.progress_seconds
        while not self._stop.wait(max(0.0, min(next_resync, next_progress) - now())):
            if now() >= next_resync:
                started = now()
                count = self._each(self._resync, lambda body: True)
                log.debug("resync pass over %d resource(s) in %.2f s", count, now() - started)
                next_resync = now() + self.resync_seconds
            if now() >= next_progress:
                self._each(self._progress, _is_running)
                next_progress = now() + self.progress_seconds

    def _each(self, fn: Callable[[dict[str, Any]], None], wanted: Callable[[dict[str, Any]], bool]) -> int:
        """Run `fn` for every cached body that `wanted` accepts; waits for them (no pile-up of passes)."""
        futures = [self._pool.submit(fn, body) for body in self.kube.bodies() if wanted(body)]
        for f in futures:
            f.result()
        return len(futures)

    def _resync(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        try:
            self.runner.trigger(meta["namespace"], meta["name"])
        except kopf.TemporaryError as err:
            log.warning("%s/%s: resync: %s", meta["namespace"], meta["name"], err)
        except Exception:  # noqa: BLE001 - one resource's bug must not stop the others' resync
            log.exception("%s/%s: resync failed", meta["namespace"], meta["name"])

    def _progress(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        try:
            self.runner.progress(meta["namespace"], meta["name"], body.get("status"), meta.get("resourceVersion"))
        except TransientApiError as err:
            log.debug("%s/%s: progress skipped: %s", meta["namespace"], meta["name"], err)
        except Exception:  # noqa: BLE001
            log.exception("%s/%s: progress failed", meta["namespace"], meta["name"])


def _is_running(body: dict[str, Any]) -> bool:
    return is_true((body.get("status") or {}).get("conditions"), ConditionType.RUNNING) and not (
        body.get("metadata") or {}
    ).get("deletionTimestamp")
