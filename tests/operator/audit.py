"""A control plane that audits one user: the operator's own, so its requests can be counted exactly.

Used by bench/operator_scale.py and by the idle-traffic test. The apiserver gets a second static token
(user `kubelora-operator`, group system:masters) and an audit policy that logs only that user at
Metadata level; every request the operator makes (kopf's aiohttp client and the kubernetes.client REST
layer, both through `operator_kubeconfig`) is one audit ID with verb, resource and latency.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.cluster.controlplane import ControlPlane

OPERATOR_USER = "kubelora-operator"


class AuditedControlPlane(ControlPlane):
    """A ControlPlane with a second static token (the operator's own user) and an audit log of it."""

    def __init__(self, bench_dir: Path, **kw: Any) -> None:
        self.bench_dir = bench_dir
        self.audit_log = bench_dir / "audit.log"
        policy = bench_dir / "audit-policy.yaml"
        policy.write_text(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n"
            f"- level: Metadata\n  users: [{OPERATOR_USER}]\n- level: None\n"
        )
        super().__init__(
            extra_apiserver_args=[
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",
            ],
            **kw,
        )
        self.operator_token = ""
        self.operator_kubeconfig: Path | None = None

    def _write_kubeconfig(self) -> None:
        # Called by _start_once after tokens.csv is written and before the apiserver starts.
        super()._write_kubeconfig()
        assert self.workdir is not None and self.kubeconfig is not None
        import secrets

        self.operator_token = secrets.token_hex(24)
        with (self.workdir / "tokens.csv").open("a") as fh:
            fh.write(f"{self.operator_token},{OPERATOR_USER},{OPERATOR_USER}-uid,system:masters\n")
        cfg = json.loads(self.kubeconfig.read_text())
        cfg["users"] = [{"name": "operator", "user": {"token": self.operator_token}}]
        cfg["contexts"][0]["context"]["user"] = "operator"
        self.operator_kubeconfig = self.workdir / "kubeconfig-operator"
        self.operator_kubeconfig.write_text(json.dumps(cfg, indent=2) + "\n")
        self.operator_kubeconfig.chmod(0o600)


def read_audit(path: Path) -> list[dict[str, Any]]:
    """One record per request (audit ID), with the last stage seen."""
    by_id: dict[str, dict[str, Any]] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if (ev.get("user") or {}).get("username") != OPERATOR_USER:
            continue
        by_id[ev["auditID"]] = ev
    return list(by_id.values())


def parse_stamp(stamp: str) -> float:
    """An audit timestamp (RFC 3339, microseconds) as a Unix time."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
