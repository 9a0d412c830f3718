"""Placement on Intel GPU and AMX nodes from the nodes' facts."""

from __future__ import annotations

from kubelora_operator.placement import NodeFacts, Taint, decide_placement, merge_required_affinity
from kubelora_operator.settings import OperatorSettings

from . import SETTINGS, amx_node, gpu_node, plain_node, resource

AMX_EXPR = {"key": "feature.node.kubernetes.io/cpu-cpuid.AMXBF16", "operator": "In", "values": ["true"]}


def decide(nodes: list[NodeFacts], settings: OperatorSettings = SETTINGS, **over):  # type: ignore[no-untyped-def]
    return decide_placement(resource(**over).spec, nodes, settings)


def test_node_facts_from_k8s() -> None:
    node = {
        "metadata": {"name": "n1", "labels": {"a": "b"}},
        "spec": {"unschedulable": True, "taints": [{"key": "gpu", "value": "x", "effect": "NoSchedule"}]},
        "status": {"allocatable": {"gpu.intel.com/i915": "2", "cpu": "31500m", "memory": "120Gi"}},
    }
    facts = NodeFacts.from_k8s(node)
    assert facts == NodeFacts(
        "n1",
        {"a": "b"},
        {"gpu.intel.com/i915": "2", "cpu": "31500m", "memory": "120Gi"},
        True,
        (Taint("gpu", "x", "NoSchedule"),),
    )
    assert facts.amount("cpu") == 31.5 and facts.amount("missing") == 0
    assert NodeFacts.from_k8s({"metadata": {"name": "bare"}}).allocatable == {}


def test_xpu_single_worker() -> None:
    d = decide([gpu_node("g1", gpus=1)], device="xpu")
    assert d.ok and d.device == "xpu"
    assert d.requests == {"cpu": "4", "memory": "16Gi", "gpu.intel.com/i915": "1"}
    assert d.limits == {"gpu.intel.com/i915": "1", "memory": "16Gi"}
    assert d.affinity is None  # the resource request is the selector; no label required by default
    assert d.reason == "1 node offers gpu.intel.com/i915 (max 1 per node); placing 1 worker with 1 GPU each"
    assert d.to_status() == {"device": "xpu", "nodePool": "gpu.intel.com/i915>=1", "reason": d.reason}


def test_workers_share_nodes_when_capacity_allows() -> None:
    nodes = [gpu_node("g1", gpus=4), gpu_node("g2", gpus=1), plain_node("p")]
    d = decide(nodes, device="xpu", workers=2, resources={"gpus": 2})
    assert d.ok and d.slots == 2 and d.feasible_nodes == ("g1",)
    assert "2 nodes offer gpu.intel.com/i915 (max 4 per node); placing 2 workers with 2 GPUs each" in d.reason
    d = decide(nodes, device="xpu", workers=3, resources={"gpus": 2})
    assert not d.ok and d.condition_reason.value == "NoMatchingNodes"
    assert "asked for 3 workers with 2 gpu.intel.com/i915" in d.reason and "room for 2 workers" in d.reason


def test_cpu_and_memory_also_limit_slots() -> None:
    d = decide(
        [gpu_node("g1", gpus=8, cpu="8", memory="64Gi")], device="xpu", workers=4, resources={"gpus": 1, "cpu": "4"}
    )
    assert not d.ok and "room for 2 workers" in d.reason


def test_more_gpus_per_worker_than_any_node_has() -> None:
    d = decide([gpu_node("g1", gpus=2), gpu_node("g2", gpus=2)], device="xpu", resources={"gpus": 4})
    assert not d.ok
    assert d.reason == (
        "no matching nodes: xpu: asked for 1 worker with 4 gpu.intel.com/i915, 4 CPU and 16Gi memory each, "
        "but 2 nodes offer gpu.intel.com/i915 (max 2 per node), room for 0 workers"
    )


def test_cpu_requires_amx_label_by_affinity() -> None:
    d = decide([amx_node("c1"), plain_node("p")], device="cpu", workers=2, resources={"cpu": "16", "memory": "32Gi"})
    assert d.ok and d.device == "cpu"
    assert d.requests == d.limits == {"cpu": "16", "memory": "32Gi"}
    terms = d.affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]  # type: ignore[index]
    assert terms == [{"matchExpressions": [AMX_EXPR]}]
    assert d.feasible_nodes == ("c1",) and d.slots == 4


def test_auto_prefers_gpus() -> None:
    d = decide([gpu_node("g1"), amx_node("c1")], workers=2)
    assert d.device == "xpu" and d.reason.startswith("auto: 1 node offers gpu.intel.com/i915")


