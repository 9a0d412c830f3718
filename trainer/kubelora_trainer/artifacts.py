"""Deliver a finished run to S3 (or an S3-compatible server) so that readers never see half of it.

Layout under the target URI `s3://bucket/prefix`::

    prefix/adapter/...            adapter_config.json, adapter_model.safetensors, tokenizer files
    prefix/merged/...             only with include_merged
    prefix/summary.json, config.yaml, metrics.jsonl, metrics.csv, loss.png, samples.md (those present)
    prefix/manifest.json          written LAST: the completion marker

Why it is built like this:

* `manifest.json` is the only completion marker. It is written after every other object was
  uploaded, never when any file failed. Readers must treat a prefix without it as
  incomplete, and trust only the objects it lists (a crashed earlier attempt may leave extras).
* A finished artifact is never overwritten by another run. Run identity (`run_id`) is, in order:
  the `run_id` argument, `summary.json`'s `"run_id"`, else derived from content:
  `sha256:` + sha256(adapter_model.safetensors sha256 + ":" + config.yaml sha256). Uploading a run
  whose manifest is already there is idempotent (objects that match by size and sha256 are skipped,
  an unchanged manifest is left alone; if the same run's content changed, its manifest is deleted
  before any object changes and written again at the end); a manifest of a different run is
  refused with ArtifactError before anything is uploaded.
  The manifest is put with a conditional write (If-None-Match / If-Match) so two uploaders racing
  for the same prefix cannot both win.
* Transient failures (connection errors, timeouts, 5xx, throttling) are retried twice over.
  botocore retries each request (multipart parts included) in its `standard` retry mode
  (`AWS_RETRY_MODE=adaptive` adds client-side rate limiting), which knows throttling, Retry-After
  and a retry quota; every retry is logged (s3_client.py). On top of that `_with_retries` re-runs a whole
  idempotent step (check and upload of one object, reading or conditionally writing the manifest)
  `retries` times, `backoff_s` doubling up to 30 s. Why a loop of our own is kept: botocore's
  retries are made for blips, not outages. Its backoff for non-throttling errors is 50 ms * 2^i with
  jitter (botocore 1.44), neither base nor cap configurable, so its attempts are spent within a
  second or two, while a store that restarts or a network that drops is gone for seconds to tens
  of seconds (tests/trainer/test_artifacts_s3.py restarts SeaweedFS mid-upload; botocore's
  attempts alone end before it is back). The step loop also covers a response body that breaks
  mid-read, after botocore's request cycle has returned. Anything else (bad credentials, missing
  bucket, access denied) fails at once with one line that names the bucket and the cause, never
  the credentials. Transient failures that outlast both raise ArtifactUnavailable (the CLI exits
  1, not 2: the operator restarts the job, and a restart that finds the finished run in its run
  dir only uploads it).
* Credentials come only from boto3's own chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the
  environment, or a profile / web identity); this module never reads, logs or prints them.

boto3 is an optional dependency (extra `s3`); it is imported only when an upload is asked for.
Over 400 lines on purpose: the protocol above (refusal, idempotent re-upload, manifest last and
conditional) is one sequence, easier to check for its invariants when read in one place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from .config import S3Target
from .contract import sha256_file
from .s3_client import client_error_parts, describe, is_not_found, is_transient, make_client

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "kubelora-artifact/v1"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
SUMMARY_FILE = "summary.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Top-level run files uploaded when present (besides adapter/ and merged/).
EXTRA_FILES = ("summary.json", "config.yaml", "metrics.jsonl", "metrics.csv", "loss.png", "samples.md")
#: Objects at or above this size go up as multipart uploads, in parts of MULTIPART_CHUNKSIZE.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 64 * 1024 * 1024

T = TypeVar("T")


class ArtifactError(RuntimeError):
    """The artifact could not be delivered (or may not be): a specific one-line message."""


class ArtifactUnavailable(ArtifactError):  # noqa: N818 - a state of the store, like ArtifactError's cases
    """The store stayed unreachable (transient errors) through every retry. Not the user's input: the
    CLI exits 1, not 2, so the operator restarts the job, and a restart whose run dir survived
    (a PVC) re-delivers the finished run without training again (recipe.deliver_only)."""


@dataclass(frozen=True)
class ArtifactInfo:
    """Where the delivered adapter is; `to_dict()` is what the operator puts in status.artifact."""

    uri: str
    sha256: str
    size_bytes: int
    manifest_uri: str

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "sha256": self.sha256, "sizeBytes": self.size_bytes, "manifestUri": self.manifest_uri}


@dataclass(frozen=True)
class _Location:
    bucket: str
    prefix: str  # no leading/trailing slash; "" for the bucket root

    @classmethod
    def parse(cls, uri: str) -> _Location:
        if not uri.startswith("s3://"):
            raise ArtifactError(f"not an s3:// URI: {uri!r}")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ArtifactError(f"no bucket in S3 URI {uri!r}")
        return cls(bucket, prefix.strip("/"))

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def uri(self, rel: str = "") -> str:
        path = self.key(rel) if rel else self.prefix
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"


@dataclass(frozen=True)
class _LocalFile:
    rel: str
    path: Path
    size: int
    sha256: str


# --------------------------------------------------------------------------- helpers


def kubelora_version() -> str:
    try:
        from importlib.metadata import version

        return version("kubelora")
    except Exception:  # not installed as a distribution (e.g. a source checkout on sys.path)
        return "unknown"


def _with_retries(fn: Callable[[], T], *, what: str, bucket: str, retries: int, backoff_s: float) -> T:
    """Run one idempotent step `fn`; when it fails transiently (botocore's own request retries spent,
    or a body broken mid-read), run it again, `retries` times, `backoff_s` doubling (capped at 30 s).
    The module docstring says why this loop exists beside botocore's."""
    attempt = 0
    while True:
        try:
            return fn()
        except ArtifactError:
            raise
        except Exception as exc:
            if not is_transient(exc):
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise ArtifactError(f"{what} failed{tries}: {describe(exc, bucket)}") from exc
            if attempt >= retries:
                raise ArtifactUnavailable(
                    f"{what} failed after {attempt + 1} attempts: {describe(exc, bucket)} (S3 unreachable; "
                    f"objects already uploaded may be visible, but without {MANIFEST_FILE}, written last, "
                    "the artifact is not complete and readers must not use it)"
                ) from exc
            delay = min(backoff_s * (2**attempt), 30.0)
            attempt += 1
            log.warning(
                "%s: transient error (%s); step retry %d/%d in %.1fs",
                what, describe(exc, bucket), attempt, retries, delay,
            )  # fmt: skip
            time.sleep(delay)


