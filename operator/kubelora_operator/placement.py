"""Placement: decide from the nodes' facts whether (and how) workers can run on Intel GPUs or AMX CPUs.

Why pure and capacity-based: the question answered here is "can this request ever be satisfied by
these nodes", not "is there room right now" (the scheduler answers that and pods merely wait). Using
*allocatable* capacity, labels, cordons, taints and the user's own nodeSelector/affinity, a request no
node can ever fit ends in a NoMatchingNodes condition saying what was asked and what exists, instead of
pods Pending forever. Several workers may share a node when its capacity allows, so feasibility is a
count of worker *slots* over all nodes. Taints and cordons can be temporary, so the handler should
re-evaluate on a timer while Scheduled=False.

That fail-fast answer is wrong on autoscaled clusters: a cluster-autoscaler or Karpenter adds a node
only for a Pending pod, so a pool at zero would never grow. `whenNoNodeMatches: Wait` therefore turns
"no node can take them" into a *waiting* decision: the same requests and constraints, pods created,
the missing pool named in the reason (the handler enforces the wait deadline).

Over 400 lines on purpose: one pure decision whose steps (slots per node, the exclusions and their
reasons, the Wait mode) share one evaluation; split, a NoMatchingNodes message would be assembled
in several modules.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from .api import LoRAFineTuneSpec, PlacementSpec
from .conditions import ConditionReason
from .k8s_types import parse_quantity
from .settings import OperatorSettings, parse_label

Device = Literal["xpu", "cpu"]


@dataclass(frozen=True)
class Taint:
    """A node taint (only NoSchedule and NoExecute keep new pods away)."""

    key: str
    value: str | None
    effect: str


@dataclass(frozen=True)
class NodeFacts:
    """What placement needs to know about one Node."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    allocatable: Mapping[str, str] = field(default_factory=dict)
    unschedulable: bool = False
    taints: tuple[Taint, ...] = ()

    @classmethod
    def from_k8s(cls, node: Mapping[str, Any]) -> NodeFacts:
        """Build from a Node as a JSON-like dict (kopf body, or ApiClient.sanitize_for_serialization)."""
        meta = node.get("metadata") or {}
        spec = node.get("spec") or {}
        status = node.get("status") or {}
        taints = tuple(
            Taint(key=t.get("key", ""), value=t.get("value"), effect=t.get("effect", ""))
            for t in spec.get("taints") or ()
        )
        allocatable = status.get("allocatable") or status.get("capacity") or {}
        return cls(
            name=meta.get("name", ""),
            labels=dict(meta.get("labels") or {}),
            allocatable={k: str(v) for k, v in allocatable.items()},
            unschedulable=bool(spec.get("unschedulable")),
            taints=taints,
        )

    def amount(self, resource: str) -> Decimal:
        """Allocatable amount of a resource in base units (0 when absent or unparsable)."""
        raw = self.allocatable.get(resource)
        if raw is None:
            return Decimal(0)
        try:
            return parse_quantity(raw)
        except ValueError:
            return Decimal(0)

    def has_label(self, key: str, value: str | None) -> bool:
        """Whether the node carries `key` (with `value`, when given)."""
        return key in self.labels and (value is None or self.labels[key] == value)


@dataclass(frozen=True)
class PlacementDecision:
    """Where workers go and what they request; `device is None` means no node can take them."""

    device: Device | None
    reason: str
    condition_reason: ConditionReason
    node_pool: str | None = None
    requests: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, str] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    affinity: Mapping[str, Any] | None = None
    tolerations: Sequence[Mapping[str, Any]] = ()
    feasible_nodes: tuple[str, ...] = ()
    slots: int = 0
    waiting: bool = False
    """Wait mode: no node can take the workers now; pods are created for an autoscaler to act on."""

    @property
    def ok(self) -> bool:
        """Whether worker pods can be created."""
        return self.device is not None

    def to_status(self) -> dict[str, Any]:
        """`status.placement` (camelCase, as the CRD declares it)."""
        out: dict[str, Any] = {"reason": self.reason}
        if self.device is not None:
            out["device"] = self.device
        if self.node_pool is not None:
            out["nodePool"] = self.node_pool
        return out


# --------------------------------------------------------------------------- node matching


