"""List, then watch from there: the operator's own informer loop, shared by its two watches.

Why the operator watches without kopf: kopf's per-event machinery (a worker task per object, the
body wrapped into its views, indexers, handler selection, kwargs per handler) cost more CPU than the
operator's own work: 40% of the operator's time holding the GIL during a ramp of 1,000 resources
was kopf's event loop handling LoRAFineTune events (py-spy --gil; docs/operator-benchmark.md, "sixth
round"), after the pod events had left it. The operator reads a few fields of each event; this loop
decodes the event and hands it over.

What a subclass gives: `_path(scope)`, the label selector (`SELECTOR`) or other list parameters
(`_params`), what to do with a listing
(`_listed`: replace what it knows of the scope; report the differences when `report`) and with one
event (`_apply`). What this module does:

* scopes: plain namespace names are listed and watched one by one (an operator scoped to namespaces
  may read only there); kopf-style patterns (`team-*`, `!team-x`) and cluster-wide take one
  cluster-wide watch, filtered here as kopf filters them;
* the watch resumes from the last resourceVersion it saw (bookmarks keep it fresh while nothing
  changes); when that has expired (410 Gone) it lists again (`_listed(..., report=True)`).
"""

from __future__ import annotations

import fnmatch
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from ..kube import ApiError, Kube

log = logging.getLogger(__name__)

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
    """The namespaces to list and watch (`[ALL]` for cluster-wide) and which namespaces to accept."""
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


def namespace_of(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("namespace") or "")


class Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class ListWatch:
    """List + watch of one kind in the operator's namespaces (module docstring)."""

    #: What the logs call the watched objects.
    WHAT: ClassVar[str] = "object"
    #: Label selector of the list and the watch ("" for none).
    SELECTOR: ClassVar[str] = ""

    def __init__(self, kube: Kube, namespaces: Sequence[str]) -> None:
        self.kube = kube
        self.scopes, self._wanted = watch_scopes(namespaces)
        self._versions: dict[str, str] = {}  # scope -> resourceVersion to resume from
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ----- what a subclass gives ------------------------------------------------------------------

    def _path(self, scope: str) -> str:
        raise NotImplementedError

    def _params(self) -> dict[str, str]:
        """The list's and the watch's selector parameters."""
        return {"labelSelector": self.SELECTOR} if self.SELECTOR else {}

    def _listed(self, scope: str, items: list[dict[str, Any]], *, report: bool) -> None:
        """Replace what is known of `scope` with `items` (already filtered by namespace)."""
        raise NotImplementedError

    def _apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        """One ADDED/MODIFIED/DELETED event of an object in a wanted namespace."""
        raise NotImplementedError

    # ----- listing --------------------------------------------------------------------------------

    def list_all(self) -> None:
        """List every scope into memory; nothing reported. Raises ApiError (the caller retries)."""
        for scope in self.scopes:
            self._list(scope, report=False)

    def _list(self, scope: str, *, report: bool) -> None:
        out = self.kube.request("GET", self._path(scope), params=self._params()) or {}
        items = [o for o in out.get("items") or () if self._wanted(namespace_of(o))]
        self._listed(scope, items, report=report)
        self._versions[scope] = str((out.get("metadata") or {}).get("resourceVersion") or "")

    # ----- watching -------------------------------------------------------------------------------

    def start(self) -> None:
        """One daemon thread per scope, watching from where `list_all` ended."""
        for scope in self.scopes:
            name = f"kubelora-watch-{self.WHAT}-{scope or 'all'}"
            t = threading.Thread(target=self._run, args=(scope,), name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def signal_stop(self) -> None:
        self._stop.set()

    def join(self) -> None:
        for t in self._threads:
            t.join(timeout=5)

    def _run(self, scope: str) -> None:
        where = f"{self.WHAT} watch of {scope or 'all namespaces'}"
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
                log.info("%s: resourceVersion expired; listing again", where)
            except ApiError as err:
                if self._stop.is_set():
                    return
                log.warning("%s: %s; again in %.0f s", where, err, delay)
                self._stop.wait(delay)
                delay = min(RETRY_MAX, delay * 2)
            except Exception:  # noqa: BLE001 - a bug in one event must not end the watch for good
                log.exception("%s failed; listing again", where)
                self._stop.wait(delay)
                delay = min(RETRY_MAX, delay * 2)
            try:
                if not self._stop.is_set():
                    self._list(scope, report=True)
            except ApiError as err:
                log.warning("%s: listing: %s", where, err)

    def _watch(self, scope: str) -> bool:
        """One watch request from the scope's resourceVersion; True if it delivered any event."""
        params = {
            **self._params(),
            "resourceVersion": self._versions[scope],
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        got = False
        for event in self.kube.watch(self._path(scope), params, READ_TIMEOUT):
            if self._stop.is_set():
                return got
            got = True
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Gone()
                raise ApiError("WATCH", self._path(scope), int(obj.get("code") or 0), str(obj.get("message") or obj))
            version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
            if kind != "BOOKMARK" and self._wanted(namespace_of(obj)):
                self._apply(str(kind), obj)
            if version:
                self._versions[scope] = version
        return got


def stop_all(kube: Kube, watches: Sequence[ListWatch]) -> None:
    """Stop every watch: all flags first, then the open streams closed (one call closes them all),
    so that no watch takes the closing for a connection problem and tries again."""
    for w in watches:
        w.signal_stop()
    kube.close_watches()
    for w in watches:
        w.join()
