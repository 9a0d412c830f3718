"""The S3 client of the trainer (artifact upload, `s3://` sources) and what its failures mean.

Why its own module: artifacts.py (upload) and sources.py (fetch) and the operator's CLI client make
the same client and read its errors the same way: transient (worth retrying) or not, and one line
that names the cause and the bucket, never the credentials.

Retries: botocore retries each request in its `standard` mode (`AWS_RETRY_MODE=adaptive` adds
client-side rate limiting; `legacy` is not taken: it retries fewer errors and backs off without
jitter), REQUEST_ATTEMPTS attempts in all, and every retry is logged at WARNING with its cause.
Callers re-run whole steps on top for outages (artifacts.py says why).

boto3 is an optional dependency (extra `s3`); it is imported only when a client is made.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from .config import S3Target

log = logging.getLogger(__name__)

#: Attempts botocore makes of each request (its retries: blips); callers re-run whole steps on top.
REQUEST_ATTEMPTS = 3
#: botocore's retry modes: `standard` (the default here), `adaptive` (standard plus client-side rate limiting).
RETRY_MODES = ("standard", "adaptive")

_THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "SlowDown",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "ServiceUnavailable",
    }
)
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
        "AuthorizationHeaderMalformed",
    }
)
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def _retry_mode() -> str:
    """`AWS_RETRY_MODE` (the AWS SDKs' own variable) when it names a mode that retries; else `standard`
    (botocore's default, `legacy`, retries fewer errors and backs off without jitter)."""
    mode = os.environ.get("AWS_RETRY_MODE", "").strip().lower()
    return mode if mode in RETRY_MODES else "standard"


def _log_retry(total: int) -> Callable[..., None]:
    """A `needs-retry` hook that only logs: botocore decides whether and when to retry; this says why."""

    def hook(response: Any = None, caught_exception: BaseException | None = None, attempts: int = 0, **kw: Any) -> None:
        if attempts >= total:
            return  # the last attempt: the step's error says it
        if caught_exception is not None:
            if not is_transient(caught_exception):
                return
            cause = describe(caught_exception, "")
        elif response is not None:
            http, parsed = response
            code = str((parsed.get("Error") or {}).get("Code") or "")
            if http.status_code < 400 or not _transient_code(code, http.status_code):
                return
            cause = f"{code or 'error'} (HTTP {http.status_code})"
        else:
            return
        op = getattr(kw.get("operation"), "name", "request")
        log.warning("S3 %s: transient error (%s), attempt %d/%d; botocore retries it", op, cause, attempts, total)

    return hook


def make_client(target: S3Target) -> Any:
    """An S3 client whose credentials come from boto3's chain only; botocore retries each request
    (REQUEST_ATTEMPTS attempts in all, mode from `_retry_mode`) and logs every retry."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:  # pragma: no cover - depends on the image
        from .artifacts import ArtifactError  # the CLI's one-line error (artifacts imports this module)

        raise ArtifactError("S3 output needs boto3: install kubelora[s3]") from e
    config = Config(
        retries={"mode": _retry_mode(), "total_max_attempts": REQUEST_ATTEMPTS},
        connect_timeout=10,
        read_timeout=120,
        # S3-compatible servers (MinIO, SeaweedFS, Ceph) want path-style addressing.
        s3={"addressing_style": "path" if target.endpoint else "auto"},
        signature_version="s3v4",
    )
    session = boto3.session.Session()
    client = session.client(
        "s3",
        endpoint_url=target.endpoint or None,
        region_name=target.region or ("us-east-1" if target.endpoint else None),
        verify=target.verify_tls,
        config=config,
    )
    client.meta.events.register("needs-retry.s3", _log_retry(REQUEST_ATTEMPTS))
    return client


def client_error_parts(exc: BaseException) -> tuple[str, int, str] | None:
    """(code, http status, message) of a botocore ClientError, else None."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    err = response.get("Error") or {}
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    return str(err.get("Code") or status or "Unknown"), status, str(err.get("Message") or "").strip()


def root_cause(exc: BaseException) -> BaseException:
    """boto3's upload_file turns a ClientError into S3UploadFailedError (a plain string); the
    original is its __context__. Walk down to the first exception that tells us more."""
    seen = 0
    cur: BaseException = exc
    while type(cur).__name__ == "S3UploadFailedError" and seen < 5:
        nxt = cur.__cause__ or cur.__context__
        if nxt is None:
            break
        cur, seen = nxt, seen + 1
    return cur


def _transient_code(code: str, status: int) -> bool:
    return status >= 500 or status == 429 or code in _THROTTLING_CODES


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: connection trouble, timeouts, 5xx, throttling. Not: auth, 4xx, local I/O."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    exc = root_cause(exc)
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return True
    parts = client_error_parts(exc)
    if parts is not None:
        return _transient_code(parts[0], parts[1])
    # urllib3/socket errors that escaped botocore's wrapping
    return isinstance(exc, (ConnectionError, TimeoutError))


def describe(exc: BaseException, bucket: str) -> str:
    """One line naming the cause; never includes credentials (botocore messages do not carry them)."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    exc = root_cause(exc)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or another boto3 credential source)"
    parts = client_error_parts(exc)
    if parts is not None:
        code, status, message = parts
        if code in _CREDENTIAL_CODES:
            return (
                f"S3 rejected the credentials ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                "and the endpoint"
            )
        if code == "NoSuchBucket" or (status == 404 and code in ("404", "NotFound")):
            return f"bucket {bucket!r} does not exist"
        if code in ("AccessDenied", "403", "Forbidden"):
            return f"access denied to bucket {bucket!r} ({code}{': ' + message if message else ''})"
        return f"{code}{' (HTTP ' + str(status) + ')' if status else ''}{': ' + message if message else ''}"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_not_found(exc: BaseException) -> bool:
    parts = client_error_parts(exc)
    return parts is not None and (parts[0] in _NOT_FOUND_CODES or parts[1] == 404) and parts[0] != "NoSuchBucket"
