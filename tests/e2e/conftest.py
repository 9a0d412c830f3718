"""Fixtures of the local end-to-end harness: control plane + CRD + operator + S3 + fake nodes + node agent.

* `control_plane`, `cluster_namespace` (tests/cluster) and `s3_server`, `s3_bucket` (tests/s3server)
  come from tests/conftest.py; without the control-plane binaries the tests skip (fail with
  KUBELORA_REQUIRE_CLUSTER=1), as every cluster test does.
* `e2e`: a fresh namespace with two fake AMX CPU nodes in a pool of their own, a NodeAgent (thread)
  running the pods bound to them as local processes, and the real operator process watching the
  namespace. The operator gets free master/metrics ports: the agent does not remap ports, so each
  test runs one job at a time (the operator scrapes 127.0.0.1:<metricsPort>, the agent's pod IP).
* `tiny_model_pv`: a tiny random Llama with SmolLM2's tokenizer, served to pods through a hostPath
  PersistentVolume (pre-bound to a claim in the namespace, so the scheduler accepts the pods).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.controlplane import ApiError, ControlPlane, free_ports
from tests.operator.cluster_helpers import (
    LFT_API,
    POOL_LABEL,
    OperatorProcess,
    add_amx_node,
    ensure_crd,
    get_lft,
    release_lfts,
    uid,
)

from .node_agent import Api, NodeAgent

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "local" / "two-workers-s3.yaml"


@dataclass
class E2E:
    cp: ControlPlane
    ns: str
    pool: str
    nodes: list[str]
    agent: NodeAgent
    op: OperatorProcess
    root: Path
    pvs: list[str] = field(default_factory=list)

    def lft(self, name: str) -> dict[str, Any]:
        return get_lft(self.cp, self.ns, name)

    def diagnostics(self, name: str | None = None) -> str:
        """Operator log tail, the resource's status and each pod's container log tail (for failures)."""
        out = [f"--- operator log ---\n{self.op.log_tail(80)}"]
        if name:
            with contextlib.suppress(Exception):
                out.append(f"--- status ---\n{yaml.safe_dump(self.lft(name).get('status'))}")
        with contextlib.suppress(Exception):
            for p in self.cp.get(f"/api/v1/namespaces/{self.ns}/pods")["items"]:
                st = p.get("status") or {}
                out.append(
                    f"--- pod {p['metadata']['name']}: node={p['spec'].get('nodeName')} phase={st.get('phase')} "
                    f"conditions={st.get('conditions')}"
                )
        for run in self.agent.runs.values():
            if run.log_path and run.log_path.exists():
                tail = "\n".join(run.log_path.read_text(errors="replace").splitlines()[-40:])
                out.append(f"--- {run.name} ({run.uid[:8]}) exit={run.exit_code} ---\n{tail}")
        return "\n".join(out)


def load_example(
    *, bucket: str, endpoint: str, access_key: str, secret_key: str, pool: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Secret, LoRAFineTune) of the example with its placeholders filled and the test's node pool."""
    text = (
        EXAMPLE.read_text()
        .replace("REPLACE-WITH-ACCESS-KEY-ID", access_key)
        .replace("REPLACE-WITH-SECRET-ACCESS-KEY", secret_key)
        .replace("REPLACE-WITH-S3-ENDPOINT", endpoint)
        .replace("REPLACE-WITH-BUCKET", bucket)
    )
    assert "REPLACE-WITH" not in text
    docs = {d["kind"]: d for d in yaml.safe_load_all(text) if d}
    lft = copy.deepcopy(docs["LoRAFineTune"])
    lft["spec"].setdefault("placement", {}).setdefault("nodeSelector", {})[POOL_LABEL] = pool
    return docs["Secret"], lft


def apply(cp: ControlPlane, ns: str, secret: dict[str, Any], lft: dict[str, Any]) -> None:
    cp.create(f"/api/v1/namespaces/{ns}/secrets", secret)
    cp.create(f"{LFT_API}/namespaces/{ns}/lorafinetunes", lft)


@pytest.fixture(scope="session")
def e2e_crd(control_plane: ControlPlane) -> ControlPlane:
    ensure_crd(control_plane)
    return control_plane


@pytest.fixture
def e2e(
    e2e_crd: ControlPlane, cluster_namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[E2E]:
    cp, ns = e2e_crd, cluster_namespace
    root = tmp_path_factory.mktemp("e2e")
    pool = uid()
    nodes = [f"amx-{pool}-{i}" for i in range(2)]
    for n in nodes:
        add_amx_node(cp, n, pool)
    agent = NodeAgent(
        Api(cp.server, cp.token, ca_file=str(cp.ca_file)),
        nodes,
        root / "agent",
        extra_env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    ).start()
    master, metrics = free_ports(2)
    op = OperatorProcess(
        cp,
        ns,
        root,
        KUBELORA_MASTER_PORT=str(master),
        KUBELORA_METRICS_PORT=str(metrics),
        KUBELORA_DNS_WAIT_SECONDS="30",
    ).start()
    env = E2E(cp, ns, pool, nodes, agent, op, root)
    try:
        yield env
    finally:
        op.stop()
        agent.stop()
        release_lfts(cp, ns)
        for n in nodes:
            with contextlib.suppress(ApiError):
                cp.delete_node(n)
        for pv in env.pvs:
            with contextlib.suppress(ApiError):
                cp.delete(f"/api/v1/persistentvolumes/{pv}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer, at <models>/tiny."""
    from tests.trainer import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny")


def add_hostpath_claim(e: E2E, claim: str, path: Path, read_only: bool = False) -> None:
    """A hostPath PV pre-bound to `claim` in the namespace (the agent maps the claim to `path`).
    ReadWriteMany (or ReadOnlyMany): every "node" is this machine, and the operator requires RWX for
    a run dir shared by several workers."""
    pv = f"{e.ns}-{claim}"
    path.mkdir(parents=True, exist_ok=True)
    mode = "ReadOnlyMany" if read_only else "ReadWriteMany"
    e.cp.create(
        "/api/v1/persistentvolumes",
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": [mode],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": str(path)},
                "claimRef": {"namespace": e.ns, "name": claim},
            },
        },
    )
    e.pvs.append(pv)
    e.cp.create(
        f"/api/v1/namespaces/{e.ns}/persistentvolumeclaims",
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim},
            "spec": {
                "accessModes": [mode],
                "storageClassName": "",
                "volumeName": pv,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    e.cp.wait_for(
        lambda: e.cp.get(f"/api/v1/namespaces/{e.ns}/persistentvolumeclaims/{claim}")["status"].get("phase")
        == "Bound",
        timeout=60,
        what=f"claim {claim} Bound",
    )


def slow_enabled() -> bool:
    return os.environ.get("KUBELORA_E2E_SLOW", "") == "1"
