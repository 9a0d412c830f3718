"""The reconcile of one LoRAFineTune: read what exists, decide the next step, write status once.

Level-based on purpose: every trigger (create/resume/update of the resource, any event of its worker
pods, the periodic resync pass) runs the same function on the newest state the watches delivered
(cache.py: no GET or LIST per run), so a missed event, an operator restart or a crash between two API
calls is repaired by the next run. Children have
deterministic names and are created with "AlreadyExists is fine", so nothing is ever duplicated.

What the operator remembers between runs lives in annotations on the resource (never in `status`,
which is for users, and never only in memory; cache.py merely mirrors the cluster):

* `kubelora.dev/started-spec`: the spec the job was started with (JSON). It is written *before* the
  first child is created (the commit point); later attempts are planned from it, and a spec change
  after start is compared against it and refused (SpecChangeRefused names the fields). Only the run
  policy (suspend, backoffLimit, activeDeadlineSeconds, ttlSecondsAfterFinished) is taken from the
  live spec.
* `kubelora.dev/started-generation`, `kubelora.dev/device` (the placed device, so that `auto` never
  flips between attempts), `kubelora.dev/attempt` (the pods' `kubelora.dev/attempt` label),
  `kubelora.dev/active-since` (start of the activeDeadlineSeconds clock: set at start and reset on
  resume, as Kubernetes Jobs do; time spent suspended does not count).

Lifecycle: not started -> validate (spec, then Secrets/PVCs/ConfigMaps) -> place (NoMatchingNodes
waits for the resync pass; in Wait mode pods are created anyway, WaitingForNodes until bound or
NodesNotAvailable after waitTimeoutSeconds) -> commit -> create ConfigMap, Service, pods -> observe pods: bound
(Scheduled), all running (Running), worker 0 finished (Succeeded + artifact from its termination
message), a worker failed (exit 2: Failed/InvalidSpec at once; otherwise delete the attempt's pods and
start the next attempt until backoffLimit). Disruptions do not count against backoffLimit: exit 143
(SIGTERM after a checkpoint) and worker pods deleted by someone else (drain, eviction, kubectl).
suspend deletes the pods (SIGTERM: the trainer checkpoints) and resuming starts a new attempt.
activeDeadlineSeconds and ttlSecondsAfterFinished are checked on every run (the resync pass makes
that periodic).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from kubelora_trainer.contract import EXIT_BAD_INPUT, EXIT_PREEMPTED, parse_success_message, parse_success_metrics

from ..api import LoRAFineTuneResource, LoRAFineTuneSpec, SpecError, parse_spec
from ..conditions import ConditionReason as R
from ..conditions import ConditionType as T
from ..conditions import format_time, get_condition, is_true
from ..kube import Kube, NotFound, PermanentApiError, TransientApiError
from ..placement import NodeFacts, PlacementDecision, decide_placement, wait_timeout_seconds, waits_for_nodes
from ..plan import LABEL_WORKER_INDEX, artifact_uri, plan, ssh_secret, worker_selector
from ..run_dirs import Claimant, claimant, holder, in_use_message
from ..settings import OperatorSettings
from .cache import cached_workers, metrics_problem
from .pods import WorkerState, first_failure, worker_state
from .progress import progress_from_metrics
from .status import StatusUpdate
from .validate_create import validate

log = logging.getLogger(__name__)

ANN_STARTED_SPEC = "kubelora.dev/started-spec"
ANN_STARTED_GENERATION = "kubelora.dev/started-generation"
ANN_DEVICE = "kubelora.dev/device"
ANN_ATTEMPT = "kubelora.dev/attempt"
ANN_ACTIVE_SINCE = "kubelora.dev/active-since"

#: Spec fields that may change after start (camelCase, as stored).
RUN_POLICY = ("suspend", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished")


# --------------------------------------------------------------------------- pure helpers


def changed_fields(old: Any, new: Any, prefix: str = "spec") -> list[str]:
    """Dotted paths where two specs differ (run-policy fields ignored at the top level)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            if prefix == "spec" and key in RUN_POLICY:
                continue
            out += changed_fields(old.get(key), new.get(key), f"{prefix}.{key}")
        return out
    return [] if old == new else [prefix]


