"""Acting as a ServiceAccount on the local control plane: its token, and a kubeconfig that uses it (for
the operator or kubectl run with exactly the rights RBAC gives that account)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from .controlplane import ControlPlane


def service_account_token(cp: ControlPlane, namespace: str, name: str, timeout: float = 60) -> str:
    """The token of the account's first token Secret (v1.20 creates one per ServiceAccount), once it exists."""
    sa = cp.wait_for(
        lambda: (s := cp.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}")).get("secrets") and s,
        timeout=timeout,
        what=f"token of service account {namespace}/{name}",
    )
    secret = cp.get(f"/api/v1/namespaces/{namespace}/secrets/{sa['secrets'][0]['name']}")
    return base64.b64decode(secret["data"]["token"]).decode()


def service_account_kubeconfig(cp: ControlPlane, token: str, namespace: str, path: Path) -> Path:
    """Write a kubeconfig for this control plane that authenticates with `token` (default namespace set)."""
    assert cp.ca_file is not None
    cluster = {"server": cp.server, "certificate-authority-data": base64.b64encode(cp.ca_file.read_bytes()).decode()}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "sa", "namespace": namespace}}],
        "current-context": "c",
    }
    path.write_text(json.dumps(config))
    return path
