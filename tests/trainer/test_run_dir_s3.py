"""Issue 9 item 2 on a real SeaweedFS bucket: a finished but undelivered run dir is only ever
delivered by the run that owns it, never by a re-created resource or a changed spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubelora_trainer.cli import EXIT_BAD_INPUT, main

from tests.s3server import S3Server

from .conftest import tiny_config

pytestmark = pytest.mark.s3


def _cfg_file(tiny_model_dir: Path, tmp_path: Path, server: S3Server, uri: str, r: int, lr: float) -> Path:
    cfg = tiny_config(tiny_model_dir, tmp_path / "output", training={"maxSteps": 2, "learningRate": lr},
                      lora={"r": r}, evaluation={"exactMatch": False, "before": False},
                      output={"s3": {"uri": uri, "endpoint": server.endpoint}})
    path = tmp_path / f"cfg-{r}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _keys(server: S3Server, bucket: str, prefix: str) -> list[str]:
    listing = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]


def _undelivered_finished_run(tiny_model_dir: Path, tmp_path: Path, server: S3Server, bucket: str) -> None:
    """Resource A trained and wrote its summary, but the upload never completed (S3 outage)."""
    assert main(["run", str(_cfg_file(tiny_model_dir, tmp_path, server, f"s3://{bucket}/a", 4, 1e-3))]) == 0
    server.client().delete_object(Bucket=bucket, Key="a/manifest.json")


def test_recreated_resource_does_not_deliver_the_old_run(tiny_model_dir: Path, tmp_path: Path, s3_env: S3Server,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    bucket = s3_env.create_bucket()
    monkeypatch.setenv("KUBELORA_RUN_ID", "uid-a")
    _undelivered_finished_run(tiny_model_dir, tmp_path, s3_env, bucket)
    capsys.readouterr()
    # Deleted and applied again under the same name: new UID, r 8, lr 5e-4, new URI, same run dir.
    monkeypatch.setenv("KUBELORA_RUN_ID", "uid-b")
    code = main(["run", str(_cfg_file(tiny_model_dir, tmp_path, s3_env, f"s3://{bucket}/b", 8, 5e-4))])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err[-2000:]  # cffc930: exit 0, "run already finished ... delivering it"
    assert f"output dir {tmp_path / 'output'} belongs to run uid-a" in err and "(uid-b)" in err
    assert "delivering" not in err
    assert _keys(s3_env, bucket, "b/") == []  # the old adapter went to the new URI under the new UID
    assert "belongs to run uid-a" in (tmp_path / "termination-log").read_text()
    # The owner itself still completes its delivery.
    monkeypatch.setenv("KUBELORA_RUN_ID", "uid-a")
    assert main(["run", str(_cfg_file(tiny_model_dir, tmp_path, s3_env, f"s3://{bucket}/a", 4, 1e-3))]) == 0
    assert "a/manifest.json" in _keys(s3_env, bucket, "a/")


def test_changed_spec_does_not_deliver_the_old_run(tiny_model_dir: Path, tmp_path: Path, s3_env: S3Server,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The same run id (a laptop run's dir) with other settings: refused with the changed fields."""
    bucket = s3_env.create_bucket()
    _undelivered_finished_run(tiny_model_dir, tmp_path, s3_env, bucket)
    capsys.readouterr()
    code = main(["run", str(_cfg_file(tiny_model_dir, tmp_path, s3_env, f"s3://{bucket}/b", 8, 5e-4))])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err[-2000:]
    assert "lora.r: 4 -> 8" in err and "training.learningRate: 0.001 -> 0.0005" in err
    assert f"output.s3: 's3://{bucket}/a' -> 's3://{bucket}/b'" in err and "output.overwrite" in err
    assert _keys(s3_env, bucket, "b/") == []
