"""Model and data sources: fetch `s3://` sources once into a cache, verified; check local ones are readable.

Why a cache with a marker: a base model is gigabytes, and without a shared cache every worker would
download it again on every restart. `fetch` puts each source in its own directory of a cache root,
`<root>/<key>/<basename>`, where `key` is derived from the endpoint and URI alone, so the operator
can name the path in the workers' config before anything is fetched (`cached_path`). A source is
downloaded into a private `.partial-*` directory, every object is checked against the listing (size,
and the MD5 that a single-part upload's ETag is), its sha256 is recorded, the marker file
`.kubelora-source.json` is written LAST, and only then is the directory renamed into place. So a
cache directory without its marker (a crash, a copy by hand) is never used: it is fetched again. A
later fetch of the same URI lists the source once (one request) and reuses the cache when the
listing still matches the marker (same keys, sizes and ETags) and the files have their recorded
sizes: no second download.

A hub model (`hf://org/name[@revision]`, named so by the operator's fetch pod) is fetched the same
way into a hub-cache layout: hub_fetch.py.

Local paths (a hub-cache-like directory, a PVC mounted by the operator) are not copied, only
checked: they exist, every file in them is readable, a directory is not empty.

Errors: `SourceError` (a ConfigError: exit 2, the input is wrong: no such object, access denied,
unreadable file) and `SourceUnavailable` (an ArtifactUnavailable: exit 1, the store stayed
unreachable through the retries). Credentials come from boto3's chain (AWS_* env in pods, from the
resource's Secret), as for artifact upload (artifacts.py, whose S3 client and retry policy this
module reuses). No torch import: the operator imports `cached_path` and the scheme names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import ConfigError, S3Source, S3Target, TrainerConfig

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
#: `pvc://CLAIM/PATH`: a path on a PVC; the operator mounts the claim and rewrites the value (pods only).
PVC_SCHEME = "pvc://"
MARKER_FILE = ".kubelora-source.json"
MARKER_FORMAT = "kubelora-source/v1"
PARTIAL_PREFIX = ".partial-"
CHUNK_BYTES = 8 << 20
#: Transient failures per object are retried this often (backoff as for artifact upload).
RETRIES = 4
BACKOFF_S = 1.0


class SourceError(ConfigError):
    """A source that is missing, unreadable or not what was listed: one line naming the source."""


class SourceUnavailable(RuntimeError):
    """The source's store stayed unreachable through every retry (exit 1: a later attempt may work)."""


@dataclass(frozen=True)
class Fetched:
    """What `fetch_source` found or fetched: the local path the trainer reads, and how much."""

    uri: str
    path: str
    files: int
    bytes: int
    downloaded: bool
    """False: reused from the cache (or a local path, never copied)."""


def is_s3(value: str | None) -> bool:
    return bool(value) and str(value).startswith(S3_SCHEME)


def cache_key(uri: str, endpoint: str | None) -> str:
    """The cache directory of a source: the same URI on another server is another source."""
    return hashlib.sha256(f"{endpoint or ''}\0{uri}".encode()).hexdigest()[:24]


def _basename(uri: str) -> str:
    """Last path element of an S3 URI (the bucket for a whole bucket): keeps the file extension that
    `data.format: auto` reads."""
    return uri[len(S3_SCHEME) :].rstrip("/").rsplit("/", 1)[-1]


def cached_path(uri: str, root: str | Path, endpoint: str | None) -> str:
    """Where `fetch_source` puts `uri` under `root` (a file or a directory); pure, for the operator."""
    return f"{str(root).rstrip('/')}/{cache_key(uri, endpoint)}/{_basename(uri)}"


def default_cache_root(cfg: TrainerConfig) -> Path:
    if cfg.sources.cache_dir:
        return Path(cfg.sources.cache_dir)
    return Path(os.environ.get("KUBELORA_CACHE", Path.home() / ".cache" / "kubelora")) / "sources"


# --------------------------------------------------------------------------- local paths


