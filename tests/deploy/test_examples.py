"""Every manifest in examples/operator/ is ready to apply: each LoRAFineTune validates against the
generated CRD's openAPI schema and the operator's own checks (pydantic models, check_resource), the
objects it references are in the same file, the operator can place and plan it on a matching cluster,
and the real API server accepts the whole file (`kubectl apply --dry-run=server`).
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubelora_operator.api import (
    API_VERSION,
    KIND,
    LoRAFineTuneResource,
    parse_spec,
)
from kubelora_operator.placement import NodeFacts, PlacementDecision, decide_placement
from kubelora_operator.plan import Plan, plan
from kubelora_operator.settings import OperatorSettings
from kubelora_operator.validation import check_resource, pvc_problems, references

from tests.cluster.controlplane import ControlPlane
from tests.operator.cluster_helpers import ensure_crd

from .deploy_helpers import EXAMPLES, crd_schema, kubectl_bin, validate_structural

FILES = sorted(EXAMPLES.glob("*.yaml"))
EXPECTED = {
    "xpu-single.yaml",
    "xpu-multinode-zero3.yaml",
    "cpu-amx-whitepaper.yaml",
    "s3-output.yaml",
    "xpu-qlora.yaml",
}


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def lfts(path: Path) -> list[dict[str, Any]]:
    return [d for d in docs(path) if d.get("kind") == KIND]


def test_the_examples_exist() -> None:
    assert {f.name for f in FILES} >= EXPECTED
    for f in FILES:
        assert len(lfts(f)) == 1, f"{f.name}: one LoRAFineTune per example"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_matches_the_crd_schema(path: Path) -> None:
    schema = crd_schema()
    for obj in lfts(path):
        assert obj["apiVersion"] == API_VERSION
        body = {k: v for k, v in obj.items() if k != "metadata"}  # metadata is the server's ObjectMeta
        errors = validate_structural(body, schema)
        assert not errors, f"{path.name}: {errors}"


DELETE = object()
#: (path into the example, the value put there (DELETE: the key removed), a text one error must hold)
MISTAKES = [
    pytest.param(("spec", "workrs"), 2, "unknown field", id="unknown-field"),
    pytest.param(("spec", "workers"), 0, "below minimum", id="below-minimum"),
    pytest.param(("spec", "device"), "gpu", "not one of", id="not-in-enum"),
    pytest.param(("spec", "workers"), "2", "must be of type integer", id="wrong-type"),
    pytest.param(("spec", "output"), DELETE, "output", id="missing-required"),
    pytest.param(("spec", "lora", "alpha"), 0, "below minimum", id="exclusive-minimum"),
]


@pytest.mark.parametrize(("where", "value", "error"), MISTAKES)
def test_the_schema_validator_catches_mistakes(where: tuple[str, ...], value: Any, error: str) -> None:
    """The structural validator used above is not vacuous: the example passes, each mistake in it fails."""
    schema = crd_schema()
    good = {k: v for k, v in lfts(EXAMPLES / "cpu-amx-whitepaper.yaml")[0].items() if k != "metadata"}
    assert validate_structural(good, schema) == []
    obj = yaml.safe_load(yaml.safe_dump(good))
    parent = functools.reduce(lambda node, key: node[key], where[:-1], obj)
    if value is DELETE:
        del parent[where[-1]]
    else:
        parent[where[-1]] = value
    errors = validate_structural(obj, schema)
    assert any(error in e for e in errors), errors


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_accepted_by_the_operator_models(path: Path) -> None:
    settings = OperatorSettings()
    for obj in lfts(path):
        spec, problems = check_resource(obj["metadata"]["name"], obj["spec"], settings)
        assert problems == [], f"{path.name}: {problems}"
        assert spec is not None
        assert parse_spec(obj["spec"]) == spec
        # The trainer config the pods get validates too.
        for device in ("xpu", "cpu") if spec.device == "auto" else (spec.device,):
            spec.to_trainer_config(device=device)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_references_are_in_the_file(path: Path) -> None:
    """Secrets and PVCs the resource points at ship in the same file (apply it and it runs), and claims
    shared by several workers are ReadWriteMany."""
    objs = docs(path)
    (lft,) = lfts(path)
    spec = parse_spec(lft["spec"])
    for ref in references(spec):
        match = [o for o in objs if o["kind"] == ref.kind and o["metadata"]["name"] == ref.name]
        assert match, f"{path.name}: {ref.kind} {ref.name} ({ref.field}) is not in the file"
        if ref.key is not None:
            data = {**(match[0].get("data") or {}), **(match[0].get("stringData") or {})}
            assert ref.key in data, f"{path.name}: key {ref.key} missing in {ref.name}"
        if ref.kind == "PersistentVolumeClaim":
            modes = match[0]["spec"]["accessModes"]
            assert pvc_problems(spec, ref.name, modes, read_only=ref.field.startswith("dataVolume")) == []
    for obj in objs:
        if obj["kind"] == "Secret":  # placeholder credentials only, clearly marked
            assert "PLACEHOLDER" in path.read_text()
            for value in (obj.get("stringData") or {}).values():
                assert value.startswith("REPLACE-"), value


def _cluster() -> list[NodeFacts]:
    """A cluster with both Intel GPU nodes (4 GPUs) and AMX Xeon nodes, as NFD and the plugin label them."""
    gpu = {"gpu.intel.com/i915": "4", "cpu": "96", "memory": "512Gi"}
    amx = {"cpu": "128", "memory": "512Gi"}
    return [NodeFacts(f"gpu-{i}", {"intel.feature.node.kubernetes.io/gpu": "true"}, gpu) for i in range(4)] + [
        NodeFacts(f"xeon-{i}", {"feature.node.kubernetes.io/cpu-cpuid.AMXBF16": "true"}, amx) for i in range(2)
    ]


def _placed_and_planned(path: Path) -> tuple[Plan, PlacementDecision, OperatorSettings]:
    settings = OperatorSettings()
    (lft,) = lfts(path)
    resource = LoRAFineTuneResource(lft["metadata"]["name"], "ml", "uid-1", 1, parse_spec(lft["spec"]))
    decision = decide_placement(resource.spec, _cluster(), settings)
    assert decision.ok, decision.reason
    return plan(resource, decision, settings), decision, settings


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_places_and_plans(path: Path) -> None:
    p, decision, settings = _placed_and_planned(path)
    spec = parse_spec(lfts(path)[0]["spec"])
    assert len(p.pods) == spec.workers
    for pod in p.pods:
        container = pod["spec"]["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        if decision.device == "xpu":
            assert container["resources"]["limits"][settings.gpu_resource] == str(spec.resources.gpus)


def _env(p: Plan, name: str) -> dict[str, Any]:
    env: dict[str, Any] = {e["name"]: e for e in p.pods[0]["spec"]["containers"][0]["env"]}[name]
    return env


#: (example, what of its plan (p) and placement (d), the value): each example does what its name says.
PLANNED = [
    ("xpu-multinode-zero3.yaml", lambda p, d: p.trainer_config.distributed.deepspeed_stage, 3),
    ("xpu-multinode-zero3.yaml", lambda p, d: p.pods[1]["spec"]["containers"][0]["command"][2].count("torchrun"), 1),
    (
        "cpu-amx-whitepaper.yaml",
        lambda p, d: (p.trainer_config.lora.r, p.trainer_config.lora.alpha, p.trainer_config.lora.target_modules),
        (8, 16, "all-linear"),
    ),
    ("cpu-amx-whitepaper.yaml", lambda p, d: p.trainer_config.lora.init, "olora"),
    ("cpu-amx-whitepaper.yaml", lambda p, d: p.trainer_config.data.packing, True),
    ("cpu-amx-whitepaper.yaml", lambda p, d: d.device, "cpu"),
    ("xpu-qlora.yaml", lambda p, d: p.trainer_config.model.quantization, "nf4"),
    ("xpu-qlora.yaml", lambda p, d: d.device, "xpu"),
    (
        "s3-output.yaml",
        lambda p, d: _env(p, "AWS_SECRET_ACCESS_KEY")["valueFrom"]["secretKeyRef"]["name"],
        "kubelora-s3",
    ),
    ("s3-output.yaml", lambda p, d: "REPLACE" in yaml.safe_dump(p.config_map), False),  # no credentials in it
]


@pytest.mark.parametrize(("name", "read", "expected"), PLANNED, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(PLANNED)])
def test_example_plans_what_its_name_says(name: str, read: Any, expected: Any) -> None:
    p, decision, _ = _placed_and_planned(EXAMPLES / name)
    assert read(p, decision) == expected


@pytest.mark.cluster
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_server_dry_run_accepts(
    control_plane: ControlPlane, cluster_namespace: str, path: Path, tmp_path: Path
) -> None:
    ensure_crd(control_plane)
    proc = subprocess.run(
        [kubectl_bin(), "apply", "--dry-run=server", "-n", cluster_namespace, "-f", str(path), "-o", "yaml"],
        env={"KUBECONFIG": str(control_plane.kubeconfig), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = [d for d in yaml.safe_load_all(proc.stdout) if d]
    items = out[0]["items"] if len(out) == 1 and out[0].get("kind") == "List" else out
    kinds = sorted(o["kind"] for o in items)
    assert kinds == sorted(d["kind"] for d in docs(path))
    # The server kept every field (nothing pruned as unknown by the schema).
    (stored,) = [o for o in items if o["kind"] == KIND]
    (local,) = lfts(path)

    def subset(a: Any, b: Any, where: str = "spec") -> None:
        if isinstance(a, dict):
            for k, v in a.items():
                assert k in b, f"{path.name}: {where}.{k} pruned by the server"
                subset(v, b[k], f"{where}.{k}")

    subset(local["spec"], stored["spec"])