#: TEST-ONLY knob (tests/e2e: "the S3 server stops during the upload"); never set it in production.
#: When it names a file that does not exist yet, an upload pauses after its first object: it writes
#: "holding" to the file and waits (at most TEST_HOLD_MAX_S) until the file says anything else. An
#: existing file does not hold, so a restarted attempt uploads straight through. Gives a test a
#: deterministic point where part of the artifact is in the bucket and the manifest is not.
TEST_UPLOAD_HOLD_ENV = "KUBELORA_TEST_UPLOAD_HOLD"
TEST_HOLD_MAX_S = 300.0


def _test_hold() -> None:
    path = os.environ.get(TEST_UPLOAD_HOLD_ENV)
    if not path:
        return
    hold = Path(path)
    try:
        with hold.open("x") as fh:
            fh.write("holding")
    except FileExistsError:
        return
    log.warning("%s: upload held after its first object (test-only knob)", TEST_UPLOAD_HOLD_ENV)
    deadline = time.monotonic() + TEST_HOLD_MAX_S
    while time.monotonic() < deadline and hold.read_text() == "holding":
        time.sleep(0.05)
    log.warning("%s: upload released", TEST_UPLOAD_HOLD_ENV)


# --------------------------------------------------------------------------- local side


def _collect(run_dir: Path, include_merged: bool) -> list[_LocalFile]:
    """The files to upload, adapter first, in a stable order; each with size and sha256."""
    if not (run_dir / SUMMARY_FILE).is_file():
        raise ArtifactError(f"run dir {run_dir} is not finished (no {SUMMARY_FILE}); nothing to upload")
    adapter = run_dir / ADAPTER_DIR
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise ArtifactError(f"run dir {run_dir} has no {ADAPTER_DIR}/{ADAPTER_WEIGHTS}")
    dirs = [adapter]
    if include_merged:
        merged = run_dir / MERGED_DIR
        if not merged.is_dir():
            raise ArtifactError(f"include_merged is set but run dir {run_dir} has no {MERGED_DIR}/")
        dirs.append(merged)
    paths: list[Path] = []
    for d in dirs:
        paths += sorted(p for p in d.rglob("*") if p.is_file() and not p.is_symlink())
    paths += [run_dir / name for name in EXTRA_FILES if (run_dir / name).is_file()]
    # summary.json is the run's own completion marker: upload it after the data it describes.
    paths.sort(key=lambda p: p.name == SUMMARY_FILE)
    return [_LocalFile(p.relative_to(run_dir).as_posix(), p, p.stat().st_size, sha256_file(p)) for p in paths]


