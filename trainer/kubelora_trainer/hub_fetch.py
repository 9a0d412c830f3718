"""A hub model fetched once into the source cache, in the hub-cache layout, for workers that load it offline.

Why: without it every worker downloads a hub model again on every restart (its HF_HOME is a per-pod
emptyDir) and every worker needs the hub token. The fetch pod instead downloads `hf://REPO[@REVISION]`
once with `snapshot_download` into `<root>/<key>/hub` (a hub cache: `models--org--name/...`), so the
workers keep the model's hub id and load it read-only with HF_HUB_CACHE pointing there and
HF_HUB_OFFLINE=1, with no token. `key` depends on the URI alone, so the operator names the directory
before anything is fetched (`hub_cache_dir`).

As for an `s3://` source (sources.py): the download goes to a private `.partial-*` directory,
huggingface_hub checks each file's size (and the LFS sha256 it lists), the sha256 of every file is
recorded in the marker with the commit the revision resolved to, the marker is written LAST and the
directory is then renamed into place. A later fetch asks the hub once which commit the revision is
now and reuses the cache when the marker records that commit from the same endpoint and the files
still have their sizes: nothing is downloaded. A hub that does not answer then leaves the cached
copy in use (as hub.py does for a worker's own hub cache). A missing or gated repo, an unknown revision or a
refused token is a `SourceError` (exit 2) with hub.py's wording; an unreachable hub is
`SourceUnavailable` (exit 1, retried). No torch import: the operator imports the pure helpers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

from .config import MODEL_ALIASES

log = logging.getLogger(__name__)

HUB_SCHEME = "hf://"
HUB_CACHE_DIR = "hub"
HUB_MARKER_FORMAT = "kubelora-hub-source/v1"
#: What a model needs to load and train: config, tokenizer, chat template, weights. Other weight
#: formats (.bin, .h5, .msgpack, .onnx) are fetched only when the repo has no safetensors.
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]
LEGACY_WEIGHTS = ["*.bin"]


def is_hub_id(value: str) -> bool:
    """A `model.nameOrPath` that names a hub repo: not an alias, a scheme, a path or a GGUF file (model.py's rule)."""
    return bool(value) and value not in MODEL_ALIASES and "://" not in value and not (
        value.startswith((".", "/", "~")) or value.count("/") > 1 or value.endswith(".gguf")
    )


def hub_uri(repo_id: str, revision: str | None, gguf_file: str | None = None) -> str:
    """The source name of a hub model in `kubelora-train fetch`: `hf://org/name[@revision][#file.gguf]`."""
    return f"{HUB_SCHEME}{repo_id}" + (f"@{revision}" if revision else "") + (f"#{gguf_file}" if gguf_file else "")


def parse_hub_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`hf://org/name@rev#file.gguf` -> (repo id, revision or None, GGUF file or None)."""
    rest, _, gguf_file = uri[len(HUB_SCHEME) :].partition("#")
    repo_id, _, revision = rest.partition("@")
    return repo_id, revision or None, gguf_file or None


def hub_cache_dir(uri: str, root: str | Path) -> str:
    """The hub cache (HF_HUB_CACHE) that `fetch_hub_model` fills for `uri` under `root`; pure, for the operator."""
    from .sources import cache_key

    return f"{str(root).rstrip('/')}/{cache_key(uri, None)}/{HUB_CACHE_DIR}"


def _resolve(repo_id: str, revision: str | None, endpoint: str, gguf_file: str | None) -> tuple[str, list[str]]:
    """(commit, allow_patterns) from one metadata request; the hub's refusals become one-line SourceErrors."""
    from huggingface_hub import HfApi

    from .hub import PROBE_TIMEOUT_S, _first_line, _is_transport_error, hub_answer_error
    from .sources import SourceError, SourceUnavailable

    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, timeout=PROBE_TIMEOUT_S)
    except Exception as err:
        refused = hub_answer_error(err, repo_id, revision, endpoint)
        if refused is not None:
            raise SourceError(str(refused)) from None
        if _is_transport_error(err) or getattr(err, "response", None) is not None:
            raise SourceUnavailable(f"model {repo_id}: the hub ({endpoint}) did not answer: {_first_line(err)}") from None
        raise
    if not info.sha:
        raise SourceUnavailable(f"model {repo_id}: the hub ({endpoint}) named no commit for revision {revision!r}")
    files = {s.rfilename for s in (info.siblings or [])}
    if gguf_file:
        if files and gguf_file not in files:
            raise SourceError(f"model {repo_id}: the hub repo has no {gguf_file} (model.ggufFile)")
        return info.sha, ["*.json", "*.model", "*.txt", "*.jinja", gguf_file]
    if files and "config.json" not in files:
        hint = "; set model.ggufFile to one of its .gguf files" if any(f.endswith(".gguf") for f in files) else ""
        raise SourceError(f"model {repo_id}: the hub repo has no config.json{hint}")
    legacy = [] if any(f.endswith(".safetensors") for f in files) else LEGACY_WEIGHTS
    return info.sha, MODEL_PATTERNS + legacy


