"""The built images run as their Dockerfiles promise: non-root, read-only root, features importable.

Needs a Docker engine and images from `bash scripts/build-images.sh`; skipped otherwise, unless
KUBELORA_REQUIRE_IMAGES=1 (then a missing engine or image is a failure).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from .deploy_helpers import CHART

TAG = str(yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])
REQUIRED = os.environ.get("KUBELORA_REQUIRE_IMAGES") == "1"
DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else shutil.which("docker")


def _image(name: str) -> str:
    ref = f"kubelora/{name}:{TAG}"
    up = DOCKER is not None and subprocess.run([DOCKER, "info"], capture_output=True).returncode == 0
    if up and subprocess.run([DOCKER, "image", "inspect", ref], capture_output=True).returncode == 0:
        return ref
    if REQUIRED:
        pytest.fail(f"{ref} missing or no Docker engine (KUBELORA_REQUIRE_IMAGES=1): bash scripts/build-images.sh")
    pytest.skip(f"{ref} not built or no Docker engine")


def _run(ref: str, user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    cmd = [DOCKER or "docker", "run", "--rm", "--read-only", "--user", user, "--tmpfs", "/tmp", "--network", "none"]
    return subprocess.run([*cmd, *argv[:1], ref, *argv[1:]], capture_output=True, text=True, timeout=120)


def test_operator_runs_read_only_as_non_root() -> None:
    out = _run(_image("operator"), "65532", "--entrypoint=python", "-m", "kubelora_operator", "run", "--help")
    assert out.returncode == 0, out.stderr
    assert "--standalone" in out.stdout


def test_trainer_cpu_imports_its_features_read_only() -> None:
    code = (
        "import os, torch, bitsandbytes.functional as F, kubelora_trainer.cli, kubelora_trainer.model;"
        "assert torch.version.cuda is None; assert os.getuid() == 1000;"
        "F.quantize_4bit(torch.randn(64, 64), quant_type='nf4'); print('ok')"
    )
    out = _run(_image("trainer-cpu"), "1000", "--entrypoint=python", "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
