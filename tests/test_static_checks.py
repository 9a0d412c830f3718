"""The packages stay lint- and type-clean: ruff and mypy with the settings in pyproject.toml.

Why as tests: CI runs the README's test command and nothing else, and type errors in kopf handler
signatures or transformers call sites are the kind of bug no unit test sees until a code path runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ["trainer/kubelora_trainer", "operator/kubelora_operator"]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    out = _run(sys.executable, "-m", "ruff", "check", *PACKAGES, "tests", "bench")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_finds_nothing() -> None:
    out = _run(sys.executable, "-m", "mypy", *PACKAGES)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
