"""Artifact delivery to S3 against a real SeaweedFS server (tests/s3server.py): no mocks.

What is checked: a finished run dir arrives complete with the manifest written last; a crash
mid-upload leaves no manifest and a re-upload completes idempotently; another run's finished
artifact is never overwritten; bad credentials and missing buckets fail with one clear line that
never contains the secret; blips are retried by botocore (standard mode), outages by re-running
the step (artifacts.py says why both).

Over 400 lines on purpose: every test here needs the same running S3 server and run-dir builders,
and together they are the delivery protocol's specification, read in one place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kubelora_trainer.artifacts import (
    MANIFEST_FILE,
    ArtifactError,
    ArtifactInfo,
    check_target,
    run_identity,
    upload_run,
)
from kubelora_trainer.config import S3Target
from kubelora_trainer.s3_client import is_transient

from tests import s3server
from tests.s3server import S3Server

pytestmark = [pytest.mark.s3, pytest.mark.timeout(180)]

# fixtures from the reusable module (bound here so pytest finds them in this module)
s3_server = s3server.s3_server
fresh_s3_server = s3server.fresh_s3_server
s3_bucket = s3server.s3_bucket

MiB = 1024 * 1024
PNG_1x1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


# --------------------------------------------------------------------------- helpers


def make_run_dir(root: Path, *, seed: int = 0, merged_mib: float = 0, run_id: str | None = None) -> Path:
    """A finished run dir with the trainer's layout: real safetensors, json, csv, png, markdown."""
    import torch
    from safetensors.torch import save_file

    run = root
    adapter = run / "adapter"
    adapter.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight": torch.randn(
            (4, 64) if ab == "A" else (64, 4), generator=g
        )
        for i in range(2)
        for m in ("q_proj", "v_proj")
        for ab in ("A", "B")
    }
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    )
    (adapter / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (adapter / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    (adapter / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    if merged_mib:
        merged = run / "merged"
        merged.mkdir()
        n = int(merged_mib * MiB / 4)
        save_file({"w": torch.randn(n, generator=g)}, str(merged / "model.safetensors"))
        (merged / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (run / "config.yaml").write_text(f"model:\n  nameOrPath: tiny\ntraining:\n  seed: {seed}\n")
    rows = [{"step": s, "kind": "train", "loss": 2.0 / (s + 1)} for s in range(5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "metrics.csv").write_text("step,kind,loss\n" + "".join(f"{r['step']},train,{r['loss']}\n" for r in rows))
    (run / "loss.png").write_bytes(PNG_1x1)
    (run / "samples.md").write_text("# Sample generations\n\nFine-tuned: `4`\n")
    weights = adapter / "adapter_model.safetensors"
    summary: dict[str, Any] = {
        "eval_loss_after": 1.0,
        "adapter": {
            "path": str(adapter),
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "size_bytes": weights.stat().st_size,
        },
    }
    if run_id is not None:
        summary["run_id"] = run_id
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def objects(client: Any, bucket: str, prefix: str = "") -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = obj
    return out


def read_manifest(client: Any, bucket: str, prefix: str) -> dict[str, Any]:
    return json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST_FILE}")["Body"].read())


def has_manifest(client: Any, bucket: str, prefix: str) -> bool:
    return f"{prefix}/{MANIFEST_FILE}" in objects(client, bucket, prefix)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Point boto3's credential chain at a given server's keys only (no ~/.aws, no instance metadata)."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)

    def use(server: S3Server, identity: s3server.Identity | None = None, **override: str) -> None:
        for k, v in {**server.env(identity), **override}.items():
            monkeypatch.setenv(k, v)

    return use


def target(server: S3Server, bucket: str, prefix: str) -> S3Target:
    return S3Target(uri=f"s3://{bucket}/{prefix}", endpoint=server.endpoint)


# --------------------------------------------------------------------------- complete upload


def test_upload_complete_run_with_manifest_last(s3_server: S3Server, s3_bucket: str, aws_env, tmp_path: Path):
    aws_env(s3_server)
    run = make_run_dir(tmp_path / "run", merged_mib=6)
    client = s3_server.client()
    order: list[tuple[str, bool]] = []

    def on_file(rel: str, uploaded: bool) -> None:
        # the completion marker must not exist while any object is still to come
        assert not has_manifest(client, s3_bucket, "jobs/run-1"), f"manifest visible before {rel}"
        order.append((rel, uploaded))

    t0 = time.monotonic()
    info = upload_run(
        run,
        target(s3_server, s3_bucket, "jobs/run-1/"),
        include_merged=True,
        multipart_threshold=5 * MiB,
        multipart_chunksize=5 * MiB,
        on_file=on_file,
    )
    wall = time.monotonic() - t0

    weights = run / "adapter" / "adapter_model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert info == ArtifactInfo(
        f"s3://{s3_bucket}/jobs/run-1", sha, weights.stat().st_size, f"s3://{s3_bucket}/jobs/run-1/manifest.json"
    )
    assert info.to_dict() == {
        "uri": info.uri,
        "sha256": sha,
        "sizeBytes": weights.stat().st_size,
        "manifestUri": info.manifest_uri,
    }

    local = {p.relative_to(run).as_posix(): p for p in run.rglob("*") if p.is_file()}
    remote = objects(client, s3_bucket, "jobs/run-1/")
    assert set(remote) == {f"jobs/run-1/{rel}" for rel in local} | {"jobs/run-1/manifest.json"}
    assert [rel for rel, _ in order] == [r for r in order_expected(local)]
    assert all(uploaded for _, uploaded in order)

    manifest = read_manifest(client, s3_bucket, "jobs/run-1")
    assert manifest["format"] == "kubelora-artifact/v1"
    assert manifest["adapter"] == {
        "path": "adapter/adapter_model.safetensors",
        "sha256": sha,
        "size_bytes": weights.stat().st_size,
    }
    assert manifest["merged"] is True
    assert manifest["run_id"] == run_identity(run)
    assert manifest["created"].endswith("Z") and manifest["kubelora_version"]
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == set(local)
    for rel, path in local.items():
        data = path.read_bytes()
        assert listed[rel]["size_bytes"] == len(data) == remote[f"jobs/run-1/{rel}"]["Size"]
        assert listed[rel]["sha256"] == hashlib.sha256(data).hexdigest()
    # the adapter round-trips byte for byte and loads as safetensors
    body = client.get_object(Bucket=s3_bucket, Key="jobs/run-1/adapter/adapter_model.safetensors")["Body"].read()
    assert body == weights.read_bytes()
    from safetensors.torch import load

    assert len(load(body)) == 8
    # the 6 MiB merged weights went up as a multipart upload (S3 multipart ETags end in -<parts>)
    assert "-" in remote["jobs/run-1/merged/model.safetensors"]["ETag"]
    # manifest last, as the listing shows it too
    last = remote.pop("jobs/run-1/manifest.json")["LastModified"]
    assert all(last >= obj["LastModified"] for obj in remote.values())
    print(
        f"\nupload of {sum(p.stat().st_size for p in local.values()) / MiB:.1f} MiB ({len(local)} files): {wall:.2f}s"
    )


def order_expected(local: dict[str, Path]) -> list[str]:
    adapter = sorted(r for r in local if r.startswith("adapter/"))
    merged = sorted(r for r in local if r.startswith("merged/"))
    extras = [r for r in ("config.yaml", "metrics.jsonl", "metrics.csv", "loss.png", "samples.md") if r in local]
    return adapter + merged + extras + ["summary.json"]


def test_upload_without_merged_and_bucket_root(s3_server: S3Server, s3_bucket: str, aws_env, tmp_path: Path):
    aws_env(s3_server)
    run = make_run_dir(tmp_path / "run", merged_mib=0.1)
    info = upload_run(run, S3Target(uri=f"s3://{s3_bucket}", endpoint=s3_server.endpoint), include_merged=False)
    keys = set(objects(s3_server.client(), s3_bucket))
    assert "manifest.json" in keys and "adapter/adapter_model.safetensors" in keys
    assert not any(k.startswith("merged/") for k in keys)
    assert info.uri == f"s3://{s3_bucket}" and info.manifest_uri == f"s3://{s3_bucket}/manifest.json"


def test_unfinished_or_incomplete_run_dir_is_refused(s3_server: S3Server, s3_bucket: str, aws_env, tmp_path: Path):
    aws_env(s3_server)
    run = make_run_dir(tmp_path / "run")
    with pytest.raises(ArtifactError, match="has no merged/"):
        upload_run(run, target(s3_server, s3_bucket, "x"), include_merged=True)
    (run / "summary.json").unlink()
    with pytest.raises(ArtifactError, match="not finished"):
        upload_run(run, target(s3_server, s3_bucket, "x"), include_merged=False)
    assert objects(s3_server.client(), s3_bucket) == {}


# --------------------------------------------------------------------------- crash and resume


def test_server_crash_mid_upload_leaves_no_manifest_and_reupload_is_idempotent(
    fresh_s3_server: S3Server, aws_env, tmp_path: Path
):
    srv = fresh_s3_server
    aws_env(srv)
    bucket = srv.create_bucket()
    run = make_run_dir(tmp_path / "run", merged_mib=1)
    tgt = target(srv, bucket, "crash/run")
    done: list[str] = []

    def crash_after_first(rel: str, uploaded: bool) -> None:
        done.append(rel)
        if len(done) == 1:
            srv.kill()  # SIGKILL: no graceful shutdown

    with pytest.raises(ArtifactError) as err:
        upload_run(run, tgt, include_merged=True, retries=1, backoff_s=0.05, on_file=crash_after_first)
    msg = str(err.value)
    assert "\n" not in msg and "after 2 attempts" in msg and "crash/run/adapter/" in msg
    assert done == ["adapter/adapter_config.json"]

    restart_s = srv.start()
    client = srv.client()
    assert not has_manifest(client, bucket, "crash/run")

    events: list[tuple[str, bool]] = []
    info = upload_run(run, tgt, include_merged=True, on_file=lambda rel, up: events.append((rel, up)))
    assert has_manifest(client, bucket, "crash/run")
    skipped = [rel for rel, up in events if not up]
    # whatever survived the crash with matching size and sha256 is not sent again
    assert skipped in ([], ["adapter/adapter_config.json"])
    manifest = read_manifest(client, bucket, "crash/run")
    assert manifest["adapter"]["sha256"] == info.sha256

    # a third upload of the same run: nothing sent, manifest left as it was
    before = client.head_object(Bucket=bucket, Key="crash/run/manifest.json")
    again: list[tuple[str, bool]] = []
    info2 = upload_run(run, tgt, include_merged=True, on_file=lambda rel, up: again.append((rel, up)))
    after = client.head_object(Bucket=bucket, Key="crash/run/manifest.json")
    assert info2 == info
    assert again and not any(up for _, up in again)
    assert after["ETag"] == before["ETag"] and read_manifest(client, bucket, "crash/run") == manifest
    print(f"\nrestart after SIGKILL: {restart_s:.2f}s; first-file survived crash: {skipped != []}")


def test_failing_file_means_no_manifest(s3_server: S3Server, s3_bucket: str, aws_env, tmp_path: Path):
    aws_env(s3_server)
    run = make_run_dir(tmp_path / "run")

    def fail_on_weights(rel: str, uploaded: bool) -> None:
        if rel == "adapter/special_tokens_map.json":
            raise OSError("injected failure")

    with pytest.raises(OSError, match="injected"):
        upload_run(run, target(s3_server, s3_bucket, "fail"), include_merged=False, on_file=fail_on_weights)
    keys = set(objects(s3_server.client(), s3_bucket, "fail/"))
    assert "fail/adapter/special_tokens_map.json" in keys and "fail/manifest.json" not in keys
    # the same run completes later
    upload_run(run, target(s3_server, s3_bucket, "fail"), include_merged=False)
    assert "fail/manifest.json" in objects(s3_server.client(), s3_bucket, "fail/")


def test_transient_outage_is_retried(
    fresh_s3_server: S3Server, aws_env, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    srv = fresh_s3_server
    aws_env(srv)
    bucket = srv.create_bucket()
    run = make_run_dir(tmp_path / "run")
    restarted = threading.Event()
    timings: dict[str, float] = {}

    def outage_after_first(rel: str, uploaded: bool) -> None:
        if rel == "adapter/adapter_config.json":
            srv.kill()
            timings["down"] = time.monotonic()

            def back() -> None:
                timings["restart_s"] = srv.start()
                timings["up"] = time.monotonic()
                restarted.set()

            threading.Timer(1.0, back).start()

    caplog.set_level(logging.WARNING, logger="kubelora_trainer.artifacts")
    info = upload_run(
        run, target(srv, bucket, "retry"), include_merged=False, retries=6, backoff_s=0.25, on_file=outage_after_first
    )
    assert restarted.wait(30)
    done = time.monotonic()
    assert info.manifest_uri.endswith("retry/manifest.json")
    assert has_manifest(srv.client(), bucket, "retry")
    retries = [r.getMessage() for r in caplog.records if "transient error" in r.getMessage()]
    assert retries, "expected logged retries"
    assert all(srv.secret_key not in m for m in caplog.messages)
    print(
        f"\noutage {timings['up'] - timings['down']:.2f}s (restart {timings['restart_s']:.2f}s), "
        f"{len(retries)} retries, upload finished {done - timings['down']:.2f}s after the crash"
    )


# --------------------------------------------------------------------------- refusal and identity


def test_refuses_to_overwrite_another_runs_artifact(s3_server: S3Server, s3_bucket: str, aws_env, tmp_path: Path):
    aws_env(s3_server)
    tgt = target(s3_server, s3_bucket, "shared/prefix")
    run_a = make_run_dir(tmp_path / "a", seed=1)
    run_b = make_run_dir(tmp_path / "b", seed=2)
    info_a = upload_run(run_a, tgt, include_merged=False)
    client = s3_server.client()
    manifest_a = read_manifest(client, s3_bucket, "shared/prefix")
    weights_a = client.get_object(Bucket=s3_bucket, Key="shared/prefix/adapter/adapter_model.safetensors")["Body"]

    with pytest.raises(ArtifactError, match="already holds a finished artifact") as err:
        upload_run(run_b, tgt, include_merged=False)
    assert "\n" not in str(err.value) and run_identity(run_a) in str(err.value)
    # nothing of run A was touched: B is refused before it uploads anything
    assert read_manifest(client, s3_bucket, "shared/prefix") == manifest_a
    assert weights_a.read() == (run_a / "adapter" / "adapter_model.safetensors").read_bytes()
    assert info_a.sha256 == manifest_a["adapter"]["sha256"]
    # the preflight refuses too when told the run id
    with pytest.raises(ArtifactError, match="already holds a finished artifact"):
        check_target(tgt, run_id=run_identity(run_b))
    check_target(tgt, run_id=run_identity(run_a))  # the same run may come back


def test_racing_runs_only_one_manifest_wins(s3_server: S3Server, s3_bucket: str, aws_env, tmp_path: Path):
    """Run A has passed the manifest check and sent its files when run B completes at the same prefix:
    A's conditional manifest write fails and A is refused; B's manifest and objects stand."""
    aws_env(s3_server)
    tgt = target(s3_server, s3_bucket, "race")
    run_a = make_run_dir(tmp_path / "a", seed=1)
    run_b = make_run_dir(tmp_path / "b", seed=2)
    n_files = sum(1 for p in run_a.rglob("*") if p.is_file())
    sent: list[str] = []

    def b_finishes_first(rel: str, uploaded: bool) -> None:
        sent.append(rel)
        if len(sent) == n_files:
            upload_run(run_b, tgt, include_merged=False)

    with pytest.raises(ArtifactError, match="already holds a finished artifact"):
        upload_run(run_a, tgt, include_merged=False, on_file=b_finishes_first)
    client = s3_server.client()
    manifest = read_manifest(client, s3_bucket, "race")
    assert manifest["run_id"] == run_identity(run_b)
    for f in manifest["files"]:
        body = client.get_object(Bucket=s3_bucket, Key=f"race/{f['path']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == f["sha256"]


def test_run_id_from_summary_allows_same_run_to_update(s3_server: S3Server, s3_bucket: str, aws_env, tmp_path: Path):
    aws_env(s3_server)
    tgt = target(s3_server, s3_bucket, "by-id")
    run = make_run_dir(tmp_path / "run", run_id="ns/job-uid-123")
    assert run_identity(run) == "ns/job-uid-123"
    upload_run(run, tgt, include_merged=False)
    # the same run (same id) re-uploads after e.g. re-plotting: allowed, manifest updated
    (run / "samples.md").write_text("# Sample generations\n\nupdated\n")
    client = s3_server.client()
    seen: list[bool] = []
    # the old manifest no longer describes the objects: it is withdrawn before any object changes
    upload_run(
        run, tgt, include_merged=False, on_file=lambda rel, up: seen.append(has_manifest(client, s3_bucket, "by-id"))
    )
    assert seen and not any(seen)
    manifest = read_manifest(s3_server.client(), s3_bucket, "by-id")
    assert manifest["run_id"] == "ns/job-uid-123"
    sizes = {f["path"]: f["size_bytes"] for f in manifest["files"]}
    assert sizes["samples.md"] == (run / "samples.md").stat().st_size
    # another run with another id is refused even if its adapter were identical
    other = make_run_dir(tmp_path / "other", run_id="ns/job-uid-456")
    with pytest.raises(ArtifactError, match="ns/job-uid-123"):
        upload_run(other, tgt, include_merged=False)


def test_derived_run_identity(tmp_path: Path):
    a = make_run_dir(tmp_path / "a", seed=1)
    b = make_run_dir(tmp_path / "b", seed=1)
    assert run_identity(a) == run_identity(b)  # same adapter and config: the same artifact
    assert run_identity(a).startswith("sha256:")
    (b / "config.yaml").write_text("other: config\n")
    assert run_identity(a) != run_identity(b)


# --------------------------------------------------------------------------- bad credentials and buckets


def test_wrong_credentials_fail_clearly_without_the_secret(
    s3_server: S3Server, s3_bucket: str, aws_env, tmp_path: Path
):
    run = make_run_dir(tmp_path / "run")
    tgt = target(s3_server, s3_bucket, "creds")
    wrong_secret = "WRONG-secret-" + "x" * 20
    aws_env(s3_server, AWS_SECRET_ACCESS_KEY=wrong_secret)
    for call in (lambda: upload_run(run, tgt, include_merged=False, backoff_s=0.01), lambda: check_target(tgt)):
        t0 = time.monotonic()
        with pytest.raises(ArtifactError) as err:
            call()
        msg = str(err.value)
        assert "rejected the credentials" in msg and "AWS_SECRET_ACCESS_KEY" in msg
        assert wrong_secret not in msg and s3_server.secret_key not in msg and "\n" not in msg
        assert time.monotonic() - t0 < 5, "auth errors are not retried"
    aws_env(s3_server, AWS_ACCESS_KEY_ID="NOSUCHKEY")
    with pytest.raises(ArtifactError, match=r"InvalidAccessKeyId"):
        check_target(tgt)
    assert objects(s3_server.client(), s3_bucket) == {}


def test_no_credentials_at_all(s3_server: S3Server, s3_bucket: str, aws_env, monkeypatch: pytest.MonkeyPatch):
    aws_env(s3_server)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ArtifactError, match="no S3 credentials: set AWS_ACCESS_KEY_ID"):
        check_target(target(s3_server, s3_bucket, "x"))


def test_check_target(s3_server: S3Server, s3_bucket: str, aws_env):
    aws_env(s3_server)
    t0 = time.monotonic()
    check_target(target(s3_server, s3_bucket, "pre/flight"))
    wall = time.monotonic() - t0
    assert objects(s3_server.client(), s3_bucket) == {}, "the probe object is deleted"
    with pytest.raises(ArtifactError, match=r"bucket 'no-such-bucket-kl' does not exist") as err:
        check_target(target(s3_server, "no-such-bucket-kl", "x"))
    assert "\n" not in str(err.value)
    with pytest.raises(ArtifactError, match="does not exist"):
        upload_run_quick(s3_server, "no-such-bucket-kl")
    # a read-only identity: the bucket exists but refuses writes
    aws_env(s3_server, s3_server.reader)
    with pytest.raises(ArtifactError, match=r"writing a probe object .* access denied"):
        check_target(target(s3_server, s3_bucket, "pre/flight"))
    print(f"\ncheck_target: {wall * 1000:.0f} ms")


def upload_run_quick(server: S3Server, bucket: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        upload_run(make_run_dir(Path(d) / "run"), target(server, bucket, "x"), include_merged=False, backoff_s=0.01)


def test_transient_classification():
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
        )

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(ReadTimeoutError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(client_error("InternalError", 500))
    assert is_transient(client_error("ServiceUnavailable", 503))
    assert is_transient(client_error("SlowDown", 503))
    assert is_transient(client_error("TooManyRequests", 429))
    assert is_transient(client_error("Throttling", 400))
    assert not is_transient(client_error("AccessDenied", 403))
    assert not is_transient(client_error("InvalidAccessKeyId", 403))
    assert not is_transient(client_error("NoSuchBucket", 404))
    assert not is_transient(OSError("disk"))
    # boto3's upload_file re-raises ClientError as S3UploadFailedError: the cause decides
    from boto3.exceptions import S3UploadFailedError

    for cause, expected in ((client_error("SlowDown", 503), True), (client_error("AccessDenied", 403), False)):
        try:
            try:
                raise cause
            except ClientError as e:
                raise S3UploadFailedError(f"Failed to upload: {e}")  # noqa: B904 - as boto3 does
        except S3UploadFailedError as wrapped:
            assert is_transient(wrapped) is expected


# --------------------------------------------------------------------------- retries: botocore's, then the step's


def test_clients_use_botocores_retry_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubelora_trainer.s3_client import REQUEST_ATTEMPTS, make_client

    tgt = S3Target(uri="s3://b/p", endpoint="http://127.0.0.1:1")
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    assert make_client(tgt).meta.config.retries == {"mode": "standard", "total_max_attempts": REQUEST_ATTEMPTS}
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    assert make_client(tgt).meta.config.retries["mode"] == "adaptive"
    monkeypatch.setenv("AWS_RETRY_MODE", "legacy")  # retries fewer errors, no jitter: not taken
    assert make_client(tgt).meta.config.retries["mode"] == "standard"


def test_botocore_retries_each_request_then_the_step_is_run_again(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead endpoint: botocore makes REQUEST_ATTEMPTS attempts of the request (each retry logged),
    then the step is re-run `retries` times, and one ArtifactUnavailable line names the count."""
    from kubelora_trainer.artifacts import ArtifactUnavailable, _with_retries
    from kubelora_trainer.s3_client import REQUEST_ATTEMPTS, make_client

    from tests.s3server import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    client = make_client(S3Target(uri="s3://b/p", endpoint=f"http://127.0.0.1:{free_port()}"))
    calls: list[int] = []

    def step() -> Any:
        calls.append(1)
        return client.head_bucket(Bucket="b")

    caplog.set_level(logging.WARNING, logger="kubelora_trainer")
    with pytest.raises(ArtifactUnavailable, match="probing failed after 2 attempts: EndpointConnectionError"):
        _with_retries(step, what="probing", bucket="b", retries=1, backoff_s=0.01)
    assert len(calls) == 2
    by_botocore = [m for m in caplog.messages if "botocore retries it" in m]
    assert len(by_botocore) == 2 * (REQUEST_ATTEMPTS - 1), caplog.messages
    assert "attempt 1/3" in by_botocore[0] and "HeadBucket" in by_botocore[0]
    assert sum("step retry 1/1" in m for m in caplog.messages) == 1


def test_throttling_responses_are_retried_by_botocore(
    s3_server: S3Server, s3_bucket: str, aws_env, caplog: pytest.LogCaptureFixture
) -> None:
    """A 503 SlowDown answer (what S3 sends when throttling) is retried by botocore and logged; the
    request then goes through to the real server. The first answer is injected in botocore's own
    `before-send` hook, which takes a returned response instead of sending."""
    from botocore.awsrequest import AWSResponse
    from kubelora_trainer.s3_client import make_client

    class Raw:
        def stream(self, **_: Any) -> Any:
            yield b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"

    aws_env(s3_server)
    client = make_client(target(s3_server, s3_bucket, "throttle"))
    answers = [503]

    def throttle(request: Any, **_: Any) -> AWSResponse | None:
        return AWSResponse(request.url, answers.pop(), {}, Raw()) if answers else None

    client.meta.events.register("before-send.s3.PutObject", throttle)
    caplog.set_level(logging.WARNING, logger="kubelora_trainer.s3_client")
    resp = client.put_object(Bucket=s3_bucket, Key="throttle/x", Body=b"x")
    assert resp["ResponseMetadata"]["RetryAttempts"] == 1
    assert s3_server.client().get_object(Bucket=s3_bucket, Key="throttle/x")["Body"].read() == b"x"
    assert any("(SlowDown (HTTP 503)), attempt 1/3; botocore retries it" in m for m in caplog.messages), caplog.messages
