"""The real operator against the local control plane: two LoRAFineTunes on one run directory.

cffc930: both were accepted; the second resumed from the first's checkpoint, overwrote its
config.yaml and both reported the same adapter. Now the second is refused (Validated=False,
RunDirInUse, naming the first) and starts by itself once the first is deleted.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.controlplane import ControlPlane

from .cluster_helpers import (
    LFT_API,
    add_gpu_node,
    condition,
    create_lft,
    lft_spec,
    live_pods,
    operator_in_namespace,
    uid,
    wait_condition,
    wait_events,
    wait_pods,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


@pytest.fixture
def claim_ns(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(namespace with an operator, a Bound RWX claim in it)."""
    log_dir = tmp_path_factory.mktemp("operator-logs")
    with operator_in_namespace(control_plane, log_dir) as (ns, op, _):
        cp, pv, claim = control_plane, f"pv-{ns}", "runs"
        cp.create("/api/v1/persistentvolumes", {
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "manual",
                     "hostPath": {"path": f"/tmp/{pv}"}, "claimRef": {"namespace": ns, "name": claim}},
        })  # fmt: skip
        cp.create(f"/api/v1/namespaces/{ns}/persistentvolumeclaims", {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}},
                     "storageClassName": "manual", "volumeName": pv},
        })  # fmt: skip
        try:
            yield ns, claim
        finally:
            print(f"--- operator log ---\n{op.log_tail(100)}")
            cp.delete(f"/api/v1/persistentvolumes/{pv}")


def test_second_resource_on_one_run_dir_is_refused_until_the_first_is_deleted(
    control_plane: ControlPlane, claim_ns: tuple[str, str]
) -> None:
    cp, (ns, claim) = control_plane, claim_ns
    pool = uid()
    add_gpu_node(cp, f"gpu-{pool}", pool, gpus=2)
    output = {"pvc": {"claimName": claim, "subPath": "shared"}}
    first, second = f"first-{pool}", f"second-{pool}"
    create_lft(cp, ns, first, lft_spec(pool, device="xpu", output=output))
    wait_pods(cp, ns, first, 1, timeout=45)  # started
    create_lft(cp, ns, second, lft_spec(pool, device="xpu", output=output))

    obj = wait_condition(cp, ns, second, "Validated", "False", "RunDirInUse", timeout=30)
    msg = condition(obj, "Validated")["message"]
    assert f"pvc://{claim}/shared" in msg and f"LoRAFineTune {first}" in msg, msg
    assert obj["status"]["phase"] == "Invalid"
    assert live_pods(cp, ns, second) == []  # nothing created for the second
    said = wait_events(cp, ns, second, "RunDirInUse")
    assert any(first in e["message"] and e["type"] == "Warning" for e in said), said
    assert condition(wait_condition(cp, ns, first, "Validated", "True"), "Validated")["reason"] == "SpecValid"

    cp.delete(f"{LFT_API}/namespaces/{ns}/lorafinetunes/{first}")
    wait_condition(cp, ns, second, "Validated", "True", "SpecValid", timeout=60)  # re-admitted by the resync
    wait_pods(cp, ns, second, 1, timeout=45)
