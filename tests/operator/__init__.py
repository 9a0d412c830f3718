"""Unit tests of the operator's pure parts; small builders shared by the test modules."""

from __future__ import annotations

from typing import Any

from kubelora_operator.api import LoRAFineTuneResource, parse_spec
from kubelora_operator.placement import NodeFacts
from kubelora_operator.settings import OperatorSettings
from kubelora_operator.submit import deep_merge

SETTINGS = OperatorSettings()
AMX_LABEL = {"feature.node.kubernetes.io/cpu-cpuid.AMXBF16": "true"}

BASE_SPEC: dict[str, Any] = {
    "data": {"path": "sample://train.jsonl"},
    "training": {"maxSteps": 20},
    "output": {"pvc": {"claimName": "runs"}},
}


def raw_spec(**over: Any) -> dict[str, Any]:
    """A valid raw spec (camelCase, as stored by the API server) with overrides."""
    return deep_merge(BASE_SPEC, over)


def resource(name: str = "demo", namespace: str = "team-a", **over: Any) -> LoRAFineTuneResource:
    """A parsed resource."""
    return LoRAFineTuneResource(
        name=name, namespace=namespace, uid="uid-1234", generation=3, spec=parse_spec(raw_spec(**over))
    )


def gpu_node(name: str, gpus: int = 2, cpu: str = "32", memory: str = "128Gi", **kw: Any) -> NodeFacts:
    """A node with the Intel GPU device plugin's resource."""
    labels = {"intel.feature.node.kubernetes.io/gpu": "true", **kw.pop("labels", {})}
    return NodeFacts(name, labels, {"gpu.intel.com/i915": str(gpus), "cpu": cpu, "memory": memory}, **kw)


def amx_node(name: str, cpu: str = "64", memory: str = "256Gi", **kw: Any) -> NodeFacts:
    """An AMX Xeon node (NFD label)."""
    labels = {**AMX_LABEL, **kw.pop("labels", {})}
    return NodeFacts(name, labels, {"cpu": cpu, "memory": memory}, **kw)


def plain_node(name: str, cpu: str = "16", memory: str = "64Gi") -> NodeFacts:
    """A node with neither GPUs nor AMX."""
    return NodeFacts(name, {"kubernetes.io/os": "linux"}, {"cpu": cpu, "memory": memory})


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    """name -> value (or valueFrom) of the trainer container's env."""
    out: dict[str, Any] = {}
    for var in pod["spec"]["containers"][0]["env"]:
        out[var["name"]] = var.get("value", var.get("valueFrom"))
    return out
