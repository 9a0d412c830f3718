"""A run with `output.s3` delivers to a real SeaweedFS bucket: preflight at start, manifest last,
and a restarted finished run completes its delivery instead of training again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from kubelora_trainer.cli import EXIT_BAD_INPUT, EXIT_RETRYABLE, main

from tests.s3server import S3Server, free_port

from .conftest import tiny_config

pytestmark = pytest.mark.s3


def _cfg(tiny_model_dir: Path, tmp_path: Path, server: S3Server, bucket: str) -> Path:
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", training={"maxSteps": 2},
                      evaluation={"exactMatch": False, "before": False},
                      output={"s3": {"uri": f"s3://{bucket}/runs/one", "endpoint": server.endpoint}})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_delivers_adapter_and_manifest(tiny_model_dir: Path, tmp_path: Path, s3_env: S3Server) -> None:
    bucket = s3_env.create_bucket()
    assert main(["run", str(_cfg(tiny_model_dir, tmp_path, s3_env, bucket))]) == 0
    client = s3_env.client()
    manifest = json.loads(client.get_object(Bucket=bucket, Key="runs/one/manifest.json")["Body"].read())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert manifest["adapter"]["sha256"] == summary["adapter"]["sha256"]
    assert manifest["run_id"] == summary["run_id"]
    body = client.get_object(Bucket=bucket, Key="runs/one/adapter/adapter_model.safetensors")["Body"].read()
    assert body == (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["artifact"]["uri"] == f"s3://{bucket}/runs/one"


def test_finished_but_undelivered_run_only_uploads(tiny_model_dir: Path, tmp_path: Path, s3_env: S3Server) -> None:
    bucket = s3_env.create_bucket()
    cfg_path = _cfg(tiny_model_dir, tmp_path, s3_env, bucket)
    assert main(["run", str(cfg_path)]) == 0
    client = s3_env.client()
    client.delete_object(Bucket=bucket, Key="runs/one/manifest.json")  # as if the pod died mid-upload
    mtime = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    assert main(["run", str(cfg_path)]) == 0
    assert client.get_object(Bucket=bucket, Key="runs/one/manifest.json")["ContentLength"] > 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == mtime  # no retraining


def test_unusable_bucket_fails_before_training(tiny_model_dir: Path, tmp_path: Path, s3_env: S3Server,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(_cfg(tiny_model_dir, tmp_path, s3_env, "no-such-bucket"))])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and "no-such-bucket" in err
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unreachable_store_is_retryable_not_bad_input(tiny_model_dir: Path, tmp_path: Path, s3_env: S3Server,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listens at the endpoint: after the retries the run ends with exit 1 (the operator restarts
    the job), not 2 (bad input: Failed at once), and says the store was unreachable."""
    cfg_path = _cfg(tiny_model_dir, tmp_path, s3_env, "any-bucket")
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["output"]["s3"]["endpoint"] = f"http://127.0.0.1:{free_port()}"
    cfg_path.write_text(yaml.safe_dump(cfg))
    code = main(["run", str(cfg_path)])
    err = capsys.readouterr().err
    assert code == EXIT_RETRYABLE != EXIT_BAD_INPUT, err
    assert "S3 unreachable" in err and "after 3 attempts" in err
    assert "S3 unreachable" in (tmp_path / "termination-log").read_text()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