def _tolerates(tolerations: Iterable[Mapping[str, Any]], taint: Taint) -> bool:
    for tol in tolerations:
        effect = tol.get("effect") or ""
        if effect and effect != taint.effect:
            continue
        op = tol.get("operator") or "Equal"
        key = tol.get("key") or ""
        if op == "Exists" and (not key or key == taint.key):
            return True
        if op == "Equal" and key == taint.key and (tol.get("value") or "") == (taint.value or ""):
            return True
    return False


def _expression_matches(values: Mapping[str, str], expr: Mapping[str, Any]) -> bool:
    key, op, wanted = expr.get("key", ""), expr.get("operator", ""), list(expr.get("values") or ())
    present = key in values
    if op == "In":
        return present and values[key] in wanted
    if op == "NotIn":
        return not present or values[key] not in wanted
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt") and present and wanted:
        try:
            have, bound = int(values[key]), int(wanted[0])
        except ValueError:
            return False
        return have > bound if op == "Gt" else have < bound
    return False


def _required_terms(affinity: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    node_affinity = (affinity or {}).get("nodeAffinity") or {}
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    return list(required.get("nodeSelectorTerms") or [])


def _terms_match(node: NodeFacts, terms: list[Mapping[str, Any]]) -> bool:
    """Node selector terms are ORed; expressions inside a term are ANDed (as the scheduler does)."""
    if not terms:
        return True
    fields = {"metadata.name": node.name}
    for term in terms:
        exprs = term.get("matchExpressions") or []
        field_exprs = term.get("matchFields") or []
        if not exprs and not field_exprs:
            continue  # an empty term matches nothing
        if all(_expression_matches(node.labels, e) for e in exprs) and all(
            _expression_matches(fields, e) for e in field_exprs
        ):
            return True
    return False


def _admits(node: NodeFacts, extra: PlacementSpec) -> str | None:
    """Why the node is excluded by cordon, taints or the user's constraints (None: it is not)."""
    if node.unschedulable:
        return "cordoned"
    for taint in node.taints:
        if taint.effect in ("NoSchedule", "NoExecute") and not _tolerates(extra.tolerations, taint):
            return f"taint {taint.key}:{taint.effect}"
    if any(node.labels.get(k) != v for k, v in extra.node_selector.items()):
        return "not in spec.placement.nodeSelector"
    if not _terms_match(node, _required_terms(extra.affinity)):
        return "outside spec.placement.affinity"
    return None


def label_expression(label: str) -> dict[str, Any]:
    """A node-selector expression requiring a `key=value` (In) or bare `key` (Exists) label."""
    key, value = parse_label(label)
    if value is None:
        return {"key": key, "operator": "Exists"}
    return {"key": key, "operator": "In", "values": [value]}


def merge_required_affinity(affinity: Mapping[str, Any] | None, exprs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """AND `exprs` into the user's required node affinity (added to every ORed term)."""
    if not exprs:
        return copy.deepcopy(dict(affinity)) if affinity else None
    out: dict[str, Any] = copy.deepcopy(dict(affinity or {}))
    node_affinity = out.setdefault("nodeAffinity", {})
    required = node_affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms") or [{}]
    for term in terms:
        term.setdefault("matchExpressions", []).extend(copy.deepcopy(exprs))
    required["nodeSelectorTerms"] = terms
    return out


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class _Evaluation:
    device: Device
    requests: dict[str, str]
    limits: dict[str, str]
    pool_label: str | None  # required label, if any
    pool: list[NodeFacts]  # admitted nodes of the device's pool
    slots: dict[str, int]  # node name -> workers it can hold
    excluded: dict[
        str, int
    ]  # pool nodes excluded, by why: "cordoned", "taint k:NoSchedule", "not in spec.placement.nodeSelector", ...

    @property
    def total(self) -> int:
        return sum(self.slots.values())


def _fmt_gpus(n: int) -> str:
    return f"{n} GPU" + ("" if n == 1 else "s")


def _workers(n: int) -> str:
    return f"{n} worker" + ("" if n == 1 else "s")


def _nodes(n: int, verb: str) -> str:
    """`1 node offers` / `3 nodes offer` (verb given in the plural)."""
    singular = {"carry": "carries"}.get(verb, verb + "s")
    return f"{n} node {singular}" if n == 1 else f"{n} nodes {verb}"


def _evaluate(
    spec: LoRAFineTuneSpec, device: Device, nodes: Sequence[NodeFacts], settings: OperatorSettings
) -> _Evaluation:
    res = spec.resources
    requests = {"cpu": str(res.cpu), "memory": str(res.memory)}
    if device == "xpu":
        requests[settings.gpu_resource] = str(res.gpus)
        # Extended resources need limit == request; no CPU limit on GPU workers (throttling hurts the host side).
        limits = {settings.gpu_resource: str(res.gpus), "memory": str(res.memory)}
        pool_label = settings.gpu_node_label
    else:
        # Guaranteed QoS on CPU workers: the static CPU manager can then pin whole cores for AMX.
        limits = {"cpu": str(res.cpu), "memory": str(res.memory)}
        pool_label = settings.amx_node_label
    wanted = {k: parse_quantity(v) for k, v in requests.items()}

    in_pool = []
    for node in nodes:
        if pool_label is not None and not node.has_label(*parse_label(pool_label)):
            continue
        if device == "xpu" and node.amount(settings.gpu_resource) <= 0:
            continue
        in_pool.append(node)
    why_not = {n.name: _admits(n, spec.placement) for n in in_pool}
    admitted = [n for n in in_pool if why_not[n.name] is None]
    excluded = Counter(why for why in why_not.values() if why is not None)
    slots: dict[str, int] = {}
    for node in admitted:
        fits = min(int(node.amount(k) // v) for k, v in wanted.items() if v > 0)
        if fits > 0:
            slots[node.name] = fits
    return _Evaluation(device, requests, limits, pool_label, admitted, slots, dict(excluded))


def _ask(spec: LoRAFineTuneSpec, ev: _Evaluation, settings: OperatorSettings) -> str:
    res = spec.resources
    if ev.device == "xpu":
        return (
            f"{_workers(spec.workers)} with {res.gpus} {settings.gpu_resource}, {res.cpu} CPU and {res.memory} "
            "memory each"
        )
    return f"{_workers(spec.workers)} with {res.cpu} CPU and {res.memory} memory each on nodes labelled {settings.amx_node_label}"


def _exclusions(excluded: Mapping[str, int]) -> str:
    """`2 cordoned, 1 taint a:NoSchedule`: what keeps pool nodes out, so the user knows what to undo."""
    return ", ".join(f"{n} {why}" for why, n in sorted(excluded.items(), key=lambda kv: (-kv[1], kv[0])))


def _offer(ev: _Evaluation, settings: OperatorSettings, all_nodes: int) -> str:
    n_excluded = sum(ev.excluded.values())
    excluded = f" ({n_excluded} more excluded: {_exclusions(ev.excluded)})" if n_excluded else ""
    if not ev.pool and n_excluded:  # the pool exists, but every node of it is cordoned, tainted or not selected
        has = settings.gpu_resource if ev.device == "xpu" else settings.amx_node_label
        verb = "offer" if ev.device == "xpu" else "carry"
        every = "it is" if n_excluded == 1 else "all are"
        return f"{_nodes(n_excluded, verb)} {has}, but {every} excluded: {_exclusions(ev.excluded)}"
    if ev.device == "xpu":
        if not ev.pool:
            return f"no node of {all_nodes} offers {settings.gpu_resource}{excluded}"
        most = max(int(n.amount(settings.gpu_resource)) for n in ev.pool)
        return (
            f"{_nodes(len(ev.pool), 'offer')} {settings.gpu_resource} (max {most} per node){excluded}, "
            f"room for {_workers(ev.total)}"
        )
    if not ev.pool:
        return f"no node of {all_nodes} carries {settings.amx_node_label}{excluded}"
    return f"{_nodes(len(ev.pool), 'carry')} {settings.amx_node_label}{excluded}, room for {_workers(ev.total)}"


def _decide(spec: LoRAFineTuneSpec, ev: _Evaluation, settings: OperatorSettings, prefix: str) -> PlacementDecision:
    res = spec.resources
    if ev.device == "xpu":
        most = max(int(n.amount(settings.gpu_resource)) for n in ev.pool)
        reason = (
            f"{_nodes(len(ev.pool), 'offer')} {settings.gpu_resource} (max {most} per node); placing "
            f"{_workers(spec.workers)} with {_fmt_gpus(res.gpus)} each"
        )
    else:
        reason = (
            f"{_nodes(len(ev.pool), 'carry')} {settings.amx_node_label} (room for {_workers(ev.total)}); placing "
            f"{_workers(spec.workers)} with {res.cpu} CPU and {res.memory} memory each"
        )
    return _decision(spec, ev, settings, prefix + reason)


def _decision(
    spec: LoRAFineTuneSpec, ev: _Evaluation, settings: OperatorSettings, reason: str, *, waiting: bool = False
) -> PlacementDecision:
    """The pods' scheduling fields for `ev.device`: identical whether nodes fit now or are waited for."""
    exprs = [label_expression(ev.pool_label)] if ev.pool_label else []
    if ev.device == "xpu":
        pool = f"{settings.gpu_resource}>={spec.resources.gpus}" + (f",{ev.pool_label}" if ev.pool_label else "")
    else:
        pool = settings.amx_node_label
    return PlacementDecision(
        device=ev.device,
        reason=reason,
        condition_reason=ConditionReason.WAITING_FOR_NODES if waiting else ConditionReason.PODS_CREATED,
        waiting=waiting,
        node_pool=pool,
        requests=dict(ev.requests),
        limits=dict(ev.limits),
        node_selector=dict(spec.placement.node_selector),
        affinity=merge_required_affinity(spec.placement.affinity, exprs),
        tolerations=[copy.deepcopy(t) for t in spec.placement.tolerations],
        feasible_nodes=tuple(sorted(ev.slots)),
        slots=ev.total,
    )


def waits_for_nodes(spec: LoRAFineTuneSpec, settings: OperatorSettings) -> bool:
    """Whether the resource is in `Wait` mode (its own `placement.whenNoNodeMatches`, else the operator's)."""
    return (spec.placement.when_no_node_matches or settings.when_no_node_matches) == "Wait"


def wait_timeout_seconds(spec: LoRAFineTuneSpec, settings: OperatorSettings) -> int:
    """How long `Wait` mode lets worker pods stay unbound (the resource's value, else the operator's)."""
    return spec.placement.wait_timeout_seconds or settings.placement_wait_seconds


def _devices(spec: LoRAFineTuneSpec, settings: OperatorSettings) -> list[Device]:
    """Devices to consider, in order: the explicit one; for `auto` the operator's preference order when
    GPUs are requested, else cpu."""
    if spec.device != "auto":
        return [spec.device]
    if spec.resources.gpus < 1:
        return ["cpu"]
    return list(settings.auto_device_preference)


def decide_placement(
    spec: LoRAFineTuneSpec, nodes: Sequence[NodeFacts], settings: OperatorSettings
) -> PlacementDecision:
    """Choose xpu or cpu (for `auto`), or explain why no node can take the workers.

    xpu: nodes with the Intel GPU resource (and the optional GPU node label) whose allocatable GPUs,
    CPU and memory fit at least one worker; cpu: nodes with the AMX label likewise. `auto` considers
    devices in `settings.auto_device_preference` order (xpu only with `resources.gpus` >= 1).
    `Fail` mode: the first device with room for every worker, else NoMatchingNodes (device None).
    `Wait` mode: `auto` considers its first device only (a GPU pool scaled to zero must not turn a
    run into a CPU run because AMX nodes happen to be up); when it has no room the decision is a
    waiting one (`waiting`, WaitingForNodes) with the same scheduling fields.
    """
    wait = waits_for_nodes(spec, settings)
    devices = _devices(spec, settings)
    candidates = [_evaluate(spec, d, nodes, settings) for d in (devices[:1] if wait else devices)]
    for i, ev in enumerate(candidates):
        if ev.total >= spec.workers:
            prefix = ""
            if i > 0:  # auto fell back to a less preferred device: say why not the first
                prefix = f"auto: not {candidates[0].device} ({_offer(candidates[0], settings, len(nodes))}); "
            elif spec.device == "auto":
                prefix = "auto: "
            return _decide(spec, ev, settings, prefix)
    asked = "; ".join(
        f"{ev.device}: asked for {_ask(spec, ev, settings)}, but {_offer(ev, settings, len(nodes))}"
        for ev in candidates
    )
    if wait:
        timeout = wait_timeout_seconds(spec, settings)
        return _decision(
            spec,
            candidates[0],
            settings,
            f"waiting up to {timeout} s for nodes (whenNoNodeMatches: Wait): {asked}",
            waiting=True,
        )
    return PlacementDecision(
        device=None,
        reason=f"no matching nodes: {asked}",
        condition_reason=ConditionReason.NO_MATCHING_NODES,
    )
