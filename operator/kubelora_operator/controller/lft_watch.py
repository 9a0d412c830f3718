"""The operator's watch of the LoRAFineTunes, outside kopf (why: list_watch.py).

Per event, in this order, as kopf did it (index first, then handlers):

1. the run-directory claim index (claims.py), `namespace -> (IndexedClaim, ...)`, a tuple per namespace
   replaced whole when a claim changed, so reconciles on other threads read it without a lock;
2. the body into the cache (`CachedKube.observe_lft`), which says whether the event is the echo of the
   operator's own latest patch;
3. `on_change(namespace, name)` unless it is that echo or a deletion: the Runner queues a reconcile.

The initial listing (`list_all`, from the startup handler, after the pod index is complete) reports
nothing: the caller queues a reconcile of every listed resource once its queues run. A listing after
410 Gone reports what it changed: resources gone as deletions, every listed one as changed.

Also here: a resource that an earlier operator version marked with `kubelora.dev/finalizer`
(kopf's, for its timers) gets it removed when it is being deleted, as kopf did; nothing adds it now.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..api import GROUP, PLURAL, VERSION
from ..kube import ApiError, lft_path
from .cache import CachedKube
from .claims import ClaimIndexer, IndexedClaim
from .list_watch import ALL, ListWatch

log = logging.getLogger(__name__)

Key = tuple[str, str]
#: The finalizer kopf put on every resource for an earlier operator version (its timers).
OLD_FINALIZER = "kubelora.dev/finalizer"


class LftWatch(ListWatch):
    """List + watch of the LoRAFineTunes in the operator's namespaces (module docstring)."""

    WHAT = "lorafinetune"

    def __init__(
        self, kube: CachedKube, namespaces: Sequence[str], on_change: Callable[[str, str], object]
    ) -> None:
        super().__init__(kube, namespaces)
        self.cache = kube
        self.on_change = on_change
        self.claims = ClaimIndexer(kube.records)
        #: namespace -> the claims of its resources (module docstring); written under `_lock`
        self.claim_index: dict[str, tuple[IndexedClaim, ...]] = {}
        self._claims: dict[str, dict[str, IndexedClaim]] = {}  # namespace -> name -> claim
        self._known: dict[Key, str] = {}  # resource -> its uid (the cache keeps the body)
        self._lock = threading.Lock()

    def _path(self, scope: str) -> str:
        where = "" if scope == ALL else f"/namespaces/{scope}"
        return f"/apis/{GROUP}/{VERSION}{where}/{PLURAL}"

    def known(self) -> list[Key]:
        """The resources the watch knows of (the startup queues a reconcile of each)."""
        with self._lock:
            return list(self._known)

    def _listed(self, scope: str, items: list[dict[str, Any]], *, report: bool) -> None:
        listed = {_key(b) for b in items}
        with self._lock:
            gone = [(key, uid) for key, uid in self._known.items() if scope in (ALL, key[0]) and key not in listed]
        for (ns, name), uid in gone:
            self._apply("DELETED", {"metadata": {"namespace": ns, "name": name, "uid": uid}}, report=report)
        for body in items:
            self._apply("MODIFIED", body, report=report)

    def _apply(self, kind: str, body: Mapping[str, Any], *, report: bool = True) -> None:
        meta = body.get("metadata") or {}
        key = _key(body)
        ns, name = key
        if kind == "DELETED":
            self.claims.forget(str(meta.get("uid") or ""), name)
            self._set_claim(key, None)
            with self._lock:
                self._known.pop(key, None)
            self.cache.observe_lft("DELETED", body)
            return
        self._set_claim(key, self.claims(ns, body).get(ns))
        with self._lock:
            self._known[key] = str(meta.get("uid") or "")
        if meta.get("deletionTimestamp") and OLD_FINALIZER in (meta.get("finalizers") or ()):
            self._drop_old_finalizer(body)
        own = self.cache.observe_lft(kind if report else "ADDED", body)
        if report and not own:
            self.on_change(ns, name)

    def _set_claim(self, key: Key, claim: IndexedClaim | None) -> None:
        """The resource's claim into the index; the namespace's tuple is rebuilt only on a change."""
        ns, name = key
        with self._lock:
            mine = self._claims.get(ns, {})
            if mine.get(name) == claim:
                return
            if claim is None:
                del mine[name]
            else:
                mine[name] = claim
                self._claims[ns] = mine
            if mine:
                self.claim_index[ns] = tuple(mine.values())
            else:
                self.claim_index.pop(ns, None)
                del self._claims[ns]

    def _drop_old_finalizer(self, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        rest = [f for f in meta.get("finalizers") or () if f != OLD_FINALIZER]
        patch = {"metadata": {"finalizers": rest, "resourceVersion": meta.get("resourceVersion")}}
        try:
            self.kube.merge_patch(lft_path(meta.get("namespace", ""), meta.get("name", "")), patch)
        except ApiError as err:  # a 409 or a gone resource: the next event of it tries again
            log.debug("%s/%s: removing %s: %s", meta.get("namespace"), meta.get("name"), OLD_FINALIZER, err)


def _key(body: Mapping[str, Any]) -> Key:
    meta = body.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
