"""pytest plugin: a session-wide local Kubernetes control plane.

Wire it in with ``pytest_plugins = ["tests.cluster.fixtures"]`` in ``tests/conftest.py``
(``tests/cluster/conftest.py`` also loads it, idempotently, for runs of ``tests/cluster`` alone).

Fixtures:
  control_plane      (session) a started ControlPlane (etcd, apiserver, controller-manager, scheduler).
                     Skips when the binaries are not built, or fails when KUBELORA_REQUIRE_CLUSTER=1.
  kubeconfig_env     (session) {"KUBECONFIG": path} for subprocesses / kubernetes clients.
  cluster_namespace  (function) a fresh namespace (default service account ready), deleted afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from .controlplane import BUILD_HINT, ControlPlane, missing_reason


def _require_cluster() -> bool:
    return os.environ.get("KUBELORA_REQUIRE_CLUSTER", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    reason = missing_reason()
    if reason is not None:
        if _require_cluster():
            pytest.fail(f"KUBELORA_REQUIRE_CLUSTER=1 but no local control plane: {reason}", pytrace=False)
        pytest.skip(f"local Kubernetes control plane unavailable: {reason}")
    cp = ControlPlane()
    try:
        cp.start()
    except Exception as e:  # a built-but-broken control plane is always a failure, never a skip
        pytest.fail(f"local Kubernetes control plane failed to start ({BUILD_HINT}): {e}", pytrace=False)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kubeconfig_env(control_plane: ControlPlane) -> dict[str, str]:
    """Only the variables to add: use ``{**os.environ, **kubeconfig_env}`` for subprocesses."""
    return control_plane.env()


@pytest.fixture
def cluster_namespace(control_plane: ControlPlane) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    control_plane.create_namespace(name)
    yield name
    control_plane.delete_namespace(name)
