"""A small Python API over LoRAFineTune resources for notebooks and the `kubelora` CLI.

Depends on the kubernetes client only (no kopf); S3 fetches use boto3 with the caller's own
credentials (boto3's chain). The adapter's sha256 is checked with the trainer's own helper
(`artifacts.sha256_file`) against `status.artifact.sha256`, and every downloaded file against the
manifest, which is the completion marker of an S3 delivery (`kubelora_trainer/artifacts.py`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kubelora_trainer.artifacts import ADAPTER_DIR, ADAPTER_WEIGHTS, MANIFEST_FILE, _Location, sha256_file
from kubelora_trainer.config import S3Target
from kubelora_trainer.s3_client import make_client

from .api import GROUP, PLURAL, VERSION

TERMINAL = ("Succeeded", "Failed")


class ClientError(RuntimeError):
    """A request cannot be done as asked: one line for the CLI."""


def _api_client(kubeconfig: str | None = None, context: str | None = None) -> Any:
    from kubernetes import client, config

    try:
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except Exception:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except Exception as err:
            raise ClientError(f"no Kubernetes credentials: no kubeconfig and not in a pod ({err})") from None


def current_namespace(kubeconfig: str | None = None, context: str | None = None) -> str:
    """The namespace of the kubeconfig's current context, else `default`."""
    from kubernetes import config

    with contextlib.suppress(Exception):
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
        ctx = active if context is None else next((c for c in contexts if c["name"] == context), None)
        if ctx and ctx.get("context", {}).get("namespace"):
            return str(ctx["context"]["namespace"])
    return "default"


class KubeloraClient:
    """submit, get, wait, logs, fetch and delete LoRAFineTune resources in one namespace."""

    def __init__(self, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None) -> None:
        from kubernetes import client

        self.api_client = _api_client(kubeconfig, context)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.namespace = namespace or current_namespace(kubeconfig, context)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return fn()
        except ApiException as err:
            reason = err.reason
            with contextlib.suppress(Exception):
                reason = json.loads(err.body).get("message") or reason
            raise ClientError(f"{what}: {err.status} {reason}") from None

    def submit(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Create the resource (from `submit.resource_from_config`) in its namespace or the client's."""
        ns = resource.get("metadata", {}).get("namespace") or self.namespace
        name = resource["metadata"]["name"]
        return self._call(
            f"creating {ns}/{name}",
            lambda: self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, resource),
        )

    def get(self, name: str) -> dict[str, Any]:
        return self._call(
            f"reading {self.namespace}/{name}",
            lambda: self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name),
        )

    def delete(self, name: str) -> None:
        self._call(
            f"deleting {self.namespace}/{name}",
            lambda: self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name),
        )

    def watch(self, name: str, interval: float = 1.0, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The resource each time its status changes, until Succeeded or Failed (or `timeout`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        while True:
            obj = self.get(name)
            status = obj.get("status") or {}
            if status != last:
                last = status
                yield obj
            if status.get("phase") in TERMINAL:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(f"{name}: not finished after {timeout:.0f}s (phase {status.get('phase')})")
            time.sleep(interval)

    def wait(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        """The resource once it Succeeded or Failed."""
        last: dict[str, Any] = {}
        for obj in self.watch(name, timeout=timeout):
            last = obj
        return last

    def logs(self, name: str, worker: int = 0, tail_lines: int | None = None) -> str:
        """The trainer log of worker `worker` (rank 0 by default)."""
        pod = f"{name}-worker-{worker}"
        kw: dict[str, Any] = {"tail_lines": tail_lines} if tail_lines else {}
        return self._call(
            f"reading the log of {self.namespace}/{pod}",
            lambda: self.core.read_namespaced_pod_log(pod, self.namespace, **kw),
        )

    def fetch(self, name: str, dest: str | Path, include_merged: bool = False) -> Path:
        """Download the finished adapter (and the run's small files) into `dest`/, sha256-checked."""
        obj = self.get(name)
        status = obj.get("status") or {}
        artifact = status.get("artifact") or {}
        uri, want = artifact.get("uri"), artifact.get("sha256")
        if status.get("phase") != "Succeeded" or not uri or not want:
            raise ClientError(f"{name}: no delivered adapter yet (phase {status.get('phase')})")
        if not uri.startswith("s3://"):
            raise ClientError(
                f"{name}: the adapter is on a PVC ({uri}); copy it with kubectl cp from a pod mounting the claim"
            )
        s3_spec = ((obj.get("spec") or {}).get("output") or {}).get("s3") or {}
        target = S3Target.model_validate({k: v for k, v in s3_spec.items() if k in ("uri", "endpoint", "region", "verifyTls")})
        return fetch_s3(target, want, Path(dest), include_merged=include_merged)


def fetch_s3(target: S3Target, adapter_sha256: str, dest: Path, include_merged: bool = False) -> Path:
    """Download a delivered run from S3 into `dest` (absent or empty), checking every file against the
    manifest and the adapter weights against `adapter_sha256`; nothing is left in `dest` on a mismatch."""
    if dest.exists() and any(dest.iterdir()):
        raise ClientError(f"{dest} is not empty")
    loc = _Location.parse(target.uri)
    client = make_client(target)
    try:
        body = client.get_object(Bucket=loc.bucket, Key=loc.key(MANIFEST_FILE))["Body"].read()
    except Exception as err:
        raise ClientError(f"{loc.uri(MANIFEST_FILE)}: cannot read the completion marker: {err}") from None
    manifest = json.loads(body)
    if manifest.get("adapter", {}).get("sha256") != adapter_sha256:
        raise ClientError(f"{loc.uri()}: the manifest's adapter sha256 is not the one in the resource's status")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".kubelora-fetch-", dir=dest.parent))
    try:
        for f in manifest.get("files", []):
            rel = f["path"]
            if rel.startswith("merged/") and not include_merged:
                continue
            local = tmp / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(loc.bucket, loc.key(rel), str(local))
            if sha256_file(local) != f["sha256"]:
                raise ClientError(f"{loc.uri(rel)}: sha256 differs from the manifest's")
        weights = tmp / ADAPTER_DIR / ADAPTER_WEIGHTS
        if not weights.is_file() or sha256_file(weights) != adapter_sha256:
            raise ClientError(f"{loc.uri()}: {ADAPTER_DIR}/{ADAPTER_WEIGHTS} does not match status.artifact.sha256")
        if dest.exists():
            dest.rmdir()
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