def test_auto_falls_back_to_amx_and_says_why() -> None:
    d = decide([amx_node("c1"), amx_node("c2"), plain_node("p")], workers=2)
    assert d.device == "cpu"
    assert d.reason.startswith("auto: not xpu (no node of 3 offers gpu.intel.com/i915); 2 nodes carry")
    # Too few GPU slots also falls back.
    d = decide([gpu_node("g1", gpus=1), amx_node("c1")], workers=2)
    assert d.device == "cpu" and "room for 1 worker)" in d.reason


def test_auto_with_zero_gpus_means_cpu() -> None:
    d = decide([gpu_node("g1"), amx_node("c1")], resources={"gpus": 0})
    assert d.device == "cpu" and d.reason.startswith("auto: 1 node carries")


def test_auto_with_no_matching_nodes_lists_ask_and_offer() -> None:
    d = decide([plain_node("p1"), plain_node("p2")], workers=2)
    assert not d.ok and d.device is None and d.affinity is None
    assert d.reason == (
        "no matching nodes: xpu: asked for 2 workers with 1 gpu.intel.com/i915, 4 CPU and 16Gi memory each, but "
        "no node of 2 offers gpu.intel.com/i915; cpu: asked for 2 workers with 4 CPU and 16Gi memory each on "
        "nodes labelled feature.node.kubernetes.io/cpu-cpuid.AMXBF16=true, but no node of 2 carries "
        "feature.node.kubernetes.io/cpu-cpuid.AMXBF16=true"
    )
    assert d.to_status() == {"reason": d.reason}


def test_cordons_taints_and_user_constraints_exclude_nodes() -> None:
    tainted = gpu_node("g1", taints=(Taint("intel.com/gpu", "true", "NoSchedule"),))
    cordoned = gpu_node("g2", unschedulable=True)
    d = decide([tainted, cordoned], device="xpu")
    # The pool exists but every node of it is out: say so, and why, instead of "no node offers".
    assert (
        not d.ok
        and "2 nodes offer gpu.intel.com/i915, but all are excluded: 1 cordoned, 1 taint intel.com/gpu:NoSchedule"
        in d.reason
    )
    free = gpu_node("g0")
    d = decide([free, cordoned], device="xpu", workers=3)
    assert "(1 more excluded: 1 cordoned)" in d.reason
    amx_cordoned = [amx_node(f"a{i}", unschedulable=True) for i in range(2)]
    d = decide(amx_cordoned, device="cpu")
    assert (
        not d.ok
        and "2 nodes carry feature.node.kubernetes.io/cpu-cpuid.AMXBF16=true, but all are excluded: 2 cordoned"
        in d.reason
    )
    tol = [{"key": "intel.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    d = decide([tainted, cordoned], device="xpu", placement={"tolerations": tol})
    assert d.ok and d.feasible_nodes == ("g1",) and list(d.tolerations) == tol
    # PreferNoSchedule does not exclude; Equal needs the value.
    soft = gpu_node("g3", taints=(Taint("x", None, "PreferNoSchedule"),))
    assert decide([soft], device="xpu").ok
    eq = [{"key": "intel.com/gpu", "operator": "Equal", "value": "false"}]
    assert not decide([tainted], device="xpu", placement={"tolerations": eq}).ok
    # nodeSelector and required affinity of the spec are honoured.
    pool = gpu_node("g4", labels={"pool": "train"})
    assert decide(
        [gpu_node("g5"), pool], device="xpu", placement={"nodeSelector": {"pool": "train"}}
    ).feasible_nodes == ("g4",)
    aff = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "NotIn", "values": ["train"]}]}]
            }
        }
    }
    assert decide([gpu_node("g5"), pool], device="xpu", placement={"affinity": aff}).feasible_nodes == ("g5",)


def test_gpu_node_label_and_custom_resource() -> None:
    settings = OperatorSettings(gpu_resource="gpu.intel.com/xe", gpu_node_label="intel.feature.node.kubernetes.io/gpu")
    xe = NodeFacts(
        "x1", {"intel.feature.node.kubernetes.io/gpu": "true"}, {"gpu.intel.com/xe": "1", "cpu": "8", "memory": "32Gi"}
    )
    unlabelled = NodeFacts("x2", {}, {"gpu.intel.com/xe": "8", "cpu": "8", "memory": "32Gi"})
    d = decide([xe, unlabelled], settings=settings, device="xpu")
    assert d.ok and d.feasible_nodes == ("x1",) and "gpu.intel.com/xe" in d.requests
    expr = d.affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
        "matchExpressions"
    ]  # type: ignore[index]
    assert expr == [{"key": "intel.feature.node.kubernetes.io/gpu", "operator": "Exists"}]


