"""A real node (tests/cluster/node.py) registers Ready and runs a pod in a real container; stop() leaves
no container, DOCKER-USER rule or bridge behind.

Runs only as root with a Docker engine up (scripts/docker-engine.sh start), kubelet/kube-proxy built
(tests/cluster/build.sh --node) and a pause image present (scripts/build-images.sh builds
kubelora/pause:3.2; KUBELORA_PAUSE_IMAGE names another); skips otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.cluster.controlplane import NODE_BINARIES, ControlPlane, cache_dir, missing_reason
from tests.cluster.node import BRIDGE, PAUSE_IMAGE, RealNode

from .test_serve_pods_at import _host_address


def _skip_reason(pause: str) -> str | None:
    if os.geteuid() != 0:
        return "a real node needs root"
    if missing_reason() or not all((cache_dir() / b).exists() for b in NODE_BINARIES):
        return "run `bash tests/cluster/build.sh --node`"
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        return "no Docker engine: `bash scripts/docker-engine.sh start`"
    if not subprocess.run(["docker", "images", "-q", pause], capture_output=True, text=True).stdout.strip():
        return f"pause image {pause} not built: `bash scripts/build-images.sh`"
    return None


def test_real_node_runs_a_pod_and_cleans_up() -> None:
    pause = os.environ.get("KUBELORA_PAUSE_IMAGE", PAUSE_IMAGE)
    reason = _skip_reason(pause)
    addr = _host_address()
    if reason or addr is None:
        pytest.skip(reason or "no non-loopback address")
    with ControlPlane(serve_pods_at=addr) as cp:
        node = RealNode(cp, addr, pause_image=pause)
        try:
            node.start()
            cp.wait_default_service_account("default")
            cp.create(
                "/api/v1/namespaces/default/pods",
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "p"},
                    "spec": {"containers": [{"name": "c", "image": pause, "imagePullPolicy": "Never"}]},
                },
            )
            pod = cp.wait_for(
                lambda: (p := cp.get("/api/v1/namespaces/default/pods/p"))["status"].get("phase") == "Running" and p,
                timeout=90,
                interval=1,
                what="pod Running",
            )
            assert pod["spec"]["nodeName"] == node.name
            assert pod["status"]["podIP"].startswith("10.244.0.")
            running = subprocess.run(
                ["docker", "ps", "-q", "--filter", "label=io.kubernetes.pod.name=p"], capture_output=True, text=True
            ).stdout.split()
            assert len(running) == 2  # the sandbox (pause) and the container
        finally:
            node.stop()
    left = subprocess.run(
        ["docker", "ps", "-aq", "--filter", "label=io.kubernetes.docker.type"], capture_output=True, text=True
    ).stdout.split()
    assert left == []
    assert BRIDGE not in subprocess.run(["iptables", "-S", "DOCKER-USER"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0
