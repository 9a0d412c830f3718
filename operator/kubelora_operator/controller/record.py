"""Reading and writing a run's start record (started.py) on its ConfigMap.

Why a module of its own: the record is read on every pass over a started resource, so it has to come
from memory (`CachedKube.records`) and cost a request only when a restarted operator first meets the
resource; and writing it is the commit point, which has to cope with a ConfigMap that already exists:
the same start crashed after creating it (its record is the run's), or an earlier resource of the same
name still owns it (garbage collection has not removed it yet: wait).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..api import KIND, LoRAFineTuneResource
from ..kube import Kube, PermanentApiError, TransientApiError
from ..plan import config_map_name
from .cache import CachedKube
from .started import StartRecord, record_from_status, record_of_resource

log = logging.getLogger(__name__)


def find_record(kube: Kube, body: Mapping[str, Any]) -> StartRecord | None:
    """The resource's start record, or None when it has not started.

    From the resource itself for runs started by an older operator, else from memory, else (only when
    the status says the job started) from its ConfigMap. A start that crashed before its status was
    written is not found here: `commit` finds its ConfigMap when the start is tried again.
    Raises ValueError for a record whose spec does not parse (a hand edit)."""
    legacy = record_of_resource(body)
    if legacy is not None:
        return legacy
    meta = body["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta.get("uid", "")
    memo = kube.records if isinstance(kube, CachedKube) else None
    if memo is not None:
        known = memo.get((ns, name))
        if known is not None and known[0] == uid:
            return known[1]
    status = body.get("status") or {}
    if not status.get("startTime"):
        return None
    generation = int(meta.get("generation") or 1)
    cm = kube.read_config_map(ns, config_map_name(name))
    record = None
    if cm is not None and _owned_by(cm, name, uid):
        record = StartRecord.from_annotations(_annotations(cm), generation)
    if record is None:
        # Started (the status says so) but the ConfigMap or its record is gone (deleted by hand): the
        # run goes on from the live spec and the placed device rather than start over; the next
        # attempt's `create` writes the ConfigMap again.
        log.warning("%s/%s: the start record on ConfigMap %s is missing; going on from the live spec",
                    ns, name, config_map_name(name))
        record = record_from_status(body)
    if memo is not None:
        memo[(ns, name)] = (uid, record)
    return record


def commit(
    kube: Kube, resource: LoRAFineTuneResource, cm: Mapping[str, Any], record: StartRecord
) -> tuple[StartRecord, bool]:
    """Create the run's ConfigMap `cm`, which carries `record` (the start's `Plan.config_map`): from here on the run
    exists. Returns the run's record and whether this call created it (False: an earlier try of this
    start did, and its record stands).

    Raises TransientApiError while the ConfigMap of an earlier resource of the same name waits for
    garbage collection, PermanentApiError when a ConfigMap of that name belongs to something else."""
    ns, name = resource.namespace, config_map_name(resource.name)
    created = kube.create_if_absent(cm)
    if not created:
        path = f"/api/v1/namespaces/{ns}/configmaps/{name}"
        existing = kube.read_config_map(ns, name)
        if existing is None:
            raise TransientApiError("GET", path, 404, f"ConfigMap {name} went away while this start created it")
        if not _owned_by(existing, resource.name, resource.uid):
            if _owned_by(existing, resource.name, None):
                raise TransientApiError(
                    "POST", path, 409, f"ConfigMap {name} of an earlier LoRAFineTune {resource.name} is not deleted yet"
                )
            raise PermanentApiError("POST", path, 409, f"ConfigMap {name} exists and is not this LoRAFineTune's")
        found = StartRecord.from_annotations(_annotations(existing), record.generation)
        if found is None:
            raise PermanentApiError("POST", path, 409, f"ConfigMap {name} exists without the start record")
        record = found
    if isinstance(kube, CachedKube):
        kube.records[(resource.namespace, resource.name)] = (resource.uid, record)
    return record, created


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def _owned_by(obj: Mapping[str, Any], name: str, uid: str | None) -> bool:
    """Whether a LoRAFineTune of this name (and uid, unless None) owns `obj`."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("kind") == KIND and r.get("name") == name and (uid is None or r.get("uid") == uid) for r in refs)