def test_merge_required_affinity_ands_into_every_term() -> None:
    user = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n"]}]},
                ]
            }
        },
        "podAntiAffinity": {"x": 1},
    }
    merged = merge_required_affinity(user, [AMX_EXPR])
    terms = merged["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]  # type: ignore[index]
    assert all(AMX_EXPR in t["matchExpressions"] for t in terms)
    assert merged["podAntiAffinity"] == {"x": 1}  # type: ignore[index]
    assert (
        len(
            user["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
                "matchExpressions"
            ]
        )
        == 1
    )


# --------------------------------------------------------------------------- autoscaled pools: Wait mode

WAIT = OperatorSettings(when_no_node_matches="Wait")


def test_fail_mode_is_the_default_and_creates_nothing_for_a_missing_pool() -> None:
    assert SETTINGS.when_no_node_matches == "Fail"
    d = decide([plain_node("p")], device="xpu")
    assert not d.ok and not d.waiting and d.condition_reason.value == "NoMatchingNodes"


def test_wait_mode_decides_the_same_pods_for_a_pool_at_zero() -> None:
    """The waiting decision carries exactly the fields the pods would get if the pool existed."""
    d = decide([plain_node("p")], settings=WAIT, device="xpu", placement={"tolerations": [{"key": "gpu"}]})
    up = decide([gpu_node("g1")], settings=WAIT, device="xpu", placement={"tolerations": [{"key": "gpu"}]})
    assert d.ok and d.waiting and d.device == "xpu" and d.condition_reason.value == "WaitingForNodes"
    assert up.ok and not up.waiting and up.condition_reason.value == "PodsCreated"
    for attr in ("requests", "limits", "node_selector", "affinity", "tolerations", "node_pool"):
        assert getattr(d, attr) == getattr(up, attr), attr
    assert d.reason == (
        "waiting up to 1800 s for nodes (whenNoNodeMatches: Wait): xpu: asked for 1 worker with 1 "
        "gpu.intel.com/i915, 4 CPU and 16Gi memory each, but no node of 1 offers gpu.intel.com/i915"
    )
    assert d.to_status()["device"] == "xpu"


def test_the_resource_overrides_the_operators_mode_and_timeout() -> None:
    d = decide([plain_node("p")], device="cpu", placement={"whenNoNodeMatches": "Wait", "waitTimeoutSeconds": 60})
    assert d.waiting and d.device == "cpu" and d.reason.startswith("waiting up to 60 s for nodes")
    assert d.affinity is not None
    terms = d.affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert AMX_EXPR in terms[0]["matchExpressions"]  # the pods ask for the AMX pool that is not there yet
    d = decide([plain_node("p")], settings=WAIT, device="cpu", placement={"whenNoNodeMatches": "Fail"})
    assert not d.ok and not d.waiting


def test_wait_mode_auto_keeps_the_preferred_gpu_instead_of_the_amx_nodes_that_are_up() -> None:
    nodes = [amx_node("c1"), amx_node("c2")]
    assert decide(nodes, workers=2).device == "cpu"  # Fail mode: what is up now
    d = decide(nodes, settings=WAIT, workers=2)
    assert d.waiting and d.device == "xpu" and "cpu:" not in d.reason
    # Once the GPU pool has grown, the same rule places normally.
    d = decide([*nodes, gpu_node("g1")], settings=WAIT, workers=2)
    assert d.device == "xpu" and not d.waiting


def test_auto_device_preference_orders_auto() -> None:
    cpu_first = OperatorSettings(auto_device_preference=["cpu", "xpu"])
    nodes = [gpu_node("g1"), amx_node("c1")]
    assert decide(nodes, settings=cpu_first).device == "cpu"
    d = decide([gpu_node("g1")], settings=cpu_first)
    assert d.device == "xpu" and d.reason.startswith("auto: not cpu (no node of 1 carries")
    wait_cpu = OperatorSettings(when_no_node_matches="Wait", auto_device_preference=["cpu"])
    assert decide([gpu_node("g1")], settings=wait_cpu).device == "cpu"
    # auto without GPUs is cpu whatever the preference says.
    xpu_only = OperatorSettings(auto_device_preference=["xpu"])
    assert decide([amx_node("c1")], settings=xpu_only, resources={"gpus": 0}).device == "cpu"