def run_identity(run_dir: Path, adapter_sha256: str | None = None) -> str:
    """The run's id: summary.json's "run_id", else derived from the adapter's and config's content."""
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        summary = {}
    rid = summary.get("run_id") if isinstance(summary, dict) else None
    if isinstance(rid, str) and rid.strip():
        return rid.strip()
    weights_sha = adapter_sha256 or sha256_file(run_dir / ADAPTER_DIR / ADAPTER_WEIGHTS)
    cfg = run_dir / "config.yaml"
    cfg_sha = sha256_file(cfg) if cfg.is_file() else ""
    return "sha256:" + hashlib.sha256(f"{weights_sha}:{cfg_sha}".encode()).hexdigest()


# --------------------------------------------------------------------------- remote side


def _read_manifest(client: Any, loc: _Location, *, retries: int, backoff_s: float) -> tuple[dict | None, str | None]:
    """(manifest, etag) at the prefix, or (None, None) when there is none."""

    def get() -> tuple[dict | None, str | None]:
        try:
            resp = client.get_object(Bucket=loc.bucket, Key=loc.key(MANIFEST_FILE))
        except Exception as exc:
            if is_not_found(exc):
                return None, None
            raise
        body = resp["Body"].read()
        try:
            data = json.loads(body)
        except ValueError:
            data = {}
        return (data if isinstance(data, dict) else {}), resp.get("ETag")

    return _with_retries(
        get, what=f"reading {loc.uri(MANIFEST_FILE)}", bucket=loc.bucket, retries=retries, backoff_s=backoff_s
    )


def _refuse_foreign(manifest: dict, loc: _Location, run_id: str) -> None:
    other = manifest.get("run_id")
    if other != run_id:
        who = f"run {other!r}" if isinstance(other, str) else "an unknown writer"
        raise ArtifactError(
            f"{loc.uri()} already holds a finished artifact of {who} ({MANIFEST_FILE} exists); "
            f"refusing to overwrite it with run {run_id!r}: choose another S3 URI or delete the old artifact"
        )


def _remote_matches(client: Any, loc: _Location, f: _LocalFile) -> bool:
    try:
        head = client.head_object(Bucket=loc.bucket, Key=loc.key(f.rel))
    except Exception as exc:
        if is_not_found(exc):
            return False
        raise
    return int(head.get("ContentLength", -1)) == f.size and (head.get("Metadata") or {}).get("sha256") == f.sha256


def _content_type(rel: str) -> str:
    suffix = rel.rsplit(".", 1)[-1].lower() if "." in rel else ""
    return {
        "json": "application/json",
        "jsonl": "application/x-ndjson",
        "csv": "text/csv",
        "png": "image/png",
        "md": "text/markdown",
        "yaml": "application/yaml",
        "txt": "text/plain",
    }.get(suffix, "application/octet-stream")


def check_target(target: S3Target, *, run_id: str | None = None, retries: int = 2, backoff_s: float = 1.0) -> None:
    """Preflight before training: the bucket exists and these credentials may write to it (a small probe
    object is put and deleted under the prefix). With `run_id`, also refuse a prefix already finished by another run.
    Raises ArtifactError with one line; returns None when the target is usable."""
    loc = _Location.parse(target.uri)
    client = make_client(target)
    # A PUT rather than HeadBucket: HEAD error responses have no body, so a 403 there cannot tell
    # bad credentials from missing permissions; the PUT's error code names the cause (NoSuchBucket,
    # AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch).
    probe = loc.key(f".kubelora-probe-{uuid.uuid4().hex}")
    _with_retries(
        lambda: client.put_object(Bucket=loc.bucket, Key=probe, Body=b"kubelora write probe\n"),
        what=f"writing a probe object to {target.uri}",
        bucket=loc.bucket,
        retries=retries,
        backoff_s=backoff_s,
    )
    try:
        client.delete_object(Bucket=loc.bucket, Key=probe)
    except Exception as exc:  # uploads never delete: a leftover probe is untidy, not fatal
        log.warning("could not delete probe object s3://%s/%s: %s", loc.bucket, probe, describe(exc, loc.bucket))
    if run_id is not None:
        manifest, _ = _read_manifest(client, loc, retries=retries, backoff_s=backoff_s)
        if manifest is not None:
            _refuse_foreign(manifest, loc, run_id)


