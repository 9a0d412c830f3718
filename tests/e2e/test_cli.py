"""`kubelora submit -> watch -> fetch` on the real control plane: a trainer config with a `cluster:`
section becomes a LoRAFineTune, the real operator runs it (one worker, the node agent, a tiny model),
the adapter lands in SeaweedFS, and `fetch` downloads it with its sha256 checked against the status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubelora_trainer.artifacts import sha256_file

from tests.operator.cluster_helpers import POOL_LABEL

from .conftest import E2E, add_hostpath_claim

pytestmark = [pytest.mark.cluster, pytest.mark.s3]

NAME = "cli-run"


def kubelora(e: E2E, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **e.cp.env(), "NO_PROXY": "*", "no_proxy": "*"}
    return subprocess.run([sys.executable, "-m", "kubelora_operator.cli", "-n", e.ns, *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def config(e: E2E, bucket: str, endpoint: str) -> dict[str, Any]:
    return {
        "model": {"nameOrPath": "/models/tiny", "dtype": "fp32"},
        "data": {"path": "sample://train.jsonl", "evalPath": "sample://heldout.jsonl", "maxSamples": 64,
                 "maxEvalSamples": 8, "cutoffLen": 128},
        "training": {"maxSteps": 4, "microBatchSize": 2, "learningRate": 5e-3},
        "evaluation": {"maxExactMatchSamples": 2, "maxNewTokens": 4, "samplePrompts": 1},
        "output": {"dir": "runs/cli", "s3": {"uri": f"s3://{bucket}/adapters/{NAME}", "endpoint": endpoint}},
        "device": "cpu",
        "cluster": {
            "name": NAME,
            "resources": {"cpu": "1", "memory": "2Gi"},
            "dataVolume": {"pvc": {"claimName": "e2e-models", "mountPath": "/models"}},
            "placement": {"nodeSelector": {POOL_LABEL: e.pool}},
            "output": {"s3": {"credentialsSecret": {"name": "cli-s3"}}},
        },
    }


@pytest.mark.timeout(180)
def test_submit_watch_fetch(e2e: E2E, s3_server: Any, s3_bucket: str, tiny_model_dir: Path, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    add_hostpath_claim(e2e, "e2e-models", tiny_model_dir.parent, read_only=True)
    e2e.cp.create(f"/api/v1/namespaces/{e2e.ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "cli-s3"},
        "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}})
    cfg_file = tmp_path / "cli.yaml"
    cfg_file.write_text(yaml.safe_dump(config(e2e, s3_bucket, s3_server.endpoint)))

    dry = kubelora(e2e, "submit", str(cfg_file), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert yaml.safe_load(dry.stdout)["spec"]["training"]["maxSteps"] == 4
    with pytest.raises(Exception):  # noqa: B017 - a dry run creates nothing
        e2e.lft(NAME)

    sub = kubelora(e2e, "submit", str(cfg_file))
    assert sub.returncode == 0 and f"{e2e.ns}/{NAME} created" in sub.stdout, sub.stderr
    watch = kubelora(e2e, "watch", NAME, "--timeout", "150", timeout=170)
    assert watch.returncode == 0, f"{watch.stdout}\n{watch.stderr}\n{e2e.diagnostics(NAME)}"
    assert watch.stdout.strip().splitlines()[-1].startswith(f"{NAME}: Succeeded"), watch.stdout
    status = kubelora(e2e, "status", NAME)
    assert "Succeeded=True" in status.stdout and "sha256" in status.stdout, status.stdout

    for key, value in s3_server.env().items():  # the user's own credentials
        monkeypatch.setenv(key, value)
    fetched = kubelora(e2e, "fetch", NAME, str(tmp_path / "out"))
    assert fetched.returncode == 0, fetched.stderr
    weights = tmp_path / "out" / "adapter" / "adapter_model.safetensors"
    assert sha256_file(weights) == e2e.lft(NAME)["status"]["artifact"]["sha256"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 4

    again = kubelora(e2e, "fetch", NAME, str(tmp_path / "out"))  # never over a non-empty dir
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "not empty" in again.stderr

    deleted = kubelora(e2e, "delete", NAME)
    assert deleted.returncode == 0, deleted.stderr
    missing = kubelora(e2e, "status", "no-such-run")
    assert missing.returncode == 2 and missing.stderr.startswith("kubelora: reading") and "404" in missing.stderr


def test_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data: {path: sample://train.jsonl}\ndevice: cuda\n")
    got = subprocess.run([sys.executable, "-m", "kubelora_operator.cli", "submit", str(cfg), "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == 2 and got.stderr.count("\n") == 1 and "device: cuda" in got.stderr
