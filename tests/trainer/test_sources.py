"""Model and data sources (kubelora_trainer/sources.py) against the real S3 server (SeaweedFS).

What must hold: an s3:// prefix or object is fetched once into `<cache>/<key>/<basename>`, each file
verified (size, single-part ETag MD5) with its sha256 in the marker; a second fetch lists the source
and downloads nothing; a cache directory without its marker (half-written) or with a marker of
other content is fetched again; a missing or unreadable source fails with one line naming it (exit
2 from the CLI); a local directory shaped like a hub cache is checked, not copied; and a whole
training run reads its model and data from S3.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubelora_trainer.cli import main
from kubelora_trainer.config import S3Source
from kubelora_trainer.sources import (
    MARKER_FILE,
    SourceError,
    cached_path,
    check_local,
    fetch_all,
    fetch_source,
)

from tests import s3server
from tests.s3server import S3Server

from .conftest import SAMPLE, tiny_config

pytestmark = [pytest.mark.s3, pytest.mark.timeout(180)]

s3_server = s3server.s3_server
s3_bucket = s3server.s3_bucket

MODEL_FILES = {"config.json": b'{"model_type": "llama"}', "weights/model.safetensors": os.urandom(300_000),
               "tokenizer.json": b"{}" * 1000}


class CountingClient:
    """The real boto3 client, counting downloads (what "no second download" is measured by)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.gets = inner, 0

    def get_object(self, **kw: Any) -> Any:
        self.gets += 1
        return self.inner.get_object(**kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def upload(server: S3Server, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    client = server.client()
    for rel, body in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=body)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def src(s3_env: S3Server, s3_bucket: str) -> tuple[S3Server, str, S3Source]:
    upload(s3_env, s3_bucket, "models/tiny", MODEL_FILES)
    upload(s3_env, s3_bucket, "data", {"train.jsonl": (SAMPLE / "train.jsonl").read_bytes()})
    return s3_env, s3_bucket, S3Source(endpoint=s3_env.endpoint)


def test_prefix_fetched_verified_then_reused_without_download(src: tuple[S3Server, str, S3Source], tmp_path: Path):
    server, bucket, s3 = src
    uri = f"s3://{bucket}/models/tiny"
    client = CountingClient(server.client())
    first = fetch_source(uri, tmp_path, s3, client=client)
    assert first.downloaded and first.files == 3 and client.gets == 3
    assert first.path == cached_path(uri, tmp_path, server.endpoint)  # the operator's prediction
    for rel, body in MODEL_FILES.items():
        assert (Path(first.path) / rel).read_bytes() == body
    marker = json.loads((Path(first.path).parent / MARKER_FILE).read_text())
    assert {k: v["sha256"] for k, v in marker["objects"].items()} == {k: sha(v) for k, v in MODEL_FILES.items()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial-")]

    again = CountingClient(server.client())
    second = fetch_source(uri, tmp_path, s3, client=again)
    assert not second.downloaded and again.gets == 0 and second.path == first.path


def test_single_object_keeps_its_name(src: tuple[S3Server, str, S3Source], tmp_path: Path):
    _, bucket, s3 = src
    got = fetch_source(f"s3://{bucket}/data/train.jsonl", tmp_path, s3)
    assert got.path.endswith("/train.jsonl") and got.files == 1  # data.format: auto still sees .jsonl
    assert Path(got.path).read_bytes() == (SAMPLE / "train.jsonl").read_bytes()


def test_half_written_or_stale_cache_is_fetched_again(src: tuple[S3Server, str, S3Source], tmp_path: Path):
    server, bucket, s3 = src
    uri = f"s3://{bucket}/models/tiny"
    half = Path(cached_path(uri, tmp_path, server.endpoint))
    (half / "weights").mkdir(parents=True)
    (half / "config.json").write_bytes(MODEL_FILES["config.json"])  # no marker: an interrupted copy
    client = CountingClient(server.client())
    got = fetch_source(uri, tmp_path, s3, client=client)
    assert got.downloaded and client.gets == 3
    assert (half / "weights" / "model.safetensors").read_bytes() == MODEL_FILES["weights/model.safetensors"]

    # the source changed after it was cached: the listing no longer matches the marker
    upload(server, bucket, "models/tiny", {"config.json": b'{"model_type": "llama", "v": 2}'})
    got = fetch_source(uri, tmp_path, s3)
    assert got.downloaded and (half / "config.json").read_bytes().endswith(b"2}")


def test_missing_source_bucket_and_credentials_fail_with_one_line(
    src: tuple[S3Server, str, S3Source], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    server, bucket, s3 = src
    with pytest.raises(SourceError, match=rf"source s3://{bucket}/models/nope: no such object or prefix"):
        fetch_source(f"s3://{bucket}/models/nope", tmp_path, s3)
    with pytest.raises(SourceError, match="bucket 'no-such-bucket' does not exist"):
        fetch_source("s3://no-such-bucket/m", tmp_path, s3)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(SourceError, match="rejected the credentials") as err:
        fetch_source(f"s3://{bucket}/models/tiny", tmp_path, s3)
    assert server.secret_key not in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing half-fetched is left


def test_local_dir_like_a_hub_cache_is_checked_not_copied(tmp_path: Path):
    snap = tmp_path / "hub" / "models--org--m" / "snapshots" / "abc"
    blobs = tmp_path / "hub" / "models--org--m" / "blobs"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (blobs / "1").write_text("{}")
    (snap / "config.json").symlink_to(blobs / "1")
    got = check_local(str(snap))
    assert got.files == 1 and got.bytes == 2 and not got.downloaded and got.path == str(snap)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="empty"):
        check_local(str(tmp_path / "empty"))
    with pytest.raises(SourceError, match="no such file"):
        fetch_all([str(tmp_path / "gone")], tmp_path / "cache")
    (blobs / "1").unlink()  # a dangling link in a half-deleted cache
    with pytest.raises(SourceError, match="empty"):
        check_local(str(snap))


def _fetch_cli(server: S3Server, tmp_path: Path, *sources: str) -> tuple[int, str]:
    log = tmp_path / "termination-log"
    env = {**os.environ, **server.env(), "KUBELORA_TERMINATION_LOG": str(log)}
    proc = subprocess.run(
        [sys.executable, "-m", "kubelora_trainer.cli", "fetch", "--cache", str(tmp_path / "cache"),
         "--endpoint", server.endpoint, *sources],
        env=env, capture_output=True, text=True, timeout=120,
    )
    return proc.returncode, log.read_text()


def test_fetch_command_reports_in_the_termination_message(src: tuple[S3Server, str, S3Source], tmp_path: Path):
    server, bucket, _ = src
    code, message = _fetch_cli(server, tmp_path, f"s3://{bucket}/models/tiny", f"s3://{bucket}/data/train.jsonl")
    assert code == 0, message
    sources = json.loads(message)["sources"]
    assert [s["files"] for s in sources] == [3, 1] and all(s["downloaded"] for s in sources)
    code, message = _fetch_cli(server, tmp_path, f"s3://{bucket}/data/train.jsonl", f"s3://{bucket}/missing.jsonl")
    assert code == 2
    assert message == f"source s3://{bucket}/missing.jsonl: no such object or prefix in bucket {bucket!r}"


def test_training_run_reads_model_and_data_from_s3(
    src: tuple[S3Server, str, S3Source], tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    server, bucket, s3 = src
    upload(server, bucket, "models/tiny-llama",
           {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()})
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", training={"maxSteps": 1}, evaluation={"before": False})
    cfg["model"]["nameOrPath"] = f"s3://{bucket}/models/tiny-llama"
    cfg["data"]["path"] = f"s3://{bucket}/data/train.jsonl"
    cfg["sources"] = {"s3": {"endpoint": server.endpoint}, "cacheDir": str(tmp_path / "cache")}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    monkeypatch.delenv("KUBELORA_CACHE", raising=False)
    assert main(["run", str(path)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 1
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