def _snapshot_files(snapshot: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of a downloaded snapshot (its files are links into blobs/)."""
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        sha = hashlib.sha256()
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(8 << 20), b""):
                sha.update(chunk)
        out[str(f.relative_to(snapshot))] = {"size": f.stat().st_size, "sha256": sha.hexdigest()}
    return out


def _reusable(final: Path, endpoint: str, commit: str | None) -> bool:
    """The marker records `commit` (None: any commit, the hub being unreachable) from `endpoint`, files all there."""
    from .sources import _read_marker

    marker = _read_marker(final)
    if marker is None or marker.get("hubFormat") != HUB_MARKER_FORMAT:
        return False
    if marker.get("endpoint") != endpoint or (commit is not None and marker.get("commit") != commit):
        return False
    snapshot = final / str(marker.get("snapshot") or "")
    return all((snapshot / rel).is_file() and (snapshot / rel).stat().st_size == o.get("size")
               for rel, o in marker["objects"].items())


def fetch_hub_model(uri: str, root: str | Path) -> Any:
    """Fetch `hf://REPO[@REVISION][#GGUF_FILE]` into `hub_cache_dir(uri, root)` once (module docstring).

    Returns a `sources.Fetched` (typed Any: sources imports this module)."""
    from huggingface_hub import constants, snapshot_download

    from .sources import MARKER_FILE, PARTIAL_PREFIX, Fetched, SourceUnavailable, publish

    repo_id, revision, gguf_file = parse_hub_uri(uri)
    endpoint = constants.ENDPOINT
    root = Path(root)
    hub_dir = hub_cache_dir(uri, root)
    final = Path(hub_dir).parent
    commit: str | None
    try:
        commit, patterns = _resolve(repo_id, revision, endpoint, gguf_file)
    except SourceUnavailable as err:
        if not _reusable(final, endpoint, None):
            raise
        log.warning("%s: using the cached copy (%s)", err, hub_dir)  # as hub.py does for a worker's hub cache
        commit, patterns = None, []
    if _reusable(final, endpoint, commit):
        marker = json.loads((final / MARKER_FILE).read_text())
        log.info("source %s: commit %s cached at %s, not downloaded again", uri, marker["commit"], hub_dir)
        return Fetched(uri, hub_dir, len(marker["objects"]), int(marker["bytes"]), downloaded=False)
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f"{PARTIAL_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        try:
            # revision: the user's (a branch writes its ref, which the offline workers read); the files
            # themselves are fetched at `commit`, pinned below by comparing what snapshot_download resolved.
            snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=partial / HUB_CACHE_DIR,
                                              allow_patterns=patterns, endpoint=endpoint))
        except Exception as err:
            from .hub import _first_line

            raise SourceUnavailable(f"model {repo_id}: download from the hub ({endpoint}) failed: "
                                    f"{_first_line(err)}") from None
        if snapshot.name != commit:
            raise SourceUnavailable(f"model {repo_id}: revision {revision or 'main'} moved from {commit} to "
                                    f"{snapshot.name} during the download; fetch again")
        objects = _snapshot_files(snapshot)
        total = sum(o["size"] for o in objects.values())
        publish(partial, final, {
            "hubFormat": HUB_MARKER_FORMAT, "uri": uri, "endpoint": endpoint, "repo": repo_id, "revision": revision,
            "commit": commit, "snapshot": str(snapshot.relative_to(partial)), "objects": objects, "bytes": total,
        })
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("source %s: commit %s fetched into %s (%d files, %d bytes, verified)", uri, commit, hub_dir,
             len(objects), total)
    return Fetched(uri, hub_dir, len(objects), total, downloaded=True)
