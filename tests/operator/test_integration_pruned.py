"""The real operator against the local control plane: a typo in an applied spec is made loud.

The API server prunes unknown spec keys without a word on v1.20 (and with clients that skip
validation on any server); the operator names them from kubectl's last-applied annotation in a
Warning Event `PrunedFields` and in the Validated condition, and still starts the run.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from kubelora_operator.pruned_fields import PRUNED_FIELDS_EVENT

from tests.cluster.controlplane import ControlPlane, find_tool

from .cluster_helpers import (
    Env,
    add_gpu_node,
    condition,
    lft_spec,
    operator_env_in_namespace,
    uid,
    wait_condition,
    wait_events,
    wait_pods,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def env(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with operator_env_in_namespace(control_plane, tmp_path_factory.mktemp("operator-logs")) as e:
        yield e


def _apply_unvalidated(cp: ControlPlane, manifest: dict[str, Any]) -> None:
    """`kubectl apply` without validation: all that v1.20 offers against a typo (client-side apply)."""
    kubectl = find_tool("kubectl")
    assert kubectl is not None
    proc = subprocess.run(
        [str(kubectl), "apply", "--validate=false", "-f", "-"], env={**os.environ, **cp.env()},
        input=json.dumps(manifest), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_a_pruned_typo_is_named_in_a_warning_event_and_the_validated_condition(
    control_plane: ControlPlane, env: Env
) -> None:
    cp, ns, name, pool = control_plane, env.ns, f"typo-{uid()}", uid()
    add_gpu_node(cp, f"node-{pool}", pool)
    spec = lft_spec(pool)
    spec["lora"] = {**(spec.get("lora") or {}), "rank": 64}  # the field is `r`
    spec["trainig"] = {"epochs": 3}
    manifest = {
        "apiVersion": "kubelora.dev/v1alpha1",
        "kind": "LoRAFineTune",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }
    _apply_unvalidated(cp, manifest)

    obj = wait_condition(cp, ns, name, "Validated", "True")
    message = (condition(obj, "Validated") or {}).get("message", "")
    assert "spec.lora.rank" in message and "spec.trainig" in message, message
    warned = [e for e in wait_events(cp, ns, name, PRUNED_FIELDS_EVENT) if e["reason"] == PRUNED_FIELDS_EVENT]
    assert warned and warned[0]["type"] == "Warning", warned
    assert "spec.lora.rank" in warned[0]["message"], warned
    # a warning, not a refusal: the run starts with the defaults
    assert len(wait_pods(cp, ns, name, 1)) == 1