def upload_run(
    run_dir: Path,
    target: S3Target,
    *,
    include_merged: bool,
    retries: int = 5,
    run_id: str | None = None,
    backoff_s: float = 1.0,
    multipart_threshold: int = MULTIPART_THRESHOLD,
    multipart_chunksize: int = MULTIPART_CHUNKSIZE,
    on_file: Callable[[str, bool], None] | None = None,
) -> ArtifactInfo:
    """Upload a finished run dir to `target.uri`, then write `manifest.json` last.

    `on_file(rel_path, uploaded)` is called after each object is in place (uploaded=False when an
    identical object was already there), e.g. for progress; an exception from it aborts the upload
    (no manifest). Raises ArtifactError on refusal or failure.
    """
    from boto3.s3.transfer import TransferConfig

    run_dir = Path(run_dir)
    loc = _Location.parse(target.uri)
    files = _collect(run_dir, include_merged)
    weights = next(f for f in files if f.rel == f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}")
    rid = run_id or run_identity(run_dir, weights.sha256)
    client = make_client(target)

    listing = [{"path": f.rel, "size_bytes": f.size, "sha256": f.sha256} for f in files]
    existing, etag = _read_manifest(client, loc, retries=retries, backoff_s=backoff_s)
    if existing is not None:
        _refuse_foreign(existing, loc, rid)
        if existing.get("files") == listing and existing.get("merged") == include_merged:
            log.info("%s already finished by this run (%s); verifying idempotently", loc.uri(), rid)
        else:
            # The same run with other content (e.g. re-published): withdraw the completion marker
            # first, so that no reader ever sees a manifest that disagrees with the objects.
            log.info("%s: this run's content changed; withdrawing %s until re-uploaded", loc.uri(), MANIFEST_FILE)
            _with_retries(
                lambda: client.delete_object(Bucket=loc.bucket, Key=loc.key(MANIFEST_FILE)),
                what=f"withdrawing {loc.uri(MANIFEST_FILE)}",
                bucket=loc.bucket,
                retries=retries,
                backoff_s=backoff_s,
            )
            existing, etag = None, None

    transfer = TransferConfig(
        multipart_threshold=multipart_threshold,
        multipart_chunksize=multipart_chunksize,
        max_concurrency=4,
        use_threads=True,
    )
    t0 = time.monotonic()
    sent = 0
    for f in files:

        def put(f: _LocalFile = f) -> bool:
            if _remote_matches(client, loc, f):
                return False
            client.upload_file(
                str(f.path),
                loc.bucket,
                loc.key(f.rel),
                Config=transfer,
                ExtraArgs={"Metadata": {"sha256": f.sha256}, "ContentType": _content_type(f.rel)},
            )
            return True

        uploaded = _with_retries(
            put, what=f"uploading {f.rel} to {loc.uri(f.rel)}", bucket=loc.bucket, retries=retries, backoff_s=backoff_s
        )
        sent += f.size if uploaded else 0
        log.info("%s %s (%d bytes)", "uploaded" if uploaded else "already there:", loc.uri(f.rel), f.size)
        if on_file is not None:
            on_file(f.rel, uploaded)
        if f is files[0]:
            _test_hold()

    manifest = {
        "format": MANIFEST_FORMAT,
        "run_id": rid,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kubelora_version": kubelora_version(),
        "uri": loc.uri(),
        "adapter": {"path": weights.rel, "sha256": weights.sha256, "size_bytes": weights.size},
        "merged": include_merged,
        "files": listing,
        "total_bytes": sum(f.size for f in files),
    }
    info = ArtifactInfo(loc.uri(), weights.sha256, weights.size, loc.uri(MANIFEST_FILE))
    if existing is not None and all(existing.get(k) == manifest[k] for k in ("run_id", "adapter", "merged", "files")):
        log.info("manifest %s unchanged; upload complete", info.manifest_uri)
        return info

    body = json.dumps(manifest, indent=2).encode() + b"\n"

    def put_manifest() -> None:
        # Conditional write: only if still absent (new artifact) or still the same object we read
        # (same run re-uploading). A racing writer makes this fail with PreconditionFailed.
        cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            client.put_object(
                Bucket=loc.bucket, Key=loc.key(MANIFEST_FILE), Body=body, ContentType="application/json", **cond
            )
        except Exception as exc:
            parts = client_error_parts(exc)
            if parts is None or parts[0] not in ("PreconditionFailed", "NotImplemented") and parts[1] != 412:
                raise
            now, _ = _read_manifest(client, loc, retries=retries, backoff_s=backoff_s)
            if now is not None:
                _refuse_foreign(now, loc, rid)  # someone else finished first: refuse unless it was us
            if parts[0] == "NotImplemented":  # server without conditional writes: checked just above
                client.put_object(
                    Bucket=loc.bucket, Key=loc.key(MANIFEST_FILE), Body=body, ContentType="application/json"
                )
            elif now is None:
                raise
            # else: the same run finished meanwhile; its manifest stands

    _with_retries(
        put_manifest, what=f"writing {info.manifest_uri}", bucket=loc.bucket, retries=retries, backoff_s=backoff_s
    )
    wall = time.monotonic() - t0
    log.info("artifact complete: %s (%d files, %d bytes sent in %.1fs)", info.manifest_uri, len(files), sent, wall)
    return info
