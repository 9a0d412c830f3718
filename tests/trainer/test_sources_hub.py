"""A hub model fetched once into the source cache (hub_fetch.py), against a local fake hub (tests/fakehub.py).

What must hold: `kubelora-train fetch hf://org/tiny` (the operator's fetch pod) downloads the repo's
model files once into `<cache>/<key>/hub` with the hub token, records the resolved commit and every
file's sha256 in the marker; a second fetch asks the hub once and downloads nothing; a training
run then loads the model from that read-only cache with HF_HUB_OFFLINE=1, no token and no hub at
all; a gated, missing or token-refused repo fails with exit 2 and one line, leaving no cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubelora_trainer.hub_fetch import hub_cache_dir, hub_uri, is_hub_id
from kubelora_trainer.sources import MARKER_FILE

from tests.fakehub import FakeRepo, serve

from .conftest import tiny_config

pytestmark = pytest.mark.timeout(120)

BIN = Path(sys.executable).parent
COMMIT = "c0ffee" + "0" * 34


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    env.update({"HF_HOME": str(tmp_path / "hf-home"), "KUBELORA_TERMINATION_LOG": str(tmp_path / "tl"), **extra})
    return env


def _fetch(tmp_path: Path, cache: Path, *sources: str, **env: str) -> tuple[int, str]:
    proc = subprocess.run([str(BIN / "kubelora-train"), "fetch", "--cache", str(cache), "--", *sources],
                          env=_env(tmp_path, **env), capture_output=True, text=True, timeout=90)
    return proc.returncode, proc.stderr


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_hub_ids_are_told_from_paths_and_aliases() -> None:
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M") and is_hub_id("gpt2")
    for value in ("/models/x", "./x", "~/x", "a/b/c", "smollm2-135m", "s3://b/m", "pvc://c/p", "m.gguf", ""):
        assert not is_hub_id(value), value


def test_hub_model_is_fetched_once_and_trains_offline(tiny_model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    uri = hub_uri("org/tiny", None)
    with serve({"org/tiny": FakeRepo.from_dir(tiny_model_dir, COMMIT)}) as hub:
        hub.repos["org/tiny"].files["README.md"] = b"not a model file: not fetched"
        code, err = _fetch(tmp_path, cache, uri, HF_ENDPOINT=hub.url, HF_TOKEN="hf_test")
        assert code == 0, err[-3000:]
        first = hub.repo_requests()
        assert sorted(p.rsplit("/", 1)[-1] for p in hub.downloads()) == sorted(
            p.name for p in tiny_model_dir.iterdir() if p.is_file())
        assert all(auth == "Bearer hf_test" for _, _, auth in first), first
        hub.requests.clear()
        code, err = _fetch(tmp_path, cache, uri, HF_ENDPOINT=hub.url, HF_TOKEN="hf_test")
        assert code == 0, err[-3000:]
        assert hub.downloads() == [] and len(hub.repo_requests()) == 1, hub.requests  # one "which commit?" question
    message = json.loads((tmp_path / "tl").read_text())
    assert message["sources"][0]["downloaded"] is False
    code, err = _fetch(tmp_path, cache, uri, HF_ENDPOINT=hub.url)  # the hub is gone: the cached copy serves
    assert code == 0 and "using the cached copy" in err, err[-3000:]
    code, err = _fetch(tmp_path, tmp_path / "empty", uri, HF_ENDPOINT=hub.url)  # ... but nothing else does
    assert code == 1 and "did not answer" in err, err[-3000:]
    hub_dir = Path(hub_cache_dir(uri, cache))
    marker = json.loads((hub_dir.parent / MARKER_FILE).read_text())
    assert marker["commit"] == COMMIT and marker["repo"] == "org/tiny"
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    assert marker["objects"]["model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert "README.md" not in marker["objects"] and not list(cache.glob(".partial-*"))
    assert (hub_dir / "models--org--tiny" / "refs" / "main").read_text() == COMMIT

    # The workers' view: read-only cache, hub switched off and unreachable, no token.
    for p in [hub_dir.parent, *hub_dir.parent.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        cfg = tiny_config(tiny_model_dir, tmp_path / "run", training={"maxSteps": 1},
                          evaluation={"exactMatch": False, "before": False})
        cfg["model"]["nameOrPath"] = "org/tiny"
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        proc = subprocess.run([str(BIN / "kubelora-train"), "run", str(tmp_path / "cfg.yaml")],
                              env=_env(tmp_path, HF_HUB_CACHE=str(hub_dir), HF_HUB_OFFLINE="1",
                                       HF_ENDPOINT=_closed_port()),
                              capture_output=True, text=True, timeout=110)
    finally:
        for p in [hub_dir.parent, *hub_dir.parent.rglob("*")]:
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(("repo", "expected"), [
    ("org/missing", "not found on the hub"),
    ("org/gated", "is gated on the hub"),
    ("org/badtoken", "refused the token"),
])
def test_refused_hub_model_fails_the_fetch_with_one_line(repo: str, expected: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with serve({}) as hub:
        code, err = _fetch(tmp_path, cache, hub_uri(repo, None), HF_ENDPOINT=hub.url, HF_TOKEN="hf_test")
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("kubelora-train: error:")]
    assert code == 2 and len(lines) == 1 and repo in lines[0] and expected in lines[0], err[-3000:]
    assert not cache.exists() or not any(cache.iterdir())
    shutil.rmtree(cache, ignore_errors=True)


def test_a_branch_revision_is_pinned_to_its_commit_and_readable_offline(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The workers ask the offline cache for `model.revision` (a branch): its ref must name the fetched commit."""
    uri = hub_uri("org/tiny", "v1")
    with serve({"org/tiny": FakeRepo.from_dir(tiny_model_dir, COMMIT)}) as hub:
        code, err = _fetch(tmp_path, tmp_path / "cache", uri, HF_ENDPOINT=hub.url)
    assert code == 0, err[-3000:]
    hub_dir = Path(hub_cache_dir(uri, tmp_path / "cache"))
    marker = json.loads((hub_dir.parent / MARKER_FILE).read_text())
    assert (marker["revision"], marker["commit"]) == ("v1", COMMIT)
    assert (hub_dir / "models--org--tiny" / "refs" / "v1").read_text() == COMMIT
    probe = ("from huggingface_hub import try_to_load_from_cache as t; "
             "print(t('org/tiny', 'config.json', revision='v1'))")
    out = subprocess.run([sys.executable, "-c", probe], env=_env(tmp_path, HF_HUB_CACHE=str(hub_dir),
                         HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=60).stdout.strip()
    assert out == str(hub_dir / "models--org--tiny" / "snapshots" / COMMIT / "config.json")
