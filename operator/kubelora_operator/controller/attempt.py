"""One started attempt: sort its worker pods (`observe`), then take the one step they call for.

`advance` is the whole flow, in the order the steps are tried:

1. `wait_for_previous`: pods of an earlier attempt still exist -> delete them and wait;
2. `restart_or_fail`: a worker failed, was deleted by someone else, or disappeared -> the next
   attempt (or Failed when the input is bad or backoffLimit is reached);
3. `finish`: worker 0 (and, for torchrun, every worker) succeeded -> Succeeded with the artifact;
4. `create`: workers of this attempt are missing -> create them (Service, pods; the ConfigMap unless
   this pass committed it);
5. `report`: Scheduled / Running conditions and the ready count from the pods as they are.

Every step is idempotent on a cached (possibly late) view of the pods except one: restarting the
attempt because a worker is missing while its peers run. Before that decision the pods are re-read
from etcd (a quorum LIST) and the steps run once more on that answer (`advance`).

A step gets an `Attempt` (what the pass works on) and an `Observation` (the sorted pods); a new step
is one more function of that shape, called from `_step`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

from kubelora_trainer.contract import EXIT_BAD_INPUT, EXIT_PREEMPTED, parse_success_message, parse_success_metrics

from ..api import LoRAFineTuneResource
from ..conditions import ConditionReason as R
from ..conditions import ConditionType as T
from ..conditions import format_time, get_condition, is_true
from ..kube import Kube
from ..placement import PlacementDecision, wait_timeout_seconds, waits_for_nodes
from ..plan import LABEL_WORKER_INDEX, Plan, artifact_uri, plan, ssh_secret, worker_selector
from ..settings import OperatorSettings
from .actions import delete_pods, fail, parse_time, place, plural, ssh_keypair
from .cache import metrics_problem
from .pods import WorkerState, first_failure, worker_state
from .progress import progress_from_metrics
from .started import ANN_ATTEMPT, StartRecord
from .status import StatusUpdate

#: Threads creating the Services (and ConfigMaps) beside the pods (`create`), shared by all reconciles.
CREATE_THREADS = 16
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _creator() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(CREATE_THREADS, thread_name_prefix="kubelora-create")
        return _pool


@dataclass
class Attempt:
    """What every step of one reconcile pass over a started attempt works on."""

    kube: Kube
    settings: OperatorSettings
    u: StatusUpdate
    resource: LoRAFineTuneResource
    device: str | None
    number: int
    placed: PlacementDecision | None = None
    """A placement decided in this pass (the start): `create` reuses it instead of listing nodes again."""
    record: StartRecord | None = None
    """The start record, which the ConfigMap carries (a ConfigMap created again keeps it)."""
    committed: Plan | None = None
    """The plan whose ConfigMap this pass created (the commit point): `create` uses it and leaves the
    ConfigMap out (rendering the trainer config is most of a plan's cost)."""

    @property
    def namespace(self) -> str:
        return self.resource.namespace

    @property
    def workers(self) -> int:
        return self.resource.spec.workers


@dataclass(frozen=True)
class Observation:
    """An attempt's worker pods, sorted into what the steps act on (`observe`)."""

    pods: list[WorkerState]
    stale: list[WorkerState]
    """Pods of an earlier attempt."""
    current: dict[int, WorkerState]
    """This attempt's pods that are not being deleted, by worker index."""
    disrupted: list[WorkerState]
    """This attempt's pods being deleted by someone else (drain, eviction, `kubectl delete`): the
    operator moves to a new attempt before it deletes pods."""
    failure: WorkerState | None
    missing: list[int] = field(default_factory=list)
    """Worker indexes with no current pod."""

    @property
    def started(self) -> bool:
        """Some current worker runs or ran (a missing peer is then not merely not created yet)."""
        return any(w.running or w.terminated for w in self.current.values())

    @property
    def sorted_current(self) -> list[WorkerState]:
        return [self.current[i] for i in sorted(self.current)]


def observe(pods: Sequence[WorkerState], attempt: int, workers: int) -> Observation:
    """Sort the pods (pure)."""
    current = {w.index: w for w in pods if not w.deleting}
    return Observation(
        pods=list(pods),
        stale=[w for w in pods if w.attempt != attempt],
        current=current,
        disrupted=[w for w in pods if w.deleting],
        failure=first_failure(list(pods)),
        missing=[i for i in range(workers) if i not in current],
    )


def advance(a: Attempt, pods: Sequence[WorkerState]) -> None:
    """Take the step the pods call for; confirm a missing worker with a quorum read first (module docstring)."""
    if _step(a, observe(pods, a.number, a.workers), confirmed=False):
        fresh = [worker_state(p) for p in a.kube.list_pods(a.namespace, worker_selector(a.resource.name))]
        _step(a, observe(fresh, a.number, a.workers), confirmed=True)


def _step(a: Attempt, seen: Observation, *, confirmed: bool) -> bool:
    """Run the first step that applies. True when the pass needs the pods from a quorum read first:
    a worker is missing while its peers run and `seen` was not confirmed."""
    if seen.stale:
        wait_for_previous(a, seen.stale)
        return False
    failure = seen.failure
    if failure is not None and failure.exit_code == EXIT_BAD_INPUT:
        restart_or_fail(a, seen.pods, failure.describe_failure(), failure.exit_code)
    elif seen.disrupted:
        # Peers of a disrupted worker typically fail too (broken collectives): all one disruption.
        names = ", ".join(w.name for w in seen.disrupted)
        restart_or_fail(a, seen.pods, f"worker pod(s) {names} deleted (disruption)", EXIT_PREEMPTED)
    elif failure is not None:
        restart_or_fail(a, seen.pods, failure.describe_failure(), failure.exit_code)
    elif _succeeded(a, seen):
        finish(a, seen)
    elif seen.missing and seen.started and not confirmed:
        return True  # restarting is destructive: rule out a cached list that has not seen the pod yet
    elif seen.missing and seen.started and not _never_created(a, seen):
        # The job started and a peer is gone for good (force-deleted): a replacement cannot join the
        # running process group, so the attempt restarts (not counted: not the job's fault).
        names = ", ".join(f"{a.resource.name}-worker-{i}" for i in seen.missing)
        restart_or_fail(a, seen.pods, f"worker pod(s) {names} disappeared (disruption)", EXIT_PREEMPTED)
    else:
        # Missing workers are created here, also one whose peers started but that was never created
        # (the operator died between creating the attempt's pods; its peers wait at the rendezvous).
        if seen.missing and create(a, seen.missing) is None:
            return False  # no node matches: create said so
        report(a, seen)
    return False


def _succeeded(a: Attempt, seen: Observation) -> bool:
    w0 = seen.current.get(0)
    if w0 is None or not w0.succeeded:
        return False
    n = a.workers
    return a.resource.spec.distributed.launcher == "mpirun" or all(
        i in seen.current and seen.current[i].succeeded for i in range(n)
    )


def _never_created(a: Attempt, seen: Observation) -> bool:
    """True when the missing workers were never created (not deleted): one pass creates an attempt's
    pods in index order and then writes the Scheduled condition naming the attempt, so missing
    workers that all come after the existing ones, with no Scheduled message about this attempt yet,
    are what a crash in the middle of that pass leaves behind."""
    scheduled = get_condition(a.u.old.get("conditions"), T.SCHEDULED) or {}
    reported = f"of attempt {a.number} bound" in (scheduled.get("message") or "")
    return not reported and min(seen.missing) > max(seen.current, default=-1)


# --------------------------------------------------------------------------- steps


def wait_for_previous(a: Attempt, stale: Sequence[WorkerState]) -> None:
    """Delete the previous attempt's pods; the new attempt starts once they are gone."""
    delete_pods(a.kube, a.namespace, stale, keep_terminated=False)
    a.u.condition(
        T.RUNNING,
        False,
        R.RESTARTING,
        f"waiting for {plural(len(stale), 'worker pod')} of the previous attempt to terminate before attempt "
        f"{a.number} starts",
    )
    a.u.status["workers"] = {"ready": 0, "total": a.workers}


def restart_or_fail(a: Attempt, pods: Sequence[WorkerState], description: str, exit_code: int | None) -> None:
    """A worker failed or went away: Failed (bad input, backoffLimit reached) or the next attempt.

    Exit 143 (SIGTERM, after a checkpoint) and pods deleted by others are disruptions, not failures
    of the job: the next attempt resumes without counting against backoffLimit."""
    kube, u, ns, spec = a.kube, a.u, a.namespace, a.resource.spec
    if exit_code == EXIT_BAD_INPUT:
        delete_pods(kube, ns, pods, keep_terminated=True)  # terminated pods stay for `kubectl logs`
        fail(u, R.INVALID_SPEC, f"{description} (bad input: not retried)")
        return
    preempted = exit_code == EXIT_PREEMPTED
    restarts = int(u.status.get("restarts") or 0)
    if not preempted and restarts >= spec.backoff_limit:
        delete_pods(kube, ns, pods, keep_terminated=True)
        fail(
            u,
            R.BACKOFF_LIMIT_EXCEEDED,
            f"{description}; backoffLimit {spec.backoff_limit} reached after {plural(restarts, 'restart')}",
        )
        return
    attempt = a.number + 1
    kube.patch_lft_annotations(ns, a.resource.name, {ANN_ATTEMPT: str(attempt)})
    if not preempted:
        restarts += 1
        u.status["restarts"] = restarts
    # Stable pod names: the whole attempt goes, then the next one is created under the same names.
    delete_pods(kube, ns, pods, keep_terminated=False)
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


def finish(a: Attempt, seen: Observation) -> None:
    """Succeeded: the artifact from worker 0's termination message, progress at 100 %."""
    u, w0 = a.u, seen.current[0]
    artifact = parse_success_message(w0.message) or {}
    artifact.setdefault("uri", artifact_uri(a.resource))
    delete_pods(a.kube, a.namespace, list(seen.current.values()), keep_terminated=True)  # mpirun: the sshd workers
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
    u.status["workers"] = {"ready": 0, "total": a.workers}


def create(a: Attempt, missing: Sequence[int]) -> PlacementDecision | None:
    """Create the ConfigMap (unless this pass committed it), Service and the missing pods of the attempt
    (idempotent). None when no node matches (said in the Scheduled condition)."""
    kube, u, resource = a.kube, a.u, a.resource
    spec = resource.spec.model_copy(update={"device": a.device}) if a.device else resource.spec
    decision = a.placed if a.placed is not None else place(kube, a.settings, spec)
    if not decision.ok:
        u.condition(T.SCHEDULED, False, R.NO_MATCHING_NODES, decision.reason, event="Warning")
        return None
    if decision.waiting or not u.status.get("placement", {}).get("device"):
        u.status["placement"] = decision.to_status()  # a waiting decision names the missing pool
    p = a.committed or plan(resource, decision, a.settings, attempt=a.number, record=a.record.annotations() if a.record else None)
    if p.ssh_secret_to_create and p.ssh_secret_name and kube.read_secret(resource.namespace, p.ssh_secret_name) is None:
        private, public = ssh_keypair(f"kubelora-{resource.namespace}-{resource.name}")
        kube.create_if_absent(ssh_secret(resource, private, public))
    # The Service (and the ConfigMap of a later attempt, normally there already) are created beside the
    # pods rather than before them (a pod waits for its volume and its peers' DNS names anyway): round
    # trips fewer before the first pod. The pods stay in index order, one after the other
    # (`_never_created` relies on it).
    beside_objs = (p.service,) if a.committed is not None else (p.config_map, p.service)
    beside = [_creator().submit(kube.create_if_absent, obj) for obj in beside_objs]
    wanted = set(missing)
    created = 0
    for pod in p.pods:
        if int(pod["metadata"]["labels"][LABEL_WORKER_INDEX]) in wanted and kube.create_if_absent(pod):
            created += 1
    for f in beside:
        f.result()  # its API errors are this pass's errors
    if created:
        u.created_pods = True
        u.event(
            "Normal",
            R.PODS_CREATED.value,
            f"created {plural(created, 'worker pod')} of attempt {a.number} on {decision.device}",
        )
    return decision


def report(a: Attempt, seen: Observation) -> None:
    """Scheduled and Running conditions and `status.workers` from the attempt's current pods."""
    u, n, attempt = a.u, a.workers, a.number
    workers = seen.sorted_current
    bound = [w for w in workers if w.node]
    if len(bound) == n:
        nodes = ", ".join(sorted({w.node for w in bound if w.node}))
        u.condition(
            T.SCHEDULED,
            True,
            R.PODS_SCHEDULED,
            f"{plural(n, 'worker pod')} of attempt {attempt} bound to {nodes}",
            event="Normal",
        )
    elif waits_for_nodes(a.resource.spec, a.settings):
        if wait_for_nodes(a, workers, len(bound)):
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
        problem = metrics_problem(a.kube, a.namespace, a.resource.name)  # a blocked scrape: said here, not only logged
        u.condition(
            T.RUNNING,
            True,
            R.WORKERS_RUNNING,
            f"{plural(n, 'worker')} running (attempt {attempt})" + (f"; {problem}" if problem else ""),
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


def wait_for_nodes(a: Attempt, workers: Sequence[WorkerState], bound: int) -> bool:
    """Wait mode with unbound workers: Scheduled=False/WaitingForNodes naming what is missing, or, once
    they have been unbound for waitTimeoutSeconds, Failed/NodesNotAvailable. True when the run failed.

    The clock is the Scheduled=False condition's lastTransitionTime: it starts when the attempt's pods
    are created (Scheduled flips to False) and restarts on resume (suspend drops the condition)."""
    u = a.u
    n, timeout = a.workers, wait_timeout_seconds(a.resource.spec, a.settings)
    scheduled = get_condition(u.conditions, T.SCHEDULED)
    since = u.now
    if scheduled is not None and scheduled.get("status") == "False" and scheduled.get("lastTransitionTime"):
        since = parse_time(scheduled["lastTransitionTime"])
    waited = int((u.now - since).total_seconds())
    why = next((w.unschedulable for w in workers if w.unschedulable), None)
    missing = f"scheduler: {why}" if why else str((u.status.get("placement") or {}).get("reason", ""))
    head = f"{bound}/{n} worker pods of attempt {a.number} bound to nodes"
    if waited >= timeout:
        msg = (
            f"{head} after waiting {waited} s (waitTimeoutSeconds {timeout}); {missing}; worker pods deleted. "
            "Check that the node pool can scale up (autoscaler limits, instance availability, nodeSelector)"
        )
        delete_pods(a.kube, a.namespace, workers, keep_terminated=False)
        u.condition(T.SCHEDULED, False, R.NODES_NOT_AVAILABLE, msg)
        fail(u, R.NODES_NOT_AVAILABLE, msg)
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