def check_local(path: str) -> Fetched:
    """A local file or directory the trainer will read: it exists, is readable, is not empty."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"source {path}: no such file or directory")
    files = [p] if p.is_file() else [f for f in sorted(p.rglob("*")) if f.is_file()]
    if not files:
        raise SourceError(f"source {path}: directory is empty")
    total = 0
    for f in files:
        if not os.access(f, os.R_OK):
            raise SourceError(f"source {path}: {f} is not readable (permissions)")
        total += f.stat().st_size
    return Fetched(path, path, len(files), total, downloaded=False)


# --------------------------------------------------------------------------- S3


def _client(uri: str, s3: S3Source | None) -> Any:
    from .s3_client import make_client

    s3 = s3 or S3Source()
    target = S3Target(uri=uri, endpoint=s3.endpoint, region=s3.region, verify_tls=s3.verify_tls)
    return make_client(target)


def _call(fn: Any, what: str, bucket: str) -> Any:
    """artifacts' retry policy, with this module's errors."""
    from .artifacts import ArtifactError, ArtifactUnavailable, _with_retries

    try:
        return _with_retries(fn, what=what, bucket=bucket, retries=RETRIES, backoff_s=BACKOFF_S)
    except ArtifactUnavailable as err:
        raise SourceUnavailable(str(err).split(" (S3 unreachable")[0] + " (S3 unreachable; retry later)") from None
    except ArtifactError as err:
        raise SourceError(str(err)) from None


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise SourceError(f"source {uri}: no bucket in the URI")
    return bucket, key.strip("/")


def list_source(client: Any, uri: str) -> dict[str, dict[str, Any]]:
    """The objects of `uri`: {"": {...}} for one object, {relative path: {...}} for a prefix; sizes and ETags."""
    bucket, key = _split(uri)
    prefix = f"{key}/" if key else ""

    def listing() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            out += page.get("Contents") or []
        return out

    objects = _call(listing, f"source {uri}: listing", bucket)
    single = {o["Key"]: o for o in objects if o["Key"] == key and key}
    chosen = single or {o["Key"]: o for o in objects if o["Key"].startswith(prefix) and not o["Key"].endswith("/")}
    if not chosen:
        raise SourceError(f"source {uri}: no such object or prefix in bucket {bucket!r}")
    return {
        ("" if single else k[len(prefix) :]): {"size": int(o["Size"]), "etag": str(o.get("ETag") or "").strip('"')}
        for k, o in sorted(chosen.items())
    }


def _read_marker(directory: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((directory / MARKER_FILE).read_text())
        if isinstance(data, dict) and data.get("format") == MARKER_FORMAT and isinstance(data.get("objects"), dict):
            return data
    return None


def _local_file(entry: Path, rel: str) -> Path:
    return entry / rel if rel else entry


def _reusable(final: Path, name: str, listed: dict[str, dict[str, Any]]) -> bool:
    """The cache holds exactly what the source lists now (marker present, same objects, sizes on disk)."""
    marker = _read_marker(final)
    if marker is None:
        return False
    recorded = {rel: {"size": o.get("size"), "etag": o.get("etag")} for rel, o in marker["objects"].items()}
    if recorded != listed:
        return False
    entry = final / name
    return all(
        _local_file(entry, rel).is_file() and _local_file(entry, rel).stat().st_size == o["size"]
        for rel, o in listed.items()
    )


def _download(client: Any, uri: str, rel: str, meta: dict[str, Any], dest: Path) -> str:
    """One object into `dest`; checks its size and (single-part ETag) MD5; returns its sha256."""
    bucket, key = _split(uri)
    obj_key = f"{key}/{rel}" if rel else key
    dest.parent.mkdir(parents=True, exist_ok=True)

    def get() -> str:
        sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
        body = client.get_object(Bucket=bucket, Key=obj_key)["Body"]
        with dest.open("wb") as fh:
            for chunk in iter(lambda: body.read(CHUNK_BYTES), b""):
                fh.write(chunk)
                sha.update(chunk)
                md5.update(chunk)
                size += len(chunk)
        if size != meta["size"]:
            raise SourceError(f"source {uri}: {obj_key} has {size} bytes, the listing said {meta['size']}")
        etag = meta["etag"]
        if etag and "-" not in etag and len(etag) == 32 and md5.hexdigest() != etag:
            raise SourceError(f"source {uri}: {obj_key} does not match its ETag (MD5) {etag}: corrupted download")
        return sha.hexdigest()

    return str(_call(get, f"source {uri}: download of {obj_key}", bucket))


def fetch_source(uri: str, root: str | Path, s3: S3Source | None = None, client: Any = None) -> Fetched:
    """Fetch `uri` into `root` once (see the module docstring); reuse a complete, current copy."""
    root = Path(root)
    endpoint = s3.endpoint if s3 else None
    final = root / cache_key(uri, endpoint)
    name = _basename(uri)
    client = client if client is not None else _client(uri, s3)
    listed = list_source(client, uri)
    total = sum(o["size"] for o in listed.values())
    if _reusable(final, name, listed):
        log.info("source %s: cached at %s (%d files, %d bytes), not downloaded again", uri, final, len(listed), total)
        return Fetched(uri, str(final / name), len(listed), total, downloaded=False)
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f"{PARTIAL_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        objects = {}
        for rel, meta in listed.items():
            sha = _download(client, uri, rel, meta, _local_file(partial / name, rel))
            objects[rel] = {**meta, "sha256": sha}
        publish(partial, final, {"uri": uri, "endpoint": endpoint, "objects": objects, "bytes": total})
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("source %s: fetched into %s (%d files, %d bytes, verified)", uri, final, len(listed), total)
    return Fetched(uri, str(final / name), len(listed), total, downloaded=True)


def publish(partial: Path, final: Path, marker: dict[str, Any]) -> None:
    """Write the marker into the complete copy LAST, then rename the copy into place (`_install`)."""
    stamped = {"format": MARKER_FORMAT, **marker,
               "fetchedAt": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    (partial / MARKER_FILE).write_text(json.dumps(stamped, indent=1))
    _install(partial, final)


def _install(partial: Path, final: Path) -> None:
    """Rename the complete copy into place; an older or incomplete copy there is moved aside first."""
    if final.exists():
        aside = final.with_name(f"{PARTIAL_PREFIX}{final.name}-old-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):
            final.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        partial.rename(final)
    except OSError:
        if _read_marker(final) is None:  # not a concurrent fetch that won the race
            raise


# --------------------------------------------------------------------------- whole configs


def _source_fields(cfg: TrainerConfig) -> Iterator[tuple[Any, str, str]]:
    """(section, attribute, value) of every source a config names."""
    for section, attr in ((cfg.model, "name_or_path"), (cfg.data, "path"), (cfg.data, "eval_path")):
        value = getattr(section, attr)
        if value:
            yield section, attr, value


def fetch_all(sources: list[str], root: str | Path, s3: S3Source | None = None) -> list[Fetched]:
    """Fetch every `s3://` source and `hf://` hub model (hub_fetch.py), check every local one (`kubelora-train fetch`)."""
    from .hub_fetch import HUB_SCHEME, fetch_hub_model

    out: list[Fetched] = []
    for uri in dict.fromkeys(sources):
        if uri.startswith(PVC_SCHEME):
            raise SourceError(f"source {uri}: pvc:// paths are mounted by the operator; give the mounted path")
        if uri.startswith(HUB_SCHEME):
            out.append(fetch_hub_model(uri, root))
        else:
            out.append(fetch_source(uri, root, s3) if is_s3(uri) else check_local(uri))
    return out


def localize(cfg: TrainerConfig) -> TrainerConfig:
    """A laptop run (`kubelora-train run`): fetch the config's `s3://` sources and point it at the copies."""
    for section, attr, value in _source_fields(cfg):
        if value.startswith(PVC_SCHEME):
            raise SourceError(f"{value}: pvc:// sources are for a LoRAFineTune (the operator mounts the claim)")
        if is_s3(value):
            setattr(section, attr, fetch_source(value, default_cache_root(cfg), cfg.sources.s3).path)
    return cfg


def success_message(fetched: list[Fetched]) -> str:
    """The fetch pod's termination message: what each source became (JSON, one line)."""
    return json.dumps({"sources": [asdict(f) for f in fetched]}, separators=(",", ":"))
