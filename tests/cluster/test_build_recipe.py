"""build.sh and controlplane.py must agree on where the binaries are cached (no cluster needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from . import controlplane

BUILD_SH = Path(__file__).with_name("build.sh")


def _shell_var(name: str) -> str:
    m = re.search(rf'^{name}="?([^"\n]*)"?$', BUILD_SH.read_text(), re.MULTILINE)
    assert m, f"{name}= not found in {BUILD_SH}"
    return m.group(1)


def test_build_script_and_controlplane_agree_on_cache_key() -> None:
    assert _shell_var("K8S_PKG_VERSION") == controlplane.K8S_PKG_VERSION
    assert int(_shell_var("K8S_BUILD_REV")) == controlplane.K8S_BUILD_REV
    assert _shell_var("K8S_CACHE_KEY") == "${K8S_PKG_VERSION}+kubelora${K8S_BUILD_REV}"
    assert 'CACHE_DIR="$CACHE_ROOT/$K8S_CACHE_KEY"' in BUILD_SH.read_text()
    assert controlplane.cache_dir().name == controlplane.K8S_CACHE_KEY


def test_old_recipe_cache_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Binaries cached by recipe 1 (under the bare package version) must not count as built."""
    old = tmp_path / controlplane.K8S_PKG_VERSION
    old.mkdir()
    for b in controlplane.K8S_BINARIES:
        (old / b).write_text("#!/bin/sh\n")
        (old / b).chmod(0o755)
    monkeypatch.setenv("KUBELORA_K8S_CACHE", str(tmp_path))
    assert controlplane.binaries_dir() is None
    assert controlplane.missing_reason() is not None


def test_build_script_builds_the_node_binaries_controlplane_names() -> None:
    """`build.sh --node` caches kubelet + kube-proxy beside the control plane, under the same key."""
    text = BUILD_SH.read_text()
    m = re.search(r"^NODE_BINS=\(([^)]*)\)$", text, re.MULTILINE)
    assert m, "NODE_BINS=(...) not found in build.sh"
    assert tuple(m.group(1).split()) == controlplane.NODE_BINARIES
    assert "--node) WITH_NODE=1" in text
