"""ControlPlane(serve_pods_at=ADDR): what a real node's pods need from the apiserver (no kubelet needed).

Pods reach the API through the ``kubernetes`` Service (10.0.0.1), whose endpoint is the apiserver's
advertised address: it must not be loopback, and the serving certificate must carry both that address and
the Service IP, or in-cluster clients (the operator in its own container) fail TLS verification.
"""

from __future__ import annotations

import socket
import ssl

import pytest

from tests.cluster.controlplane import ControlPlane, missing_reason


def _host_address() -> str | None:
    """This host's address on its default route (not loopback), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.254", 9))  # no packet is sent for a UDP connect
        except OSError:
            return None
        addr = s.getsockname()[0]
    return None if addr.startswith("127.") else addr


def test_serve_pods_at_advertises_a_reachable_address_with_a_matching_certificate() -> None:
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    addr = _host_address()
    if addr is None:
        pytest.skip("no non-loopback address on this host")
    with ControlPlane(serve_pods_at=addr, scheduler=False) as cp:
        assert cp.server.startswith(f"https://{addr}:")
        eps = cp.wait_for(
            lambda: (e := cp.get("/api/v1/namespaces/default/endpoints/kubernetes")).get("subsets") and e,
            timeout=30,
            what="endpoints of the kubernetes Service",
        )
        assert [a["ip"] for a in eps["subsets"][0]["addresses"]] == [addr]
        # The serving certificate verifies for the node address (hostname check on the IP) ...
        port = int(cp.server.rsplit(":", 1)[1])
        ctx = ssl.create_default_context(cafile=str(cp.ca_file))
        with socket.create_connection((addr, port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname=addr):
            pass
        # ... and for the Service IP that in-cluster clients dial.
        with (
            socket.create_connection((addr, port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="10.0.0.1") as tls,
        ):
            assert tls.version()
        args = str(cp.procs["kube-apiserver"].args)
        assert "--kubelet-preferred-address-types=InternalIP" in args
        assert "-nodelifecycle" not in str(cp.procs["kube-controller-manager"].args)


def test_default_mode_stays_on_loopback_without_node_lifecycle() -> None:
    cp = ControlPlane()
    assert cp.serve_pods_at is None
    # the arguments are only built at start: check the constants the default mode uses
    from tests.cluster import controlplane

    assert "-nodelifecycle" in controlplane.KCM_CONTROLLERS
    assert "-nodelifecycle" not in controlplane.KCM_CONTROLLERS_REAL_NODE