def effective_spec(started: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    """The started spec with the live run policy."""
    out = {k: v for k, v in started.items() if k not in RUN_POLICY}
    out.update({k: live[k] for k in RUN_POLICY if k in live and live[k] is not None})
    return out


def parse_time(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# --------------------------------------------------------------------------- entry point


def reconcile(kube: Kube, settings: OperatorSettings, namespace: str, name: str) -> None:
    """One pass over one resource. Raises TransientApiError (the caller retries later)."""
    body = kube.get_lft(namespace, name)
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return
    u = StatusUpdate(body)
    try:
        _reconcile(kube, settings, body, u)
    except TransientApiError:
        raise
    except PermanentApiError as err:
        if err.status == 403 and "quota" in err.message.lower():
            raise TransientApiError(err.method, err.path, err.status, err.message) from None
        if isinstance(err, NotFound) and err.path.endswith(f"/{name}"):
            return  # the resource went away mid-reconcile
        log.error("%s/%s: permanent API error: %s", namespace, name, err)
        msg = f"the Kubernetes API refused {err.method} {err.path}: {err.status} {err.message}".strip()
        _fail(u, R.API_ERROR, msg)
        _stop_pods(kube, namespace, name, keep_terminated=True)
    try:
        u.flush(kube)
    except NotFound:
        return


def _reconcile(kube: Kube, settings: OperatorSettings, body: Mapping[str, Any], u: StatusUpdate) -> None:
    meta = body["metadata"]
    annotations = meta.get("annotations") or {}
    raw = dict(body.get("spec") or {})
    if is_true(u.conditions, T.SUCCEEDED) or is_true(u.conditions, T.FAILED):
        _finished(kube, body, u, raw)
    elif ANN_STARTED_SPEC not in annotations:
        _before_start(kube, settings, body, u, raw)
    else:
        _after_start(kube, settings, body, u, raw, annotations)


# --------------------------------------------------------------------------- phases


def _finished(kube: Kube, body: Mapping[str, Any], u: StatusUpdate, raw: Mapping[str, Any]) -> None:
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    # e.g. mpirun's sshd workers, or a stop that failed; from the cache: a finished resource costs no
    # request until its TTL (a pod the cache has not seen yet is stopped by the next resync)
    _delete(kube, ns, cached_workers(kube, ns, name), keep_terminated=True)
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
    decision = _place(kube, settings, spec)
    if not decision.ok:
        u.status["placement"] = decision.to_status()
        u.condition(T.SCHEDULED, False, R.NO_MATCHING_NODES, decision.reason, event="Warning")
        return
    assert decision.device is not None
    # The commit point: from here on the run exists (a restart of the operator continues it).
    kube.patch_lft_annotations(
        ns,
        name,
        {
            ANN_STARTED_SPEC: json.dumps(raw, sort_keys=True, separators=(",", ":")),
            ANN_STARTED_GENERATION: str(u.generation),
            ANN_DEVICE: decision.device,
            ANN_ATTEMPT: "0",
            ANN_ACTIVE_SINCE: u.stamp,
        },
    )
    u.status.update(startTime=u.stamp, placement=decision.to_status(), restarts=0)
    resource = LoRAFineTuneResource(name, ns, meta.get("uid", ""), u.generation, spec)
    _observe(kube, settings, u, resource, decision.device, 0, [], placed=decision)
    u.fold_event(R.SPEC_VALID.value)  # "valid; created 2 worker pods": one Event per start, not two


def _after_start(
    kube: Kube,
    settings: OperatorSettings,
    body: Mapping[str, Any],
    u: StatusUpdate,
    raw: Mapping[str, Any],
    annotations: Mapping[str, str],
) -> None:
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    started = json.loads(annotations[ANN_STARTED_SPEC])
    device = annotations.get(ANN_DEVICE) or None
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
        _fail(u, R.INVALID_SPEC, f"the started spec no longer parses: {err}")
        return
    # After a crash between the commit point and the first status write, status catches up here.
    u.status.setdefault("startTime", u.stamp)
    u.status.setdefault("restarts", 0)
    if device and not (u.status.get("placement") or {}).get("device"):  # the DEVICE column
        u.status["placement"] = {**(u.status.get("placement") or {}), "device": device}
    if get_condition(u.conditions, T.VALIDATED) is None:
        u.condition(T.VALIDATED, True, R.SPEC_VALID, "spec and referenced objects are valid")
    generation = int(annotations.get(ANN_STARTED_GENERATION) or u.generation)
    resource = LoRAFineTuneResource(name, ns, meta.get("uid", ""), generation, spec)
    # The operator's index of the pods (cache.py) is enough to observe: _observe confirms with a quorum
    # read before it acts on a pod's absence, and everything else it does is idempotent (AlreadyExists,
    # uid preconditions).
    pods = cached_workers(kube, ns, name)

    start = annotations.get(ANN_ACTIVE_SINCE) or u.status.get("startTime")
    deadline = spec.active_deadline_seconds
    if deadline and start and not spec.suspend:
        elapsed = (u.now - parse_time(start)).total_seconds()
        if elapsed >= deadline:
            _delete(kube, ns, pods, keep_terminated=False)
            _fail(
                u,
                R.DEADLINE_EXCEEDED,
                f"activeDeadlineSeconds ({deadline}) exceeded: {int(elapsed)} s since the job started or resumed; "
                "worker pods deleted",
            )
            return

    if spec.suspend:
        _delete(kube, ns, pods, keep_terminated=False)
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
    _observe(kube, settings, u, resource, device, attempt, pods)


def _observe(
    kube: Kube,
    settings: OperatorSettings,
    u: StatusUpdate,
    resource: LoRAFineTuneResource,
    device: str | None,
    attempt: int,
    pods: Sequence[WorkerState],
    *,
    placed: PlacementDecision | None = None,
    confirmed: bool = False,
) -> None:
    """Act on the attempt's pods: `placed` is a placement just decided (no second node list);
    `confirmed` says `pods` came from a quorum read (see the missing-pod branch)."""
    ns, n = resource.namespace, resource.spec.workers
    stale = [w for w in pods if w.attempt != attempt]
    if stale:
        _delete(kube, ns, stale, keep_terminated=False)
        u.condition(
            T.RUNNING,
            False,
            R.RESTARTING,
            f"waiting for {_plural(len(stale), 'worker pod')} of the previous attempt to terminate before attempt "
            f"{attempt} starts",
        )
        u.status["workers"] = {"ready": 0, "total": n}
        return
    current = {w.index: w for w in pods if not w.deleting}
    # A pod of the current attempt that is being deleted was deleted by someone else (the operator
    # moves to a new attempt before it deletes pods): a node drain, an eviction, `kubectl delete`.
    disrupted = [w for w in pods if w.deleting]
    failure = first_failure(list(pods))
    if failure is not None and failure.exit_code == EXIT_BAD_INPUT:
        _on_failure(kube, u, resource, attempt, list(pods), failure.describe_failure(), failure.exit_code)
        return
    if disrupted:
        # Peers of a disrupted worker typically fail too (broken collectives): all one disruption.
        names = ", ".join(w.name for w in disrupted)
        _on_failure(
            kube, u, resource, attempt, list(pods), f"worker pod(s) {names} deleted (disruption)", EXIT_PREEMPTED
        )
        return
    if failure is not None:
        _on_failure(kube, u, resource, attempt, list(pods), failure.describe_failure(), failure.exit_code)
        return
    w0 = current.get(0)
    if (
        w0 is not None
        and w0.succeeded
        and (
            resource.spec.distributed.launcher == "mpirun"
            or all(i in current and current[i].succeeded for i in range(n))
        )
    ):
        _on_success(kube, u, resource, list(current.values()), w0)
        return
    missing = [i for i in range(n) if i not in current]
    if missing:
        if any(w.running or w.terminated for w in current.values()):
            if not confirmed:
                # Restarting the attempt is destructive: first rule out a cached list that has not
                # seen the pod yet.
                fresh = [worker_state(p) for p in kube.list_pods(ns, worker_selector(resource.name))]
                _observe(kube, settings, u, resource, device, attempt, fresh, confirmed=True)
                return
            if not _never_created(u, attempt, missing, current):
                # The job started and a peer is gone for good (force-deleted): a replacement cannot
                # join the running process group, so the attempt restarts (not counted: not the
                # job's fault).
                names = ", ".join(f"{resource.name}-worker-{i}" for i in missing)
                _on_failure(
                    kube,
                    u,
                    resource,
                    attempt,
                    list(pods),
                    f"worker pod(s) {names} disappeared (disruption)",
                    EXIT_PREEMPTED,
                )
                return
            # else: the operator died between creating the attempt's pods; its peers wait for it at
            # the rendezvous, so it is created now (below) instead of restarting the attempt.
        if _create(kube, settings, u, resource, device, attempt, missing, placed) is None:
            return

    workers = [current[i] for i in sorted(current)]
    bound = [w for w in workers if w.node]
    if len(bound) == n:
        nodes = ", ".join(sorted({w.node for w in bound if w.node}))
        u.condition(
            T.SCHEDULED,
            True,
            R.PODS_SCHEDULED,
            f"{_plural(n, 'worker pod')} of attempt {attempt} bound to {nodes}",
            event="Normal",
        )
    elif waits_for_nodes(resource.spec, settings):
        if _wait_for_nodes(kube, settings, u, resource, attempt, workers, len(bound)):
            return
    else:
        why = next((w.unschedulable for w in workers if w.unschedulable), None)
        msg = f"{len(bound)}/{n} worker pods of attempt {attempt} bound to nodes" + (
            f"; scheduler: {why}" if why else ""
        )
        reason = R.PODS_PENDING if (why or bound) else R.PODS_CREATED
        u.condition(T.SCHEDULED, False, reason, msg)
    running = [w for w in workers if w.running]
    finished = [w for w in workers if w.succeeded]
    if len(running) == n:
        problem = metrics_problem(kube, ns, resource.name)  # a blocked scrape: said here, not only logged
        u.condition(
            T.RUNNING,
            True,
            R.WORKERS_RUNNING,
            f"{_plural(n, 'worker')} running (attempt {attempt})" + (f"; {problem}" if problem else ""),
            # the Event is for the transition; the scrape problem has its own (Runner._scrape_failed)
            event=None if is_true(u.conditions, T.RUNNING) else "Normal",
        )
    else:
        extra = f", {len(finished)} finished" if finished else ""
        stuck = next((f"; worker {w.index}: {w.waiting}" for w in workers if w.waiting), "")
        u.condition(
            T.RUNNING,
            False,
            R.WORKERS_STARTING,
            f"{len(running)}/{n} workers running{extra} (attempt {attempt}){stuck}",
        )
    u.status["workers"] = {"ready": len(running), "total": n}


def _never_created(
    u: StatusUpdate, attempt: int, missing: Sequence[int], current: Mapping[int, WorkerState]
) -> bool:
    """True when the missing workers were never created (not deleted): one pass creates an attempt's
    pods in index order and then writes the Scheduled condition naming the attempt, so missing
    workers that all come after the existing ones, with no Scheduled message about this attempt yet,
    are what a crash in the middle of that pass leaves behind."""
    scheduled = get_condition(u.old.get("conditions"), T.SCHEDULED) or {}
    reported = f"of attempt {attempt} bound" in (scheduled.get("message") or "")
    return not reported and min(missing) > max(current, default=-1)


def _wait_for_nodes(
    kube: Kube,
    settings: OperatorSettings,
    u: StatusUpdate,
    resource: LoRAFineTuneResource,
    attempt: int,
    workers: Sequence[WorkerState],
    bound: int,
) -> bool:
    """Wait mode with unbound workers: Scheduled=False/WaitingForNodes naming what is missing, or, once
    they have been unbound for waitTimeoutSeconds, Failed/NodesNotAvailable. True when the run failed.

    The clock is the Scheduled=False condition's lastTransitionTime: it starts when the attempt's pods
    are created (Scheduled flips to False) and restarts on resume (suspend drops the condition)."""
    n, timeout = resource.spec.workers, wait_timeout_seconds(resource.spec, settings)
    scheduled = get_condition(u.conditions, T.SCHEDULED)
    since = u.now
    if scheduled is not None and scheduled.get("status") == "False" and scheduled.get("lastTransitionTime"):
        since = parse_time(scheduled["lastTransitionTime"])
    waited = int((u.now - since).total_seconds())
    why = next((w.unschedulable for w in workers if w.unschedulable), None)
    missing = f"scheduler: {why}" if why else str((u.status.get("placement") or {}).get("reason", ""))
    head = f"{bound}/{n} worker pods of attempt {attempt} bound to nodes"
    if waited >= timeout:
        msg = (
            f"{head} after waiting {waited} s (waitTimeoutSeconds {timeout}); {missing}; worker pods deleted. "
            "Check that the node pool can scale up (autoscaler limits, instance availability, nodeSelector)"
        )
        _delete(kube, resource.namespace, workers, keep_terminated=False)
        u.condition(T.SCHEDULED, False, R.NODES_NOT_AVAILABLE, msg)
        _fail(u, R.NODES_NOT_AVAILABLE, msg)
        return True
    u.condition(
        T.SCHEDULED,
        False,
        R.WAITING_FOR_NODES,
        f"{head}; waiting for nodes until {format_time(since + timedelta(seconds=timeout))} (whenNoNodeMatches: "
        f"Wait, waitTimeoutSeconds {timeout}): {missing}",
        event="Normal",
    )
    return False


# --------------------------------------------------------------------------- actions


def _as_claimant(body: Mapping[str, Any]) -> Claimant | None:
    """A LoRAFineTune of the namespace as a run-dir claimant (its started spec once started)."""
    meta = body.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    started = ANN_STARTED_SPEC in annotations
    try:
        raw = json.loads(annotations[ANN_STARTED_SPEC]) if started else dict(body.get("spec") or {})
    except ValueError:
        return None
    validated = get_condition((body.get("status") or {}).get("conditions"), T.VALIDATED) or {}
    refused = validated.get("status") == "False" and validated.get("reason") != R.RUN_DIR_IN_USE.value
    return claimant(meta.get("name", ""), meta.get("namespace", ""), meta.get("creationTimestamp", ""), raw,
                    started=started, refused=refused)


def _run_dir_taken(kube: Kube, body: Mapping[str, Any], raw: Mapping[str, Any]) -> str | None:
    """Why this not-yet-started resource may not use its run directory (another one has it), or None."""
    meta = body["metadata"]
    me = claimant(meta["name"], meta["namespace"], meta.get("creationTimestamp", ""), raw, started=False,
                  refused=False)
    if me is None:
        return None
    others = [c for c in map(_as_claimant, kube.list_lfts(meta["namespace"])) if c is not None]
    other = holder(me, others)
    return None if other is None else in_use_message(me, other)


def _place(kube: Kube, settings: OperatorSettings, spec: LoRAFineTuneSpec) -> PlacementDecision:
    nodes = [NodeFacts.from_k8s(node) for node in kube.list_nodes()]
    return decide_placement(spec, nodes, settings)


def _create(
    kube: Kube,
    settings: OperatorSettings,
    u: StatusUpdate,
    resource: LoRAFineTuneResource,
    device: str | None,
    attempt: int,
    missing: Sequence[int],
    placed: PlacementDecision | None = None,
) -> PlacementDecision | None:
    """Create the ConfigMap, Service and the missing pods of `attempt` (idempotent)."""
    spec = resource.spec.model_copy(update={"device": device}) if device else resource.spec
    decision = placed if placed is not None else _place(kube, settings, spec)
    if not decision.ok:
        u.condition(T.SCHEDULED, False, R.NO_MATCHING_NODES, decision.reason, event="Warning")
        return None
    if decision.waiting or not u.status.get("placement", {}).get("device"):
        u.status["placement"] = decision.to_status()  # a waiting decision names the missing pool
    p = plan(resource, decision, settings, attempt=attempt)
    if p.ssh_secret_to_create and p.ssh_secret_name and kube.read_secret(resource.namespace, p.ssh_secret_name) is None:
        private, public = _ssh_keypair(f"kubelora-{resource.namespace}-{resource.name}")
        kube.create_if_absent(ssh_secret(resource, private, public))
    kube.create_if_absent(p.config_map)
    kube.create_if_absent(p.service)
    wanted = set(missing)
    created = 0
    for pod in p.pods:
        if int(pod["metadata"]["labels"][LABEL_WORKER_INDEX]) in wanted and kube.create_if_absent(pod):
            created += 1
    if created:
        u.event(
            "Normal",
            R.PODS_CREATED.value,
            f"created {_plural(created, 'worker pod')} of attempt {attempt} on {decision.device}",
        )
    return decision


def _delete(kube: Kube, namespace: str, pods: Sequence[WorkerState], *, keep_terminated: bool) -> int:
    n = 0
    for w in pods:
        if w.deleting or (keep_terminated and w.terminated):
            continue
        if kube.delete_pod(namespace, w.name, uid=w.uid):
            n += 1
    return n


def _stop_pods(kube: Kube, namespace: str, name: str, *, keep_terminated: bool) -> None:
    pods = [worker_state(p) for p in kube.list_pods(namespace, worker_selector(name))]
    _delete(kube, namespace, pods, keep_terminated=keep_terminated)


def _fail(u: StatusUpdate, reason: R, message: str) -> None:
    u.condition(T.FAILED, True, reason, message, event="Warning")
    u.condition(T.RUNNING, False, reason, message)
    u.status.setdefault("completionTime", u.stamp)
    total = (u.status.get("workers") or {}).get("total")
    if total is not None:
        u.status["workers"] = {"ready": 0, "total": total}


def _on_failure(
    kube: Kube,
    u: StatusUpdate,
    resource: LoRAFineTuneResource,
    attempt: int,
    pods: Sequence[WorkerState],
    description: str,
    exit_code: int | None,
) -> None:
    ns, spec = resource.namespace, resource.spec
    if exit_code == EXIT_BAD_INPUT:
        _delete(kube, ns, pods, keep_terminated=True)  # terminated pods stay for `kubectl logs`
        _fail(u, R.INVALID_SPEC, f"{description} (bad input: not retried)")
        return
    # Exit 143 (SIGTERM, after a checkpoint) and pods deleted by others are disruptions, not failures
    # of the job: the next attempt resumes without counting against backoffLimit.
    preempted = exit_code == EXIT_PREEMPTED
    restarts = int(u.status.get("restarts") or 0)
    if not preempted and restarts >= spec.backoff_limit:
        _delete(kube, ns, pods, keep_terminated=True)
        _fail(
            u,
            R.BACKOFF_LIMIT_EXCEEDED,
            f"{description}; backoffLimit {spec.backoff_limit} reached after {_plural(restarts, 'restart')}",
        )
        return
    attempt += 1
    kube.patch_lft_annotations(ns, resource.name, {ANN_ATTEMPT: str(attempt)})
    if not preempted:
        restarts += 1
        u.status["restarts"] = restarts
    # Stable pod names: the whole attempt goes, then the next one is created under the same names.
    _delete(kube, ns, pods, keep_terminated=False)
    why = "disruption, not counted" if preempted else f"restart {restarts}/{spec.backoff_limit}"
    u.condition(
        T.RUNNING,
        False,
        R.RESTARTING,
        f"{description}; attempt {attempt} resumes from the newest checkpoint ({why})",
        event="Warning",
        event_reason=R.WORKER_FAILED.value,
    )
    u.status["workers"] = {"ready": 0, "total": spec.workers}


def _on_success(
    kube: Kube, u: StatusUpdate, resource: LoRAFineTuneResource, pods: Sequence[WorkerState], w0: WorkerState
) -> None:
    artifact = parse_success_message(w0.message) or {}
    artifact.setdefault("uri", artifact_uri(resource))
    _delete(kube, resource.namespace, pods, keep_terminated=True)  # mpirun: the sshd workers
    u.status["artifact"] = artifact
    u.status.setdefault("completionTime", u.stamp)
    details = f"adapter at {artifact['uri']}"
    if "sha256" in artifact:
        details += f" (sha256 {artifact['sha256'][:12]}..., {artifact.get('sizeBytes', '?')} bytes)"
    u.condition(T.SUCCEEDED, True, R.TRAINING_COMPLETE, f"training complete; {details}", event="Normal")
    u.condition(T.RUNNING, False, R.TRAINING_COMPLETE, "all workers finished")
    progress = dict(u.status.get("progress") or {})
    # The trainer's final gauges: a run shorter than one scrape interval has no scraped progress at all.
    progress.update(progress_from_metrics(parse_success_metrics(w0.message)))
    if progress.get("totalSteps"):
        progress["step"] = progress["totalSteps"]
    progress.update(percent=100, etaSeconds=0)
    u.status["progress"] = progress
    u.status["workers"] = {"ready": 0, "total": resource.spec.workers}


def _ssh_keypair(comment: str) -> tuple[str, str]:
    """An ed25519 key pair for mpirun's sshd (ssh-keygen must be on PATH in the operator image)."""
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "id"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
            check=True,
            capture_output=True,
            env={**os.environ, "LC_ALL": "C"},
        )
        return key.read_text(), (Path(tmp) / "id.pub").read_text()
