"""Thin Kubernetes API layer: JSON in, JSON out, retries for transient errors, nothing else.

Why not the typed client models: the plan produces plain dicts and the handlers read plain dicts, so
the layer talks REST with JSON bodies through `kubernetes.client.ApiClient` (which brings kubeconfig /
in-cluster auth, TLS and token refresh) and never converts to models and back.

Error policy (what the handlers rely on):

* 429, 5xx and connection errors are retried here a few times with exponential backoff; when they
  persist, `TransientApiError` is raised and the handler turns it into `kopf.TemporaryError` (kopf
  retries the handler later), so a flaky API server never fails a run.
* Every other non-2xx answer raises `PermanentApiError` (403, 422, ...): retrying cannot help, the
  handler records it in a Failed condition instead of looping.
* 404 and 409 are answered where they are expected: `get` returns None for 404, `create_if_absent`
  treats AlreadyExists as done (idempotent creation: every child has a deterministic name), deletes
  treat 404 as done.

Answers and watch events are decoded with orjson: a third of the time of the standard library's
decoder on Kubernetes objects (6 KB pod events: 86 us against 321 us on the 2-core benchmark
machine), and every pod and resource event of the operator's watches is decoded
(docs/operator-benchmark.md, "sixth round").

Test hook: `KUBELORA_DEBUG_CREATE_DELAY` (seconds) sleeps after each created child, so that an
integration test can kill the operator between two creations deterministically.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

import orjson
import urllib3

from .api import API_VERSION, GROUP, KIND, PLURAL, VERSION

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
DEBUG_CREATE_DELAY_ENV = "KUBELORA_DEBUG_CREATE_DELAY"


class ApiError(Exception):
    """A failed API call; `status` is the HTTP status (0 for connection errors)."""

    def __init__(self, method: str, path: str, status: int, message: str) -> None:
        super().__init__(f"{method} {path}: {status} {message}".strip())
        self.method = method
        self.path = path
        self.status = status
        self.message = message


class TransientApiError(ApiError):
    """Still failing after the retries here, but may succeed later (429, 5xx, connection)."""


class PermanentApiError(ApiError):
    """Retrying cannot help (403, 422, 400, ...)."""


class NotFound(PermanentApiError):
    """404 where the caller did not expect it."""


class Conflict(PermanentApiError):
    """409 (AlreadyExists or a resourceVersion conflict)."""


def _message(raw: bytes) -> str:
    try:
        body = orjson.loads(raw)
    except ValueError:  # orjson.JSONDecodeError is one
        return raw.decode(errors="replace")[:500]
    if isinstance(body, dict):
        return str(body.get("message") or body.get("reason") or "")
    return ""


class Kube:
    """REST client for the few calls the operator makes. Thread-safe (sync kopf handlers run in threads)."""

    def __init__(self, api_client: Any = None, retries: int = 4, backoff: float = 0.2, timeout: float = 30) -> None:
        if api_client is None:
            api_client = new_api_client()
        self.api = api_client
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.requests = 0
        self._count_lock = threading.Lock()
        self._streams: set[Any] = set()  # open watch responses (`watch`)
        self.create_delay = float(os.environ.get(DEBUG_CREATE_DELAY_ENV) or 0)

    # ----- transport ------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """One call with retries for transient errors; returns the decoded JSON (None when empty)."""
        url = path + ("?" + urllib.parse.urlencode(params) if params else "")
        attempt = 0
        while True:
            attempt += 1
            with self._count_lock:
                self.requests += 1
            try:
                resp = self.api.call_api(
                    url,
                    method,
                    header_params={"Accept": "application/json", "Content-Type": content_type},
                    body=body,
                    auth_settings=["BearerToken"],
                    _preload_content=False,
                    _return_http_data_only=True,
                    _request_timeout=self.timeout,
                )
                raw = resp.data
                return orjson.loads(raw) if raw else None
            except Exception as err:  # noqa: BLE001 - classified below
                status, message = _classify(err)
                error = _api_error(method, path, status, message)
                if isinstance(error, TransientApiError) and attempt <= self.retries:
                    delay = self.backoff * (2 ** (attempt - 1))
                    log.debug("%s %s: %s %s; retry in %.1fs", method, path, status, message, delay)
                    time.sleep(delay)
                    continue
                raise error from None

    def watch(self, path: str, params: Mapping[str, Any], read_timeout: float) -> Iterator[dict[str, Any]]:
        """The events of one watch request on the collection `path` (`watch=1` is added), decoded,
        until the server ends it (its `timeoutSeconds`) or `read_timeout` passes without a byte.

        Not retried here: the caller resumes from the last resourceVersion it saw, which only it
        knows. Connection problems and 429/5xx raise TransientApiError, other refusals
        PermanentApiError; an expired resourceVersion arrives as an ERROR event (code 410).
        `close_watches` ends the open streams from another thread (operator shutdown)."""
        url = path + "?" + urllib.parse.urlencode({**params, "watch": "1"})
        with self._count_lock:
            self.requests += 1
        try:
            resp = self.api.call_api(
                url,
                "GET",
                header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
                _request_timeout=(self.timeout, read_timeout),
            )
        except Exception as err:  # noqa: BLE001 - classified below
            raise _api_error("WATCH", path, *_classify(err)) from None
        with self._count_lock:
            self._streams.add(resp)
        try:
            buffer = b""
            for chunk in resp.stream(amt=None, decode_content=False):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield orjson.loads(line)
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise TransientApiError("WATCH", path, 0, str(err)) from None
        finally:
            with self._count_lock:
                self._streams.discard(resp)
            resp.release_conn()

    def close_watches(self) -> None:
        """End every open watch stream (their iterators stop with TransientApiError or at once)."""
        with self._count_lock:
            streams = list(self._streams)
        for resp in streams:
            try:
                resp.shutdown()
            except Exception:  # noqa: BLE001 - best effort at shutdown; the threads are daemons
                log.debug("closing a watch stream failed", exc_info=True)

    # ----- generic helpers ------------------------------------------------------------------------

    def get(self, path: str) -> Any | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", path)
        except NotFound:
            return None

    def create_if_absent(self, obj: Mapping[str, Any]) -> bool:
        """Create a namespaced object; AlreadyExists counts as done. True when this call created it."""
        path = collection_path(obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"])
        try:
            self.request("POST", path, dict(obj))
        except Conflict:
            return False
        if self.create_delay:
            time.sleep(self.create_delay)
        return True

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> Any:
        return self.request("PATCH", path, dict(patch), content_type="application/merge-patch+json")

    def delete(self, path: str, *, grace_period_seconds: int | None = None) -> bool:
        """Delete (background propagation); True when it was there."""
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        if grace_period_seconds is not None:
            body["gracePeriodSeconds"] = grace_period_seconds
        try:
            self.request("DELETE", path, body)
        except NotFound:
            return False
        return True

    # ----- the operator's calls -------------------------------------------------------------------

    def get_lft(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(lft_path(namespace, name))

    def list_lfts(self, namespace: str) -> list[dict[str, Any]]:
        """The namespace's LoRAFineTunes, a quorum read (run-dir ownership must see the newest starts)."""
        out = self.request("GET", collection_path(API_VERSION, KIND, namespace))
        return list((out or {}).get("items") or [])

    def patch_lft_status(
        self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str | None = None
    ) -> Any:
        """Merge-patch `status` (lists replace wholesale, None removes a key); with `resource_version`,
        only if the object did not change since (else Conflict)."""
        patch: dict[str, Any] = {"status": dict(status)}
        if resource_version:
            patch["metadata"] = {"resourceVersion": resource_version}
        return self.merge_patch(lft_path(namespace, name) + "/status", patch)

    def patch_lft_annotations(self, namespace: str, name: str, annotations: Mapping[str, str | None]) -> Any:
        return self.merge_patch(lft_path(namespace, name), {"metadata": {"annotations": dict(annotations)}})

    def delete_lft(self, namespace: str, name: str) -> bool:
        return self.delete(lft_path(namespace, name))

    def list_nodes(self) -> list[dict[str, Any]]:
        """All nodes, from the apiserver's watch cache (placement tolerates a node seen a moment late)."""
        out = self.request("GET", "/api/v1/nodes", params={"resourceVersion": "0"})
        return list((out or {}).get("items") or [])

    def list_pods(
        self, namespace: str, selector: Mapping[str, str], *, from_cache: bool = False
    ) -> list[dict[str, Any]]:
        """Pods matching `selector`.

        `from_cache=True` reads the apiserver's watch cache (`resourceVersion=0`): no etcd read, and the
        cost does not grow with every pod of the namespace as a quorum list's does (figures:
        docs/benchmarks.md, "Figures behind design choices"). The answer may be a
        moment old: it can miss a pod just created or still show one just deleted, never show a state
        that did not happen. Callers use it to observe and confirm with a quorum read (the default)
        before acting on an absence.
        """
        sel = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        params = {"labelSelector": sel, **({"resourceVersion": "0"} if from_cache else {})}
        out = self.request("GET", f"/api/v1/namespaces/{namespace}/pods", params=params)
        return list((out or {}).get("items") or [])

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(f"/api/v1/namespaces/{namespace}/pods/{name}")

    def delete_pod(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """Graceful delete (the trainer gets SIGTERM and checkpoints); optionally only that incarnation."""
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", body)
        except NotFound:
            return False
        except Conflict:  # precondition failed: a newer pod of the same name; not ours to delete
            return False
        return True

    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")

    def read_pvc(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}")

    def read_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(f"/api/v1/namespaces/{namespace}/configmaps/{name}")

    def post_event(
        self, obj: Mapping[str, Any], type_: str, reason: str, message: str, component: str = "kubelora-operator"
    ) -> None:
        """A core/v1 Event about `obj` (best effort: an Event that cannot be posted is only logged)."""
        meta = obj.get("metadata") or {}
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        namespace = meta.get("namespace") or "default"
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'lft')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion") or API_VERSION,
                "kind": obj.get("kind") or KIND,
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024] or reason,
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": socket.gethostname(),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.request("POST", f"/api/v1/namespaces/{namespace}/events", event)
        except ApiError as err:
            log.warning("cannot post event %s on %s: %s", reason, meta.get("name"), err)


