"""The reconcile of one LoRAFineTune: read what exists, decide the next step, write status once.

Level-based on purpose: every trigger (create/resume/update of the resource, any event of its worker
pods, the periodic resync pass) runs the same function on the newest state the watches delivered
(cache.py: no GET or LIST per run), so a missed event, an operator restart or a crash between two API
calls is repaired by the next run. Children have
deterministic names and are created with "AlreadyExists is fine", so nothing is ever duplicated.

What the operator remembers between runs (started.py): the start record (started spec, generation,
device, start time) on the run's ConfigMap, created before any other child (the commit point,
record.py), and the attempt number and the activeDeadlineSeconds clock as annotations of the
resource. The steps of a started attempt (create, restart, finish, report) are in attempt.py; the
small shared actions (delete pods, fail, place) in actions.py.

Lifecycle: not started -> validate (spec, then Secrets/PVCs/ConfigMaps) -> place (NoMatchingNodes
waits for the resync pass; in Wait mode pods are created anyway, WaitingForNodes until bound or
NodesNotAvailable after waitTimeoutSeconds) -> commit (the ConfigMap) -> create Service, pods -> observe pods: bound
(Scheduled), all running (Running), worker 0 finished (Succeeded + artifact from its termination
message), a worker failed (exit 2: Failed/InvalidSpec at once; otherwise delete the attempt's pods and
start the next attempt until backoffLimit). Disruptions do not count against backoffLimit: exit 143
(SIGTERM after a checkpoint) and worker pods deleted by someone else (drain, eviction, kubectl).
suspend deletes the pods (SIGTERM: the trainer checkpoints) and resuming starts a new attempt.
activeDeadlineSeconds and ttlSecondsAfterFinished are checked on every run (the resync pass makes
that periodic).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..api import LoRAFineTuneResource, SpecError, parse_spec
from ..conditions import ConditionReason as R
from ..conditions import ConditionType as T
from ..conditions import get_condition, is_true
from ..kube import Kube, NotFound, PermanentApiError, TransientApiError
from ..plan import plan
from ..pruned_fields import PRUNED_FIELDS_EVENT, pruned_spec_fields
from ..run_dirs import Claimant, claimant, holder, in_use_message, run_dir_of_spec
from ..settings import OperatorSettings
from .actions import delete_pods, fail, parse_time, place, stop_pods
from .attempt import Attempt, advance
from .cache import CachedKube, cached_workers
from .claims import claim_of, claims_in
from .record import commit, find_record
from .sources import sources_ready
from .started import (
    ANN_ACTIVE_SINCE,
    ANN_ATTEMPT,
    ANN_DEVICE,
    ANN_STARTED_GENERATION,
    ANN_STARTED_SPEC,
    RUN_POLICY,
    StartRecord,
    changed_fields,
    effective_spec,
)
from .status import StatusUpdate
from .validate_create import validate

__all__ = [
    "ANN_ACTIVE_SINCE",
    "ANN_ATTEMPT",
    "ANN_DEVICE",
    "ANN_STARTED_GENERATION",
    "ANN_STARTED_SPEC",
    "RUN_POLICY",
    "changed_fields",
    "effective_spec",
    "reconcile",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- entry point


def reconcile(kube: Kube, settings: OperatorSettings, namespace: str, name: str) -> None:
    """One pass over one resource. Raises TransientApiError (the caller retries later)."""
    body = kube.get_lft(namespace, name)
    carry = kube.carried_status if isinstance(kube, CachedKube) else None
    key = (namespace, name)
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        if carry is not None:
            carry.pop(key, None)
        return
    u = StatusUpdate(body)
    earlier = carry.pop(key, None) if carry is not None else None
    if earlier:
        u.adopt(earlier)
    try:
        _reconcile(kube, settings, body, u)
    except TransientApiError:
        if earlier and carry is not None:
            carry.setdefault(key, earlier)  # still unwritten: the pass that retries writes it
        raise
    except PermanentApiError as err:
        if err.status == 403 and "quota" in err.message.lower():
            raise TransientApiError(err.method, err.path, err.status, err.message) from None
        if isinstance(err, NotFound) and err.path.endswith(f"/{name}"):
            return  # the resource went away mid-reconcile
        log.error("%s/%s: permanent API error: %s", namespace, name, err)
        msg = f"the Kubernetes API refused {err.method} {err.path}: {err.status} {err.message}".strip()
        fail(u, R.API_ERROR, msg)
        stop_pods(kube, namespace, name, keep_terminated=True)
    else:
        if carry is not None and u.created_pods:
            _carry(kube, carry, key, u)
            return
    try:
        u.flush(kube)
    except NotFound:
        return


def _carry(kube: Kube, carry: dict[tuple[str, str], dict[str, Any]], key: tuple[str, str], u: StatusUpdate) -> None:
    """A pass that created worker pods leaves its status to the next pass, and posts its Events now.

    Why: the status patch is the costliest request a start makes (the API server validates the whole
    resource against its schema: p50 292 ms against 106 ms for a pod create in a burst of 1,000, see
    docs/operator-benchmark.md), and the pods just created bring the next pass within about a second
    (their watch events, `POD_EVENT_DELAY`), when the scheduler has usually bound them: that pass
    writes "valid, started, 2/2 bound" as one patch instead of two. The Events keep their own time.
    If the process dies first, the restarted operator's first pass catches the status up (`_after_start`); if no pod
    event comes, the resync pass writes it."""
    carry[key] = u.carried()
    u.post_events(kube)


def _reconcile(kube: Kube, settings: OperatorSettings, body: Mapping[str, Any], u: StatusUpdate) -> None:
    raw = dict(body.get("spec") or {})
    if is_true(u.conditions, T.SUCCEEDED) or is_true(u.conditions, T.FAILED):
        _finished(kube, body, u, raw)
        return
    try:
        record = find_record(kube, body)
    except ValueError as err:  # only possible through a hand-edited annotation
        fail(u, R.INVALID_SPEC, f"the start record no longer parses: {err}")
        return
    if record is None:
        _before_start(kube, settings, body, u, raw)
    else:
        _after_start(kube, settings, body, u, raw, record)


# --------------------------------------------------------------------------- phases


def _finished(kube: Kube, body: Mapping[str, Any], u: StatusUpdate, raw: Mapping[str, Any]) -> None:
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    # e.g. mpirun's sshd workers, or a stop that failed; from the cache: a finished resource costs no
    # request until its TTL (a pod the cache has not seen yet is stopped by the next resync)
    delete_pods(kube, ns, cached_workers(kube, ns, name), keep_terminated=True)
    ttl = raw.get("ttlSecondsAfterFinished")
    done = u.status.get("completionTime")
    if ttl is not None and done and (u.now - parse_time(done)).total_seconds() >= int(ttl):
        log.info("%s/%s: ttlSecondsAfterFinished (%s s) passed: deleting the resource", ns, name, ttl)
        kube.delete_lft(ns, name)


def _before_start(
    kube: Kube, settings: OperatorSettings, body: Mapping[str, Any], u: StatusUpdate, raw: Mapping[str, Any]
) -> None:
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    u.status["observedGeneration"] = u.generation
    v = validate(kube, name, ns, raw, settings)
    if not v.ok:
        u.condition(T.VALIDATED, False, v.reason, v.message, event="Warning")
        return
    spec = v.spec
    assert spec is not None
    taken = _run_dir_taken(kube, body, raw)
    if taken is not None:
        u.condition(T.VALIDATED, False, R.RUN_DIR_IN_USE, taken, event="Warning")
        return
    pruned = pruned_spec_fields(body)
    if pruned:
        # warned, not refused: the annotation can outlive a fix made with `kubectl patch`
        u.condition(
            T.VALIDATED,
            True,
            R.SPEC_VALID,
            f"{v.message}; ignored unknown spec field(s) that the API server pruned: {', '.join(pruned)} "
            "(a typo? the defaults were used: see kubectl explain lft.spec)",
            event="Warning",
            event_reason=PRUNED_FIELDS_EVENT,
        )
    else:
        u.condition(T.VALIDATED, True, R.SPEC_VALID, v.message, event="Normal")
    if spec.suspend:
        u.condition(
            T.SUSPENDED,
            True,
            R.SUSPENDED_BY_USER,
            "spec.suspend is true: no worker pods are created until it is false",
            event="Normal",
        )
        return
    if is_true(u.conditions, T.SUSPENDED):
        u.condition(T.SUSPENDED, False, R.RESUMED, "spec.suspend is false: starting", event="Normal")
    decision = place(kube, settings, spec)
    if not decision.ok:
        u.status["placement"] = decision.to_status()
        u.condition(T.SCHEDULED, False, R.NO_MATCHING_NODES, decision.reason, event="Warning")
        return
    assert decision.device is not None
    resource = LoRAFineTuneResource(name, ns, meta.get("uid", ""), u.generation, spec)
    # The commit point: from here on the run exists (a restart of the operator continues it).
    record = StartRecord(spec=dict(raw), generation=u.generation, device=decision.device, started_at=u.stamp)
    planned = plan(resource, decision, settings, attempt=0, record=record.annotations())
    record, created = commit(kube, resource, planned.config_map, record)
    if not created:  # an earlier try of this start committed (the operator died before the status write)
        _after_start(kube, settings, body, u, raw, record)
        return
    u.status.update(startTime=u.stamp, placement=decision.to_status(), restarts=0)
    if sources_ready(kube, settings, u, resource, decision.device, {}):  # the fetch pod first (fetch.py)
        a = Attempt(kube, settings, u, resource, decision.device, 0, placed=decision, record=record, committed=planned)
        advance(a, [])
    u.fold_event(R.SPEC_VALID.value)  # "valid; created 2 worker pods": one Event per start, not two


def _after_start(
    kube: Kube,
    settings: OperatorSettings,
    body: Mapping[str, Any],
    u: StatusUpdate,
    raw: Mapping[str, Any],
    record: StartRecord,
) -> None:
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    annotations = meta.get("annotations") or {}
    started, device = record.spec, record.device
    attempt = int(annotations.get(ANN_ATTEMPT) or 0)
    changed = changed_fields(started, raw)
    if changed:
        u.condition(
            T.SPEC_CHANGE_REFUSED,
            True,
            R.SPEC_CHANGED_AFTER_START,
            f"not applied to the started job: {', '.join(changed)} (after start only suspend, backoffLimit, "
            "activeDeadlineSeconds and ttlSecondsAfterFinished may change); revert them or create a new LoRAFineTune",
            event="Warning",
        )
    else:
        u.drop(T.SPEC_CHANGE_REFUSED)
        u.status["observedGeneration"] = u.generation
    try:
        spec = parse_spec(effective_spec(started, raw))
    except SpecError as err:  # only possible through a hand-edited annotation
        fail(u, R.INVALID_SPEC, f"the started spec no longer parses: {err}")
        return
    # After a crash between the commit point and the first status write, status catches up here.
    u.status.setdefault("startTime", record.started_at or u.stamp)
    u.status.setdefault("restarts", 0)
    if device and not (u.status.get("placement") or {}).get("device"):  # the DEVICE column
        u.status["placement"] = {**(u.status.get("placement") or {}), "device": device}
    if get_condition(u.conditions, T.VALIDATED) is None:
        u.condition(T.VALIDATED, True, R.SPEC_VALID, "spec and referenced objects are valid")
    resource = LoRAFineTuneResource(name, ns, meta.get("uid", ""), record.generation, spec)
    # The operator's index of the pods (cache.py) is enough to observe: attempt.advance confirms with a
    # quorum read before it acts on a pod's absence, and everything else it does is idempotent
    # (AlreadyExists, uid preconditions).
    pods = cached_workers(kube, ns, name)

    start = annotations.get(ANN_ACTIVE_SINCE) or record.started_at or u.status.get("startTime")
    deadline = spec.active_deadline_seconds
    if deadline and start and not spec.suspend:
        elapsed = (u.now - parse_time(start)).total_seconds()
        if elapsed >= deadline:
            delete_pods(kube, ns, pods, keep_terminated=False)
            fail(
                u,
                R.DEADLINE_EXCEEDED,
                f"activeDeadlineSeconds ({deadline}) exceeded: {int(elapsed)} s since the job started or resumed; "
                "worker pods deleted",
            )
            return

    if spec.suspend:
        delete_pods(kube, ns, pods, keep_terminated=False)
        u.condition(
            T.SUSPENDED,
            True,
            R.SUSPENDED_BY_USER,
            "spec.suspend is true: worker pods deleted (SIGTERM lets the trainer checkpoint); resuming continues "
            "from the newest checkpoint in the run dir",
            event="Normal",
        )
        u.condition(T.RUNNING, False, R.SUSPENDED_BY_USER, "suspended")
        # No pods, nothing scheduled; dropping it also restarts Wait mode's clock on resume.
        u.drop(T.SCHEDULED)
        u.status["workers"] = {"ready": 0, "total": spec.workers}
        return
    if is_true(u.conditions, T.SUSPENDED):
        attempt += 1
        kube.patch_lft_annotations(ns, name, {ANN_ATTEMPT: str(attempt), ANN_ACTIVE_SINCE: u.stamp})
        u.condition(
            T.SUSPENDED,
            False,
            R.RESUMED,
            f"spec.suspend is false: attempt {attempt} resumes from the newest checkpoint",
            event="Normal",
        )
    if sources_ready(kube, settings, u, resource, device, annotations):  # the fetch pod first (fetch.py)
        advance(Attempt(kube, settings, u, resource, device, attempt, record=record), pods)


# --------------------------------------------------------------------------- run directories


def _as_claimant(kube: Kube, body: Mapping[str, Any]) -> Claimant | None:
    """A LoRAFineTune of the namespace as a run-dir claimant (its started spec once started)."""
    meta = body.get("metadata") or {}
    try:
        record = find_record(kube, body)
    except ValueError:
        return None
    raw = record.spec if record is not None else dict(body.get("spec") or {})
    return claim_of(body, record, run_dir_of_spec(meta.get("name", ""), meta.get("namespace", ""), raw))


def _run_dir_taken(kube: Kube, body: Mapping[str, Any], raw: Mapping[str, Any]) -> str | None:
    """Why this not-yet-started resource may not use its run directory (another one has it), or None."""
    meta = body["metadata"]
    me = claimant(meta["name"], meta["namespace"], meta.get("creationTimestamp", ""), raw, started=False, refused=False)
    if me is None:
        return None
    if isinstance(kube, CachedKube) and kube.claim_index is not None:
        others = claims_in(kube.claim_index, meta["namespace"], kube.records)  # claims.py: no request
    else:
        bodies = kube.list_lfts(meta["namespace"])  # from etcd: tools and tests without the index
        others = [c for c in (_as_claimant(kube, b) for b in bodies if b["metadata"]["name"] != meta["name"]) if c]
    other = holder(me, others)
    return None if other is None else in_use_message(me, other)
