"""examples/gitops/flux: the kustomize trees render with the real kustomize (`kubectl kustomize`), the
fine-tunes they apply pass the same checks as every example, the chart values pass the chart's closed
schema, and the paths they point Flux at exist in this repository."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml
from kubelora_operator.settings import OperatorSettings
from kubelora_operator.validation import check_resource

from .deploy_helpers import CHART, EXAMPLES, REPO, crd_schema, helm, kubectl_bin, validate_structural

FLUX = REPO / "examples" / "gitops" / "flux"


def kustomize(path: Path) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as home:  # kubectl never writes a ~/.kube cache into the repo
        proc = subprocess.run(
            [kubectl_bin(), "kustomize", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "HOME": home},
        )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_finetunes_overlay_renders_valid_resources() -> None:
    objs = kustomize(FLUX / "finetunes")
    lfts = [o for o in objs if o["kind"] == "LoRAFineTune"]
    assert lfts
    for obj in lfts:
        assert obj["metadata"]["namespace"] == "ml"
        assert validate_structural({k: v for k, v in obj.items() if k != "metadata"}, crd_schema()) == []
        _, problems = check_resource(obj["metadata"]["name"], obj["spec"], OperatorSettings())
        assert problems == []
    # kustomize cannot reach outside its root: the overlay carries a copy of the example, kept identical.
    assert (FLUX / "finetunes" / "amx-whitepaper.yaml").read_bytes() == (
        EXAMPLES / "cpu-amx-whitepaper.yaml"
    ).read_bytes()


def test_flux_objects_point_at_this_repository() -> None:
    objs = {o["kind"]: o for o in kustomize(FLUX)}
    assert {"GitRepository", "HelmRelease", "Kustomization", "ConfigMap", "Namespace"} <= set(objs)
    release = objs["HelmRelease"]
    chart = release["spec"]["chart"]["spec"]
    assert (REPO / chart["chart"]).resolve() == CHART
    assert chart["sourceRef"] == {"kind": "GitRepository", "name": objs["GitRepository"]["metadata"]["name"]}
    assert release["spec"]["install"]["crds"] == release["spec"]["upgrade"]["crds"] == "CreateReplace"
    sync = objs["Kustomization"]
    assert (REPO / sync["spec"]["path"]).resolve() == (FLUX / "finetunes").resolve()
    assert sync["spec"]["dependsOn"] == [{"name": release["metadata"]["name"]}]
    (expr,) = sync["spec"]["healthCheckExprs"]
    assert expr["kind"] == "LoRAFineTune" and "Succeeded" in expr["current"] and "Failed" in expr["failed"]
    values = yaml.safe_load(objs["ConfigMap"]["data"][release["spec"]["valuesFrom"][0]["valuesKey"]])
    assert values == yaml.safe_load((FLUX / "values.yaml").read_text())


def test_flux_values_pass_the_chart_schema() -> None:
    proc = helm("template", "kubelora", str(CHART), "-n", "kubelora-system", "-f", str(FLUX / "values.yaml"))
    objs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    kinds = {(o["kind"], o["metadata"].get("namespace")) for o in objs}
    assert ("Role", "ml") in kinds and ("KopfPeering", "ml") in kinds