# --------------------------------------------------------------------------- paths and setup


_CORE_PLURALS = {
    "Pod": "pods",
    "Service": "services",
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "Event": "events",
    "PersistentVolumeClaim": "persistentvolumeclaims",
}


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    """REST collection of a namespaced kind the operator creates."""
    if kind == KIND:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
    if api_version != "v1" or kind not in _CORE_PLURALS:
        raise ValueError(f"kube.py does not know the collection of {api_version} {kind}")
    return f"/api/v1/namespaces/{namespace}/{_CORE_PLURALS[kind]}"


def lft_path(namespace: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"


def _api_error(method: str, path: str, status: int, message: str) -> ApiError:
    """The error class the module docstring's policy gives an answer (`_classify`'s status)."""
    if status in RETRY_STATUSES or status == 0:
        return TransientApiError(method, path, status, message)
    if status == 404:
        return NotFound(method, path, status, message)
    if status == 409:
        return Conflict(method, path, status, message)
    return PermanentApiError(method, path, status, message)


def _classify(err: BaseException) -> tuple[int, str]:
    """(HTTP status or 0 for connection problems, message)."""
    status = getattr(err, "status", None)
    if isinstance(status, int) and status == 0:  # ApiException(status=0): SSL/connection trouble
        return 0, str(getattr(err, "reason", "") or err)
    if isinstance(status, int) and status > 0:
        body = getattr(err, "body", None) or b""
        if isinstance(body, str):
            body = body.encode()
        return status, _message(body) or str(getattr(err, "reason", "") or "")
    if isinstance(err, (urllib3.exceptions.HTTPError, OSError, TimeoutError)):
        return 0, str(err)
    raise err


def new_api_client(connections: int | None = None) -> Any:
    """An ApiClient from the in-cluster service account, else $KUBECONFIG / ~/.kube/config.

    `connections`: size of urllib3's connection pool. The default (10) is below the handler threads
    that share this client: the surplus connections were opened and thrown away on every burst
    ("Connection pool is full" warnings in docs/operator-benchmark.md's runs).
    """
    from kubernetes import client, config

    cfg = client.Configuration()
    if connections:
        cfg.connection_pool_maxsize = connections
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        config.load_kube_config(client_configuration=cfg)
    return client.ApiClient(configuration=cfg)
