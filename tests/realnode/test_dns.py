"""Cluster DNS scaffolding (tests/cluster/dns.py): dnsmasq on the bridge address answers for Services and
headless Services' pods as they appear in the API, NXDOMAIN for unknown cluster names, behind the
``kube-system/kube-dns`` Service at the kubelet's clusterDNS IP; stop() removes all of it.

Needs root (port 53, the bridge) and the control-plane binaries; no kubelet (the pod's IP is set through
the status subresource, as a kubelet would).
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from tests.cluster.controlplane import ControlPlane, missing_reason
from tests.cluster.dns import BRIDGE_ADDRESS, DNSMASQ, SERVICE_NAME, SERVICE_NAMESPACE, ClusterDNS, query_a
from tests.cluster.node import BRIDGE, CLUSTER_DNS_IP


def _bridge_exists() -> bool:
    return subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode == 0


def test_cluster_dns_serves_services_and_headless_pods_and_cleans_up() -> None:
    if os.geteuid() != 0:
        pytest.skip("dnsmasq on port 53 and the bridge need root")
    if missing_reason() or not os.path.exists(DNSMASQ):
        pytest.skip(missing_reason() or f"{DNSMASQ} missing: bash scripts/docker-engine.sh start installs it")
    if _bridge_exists():
        pytest.skip(f"{BRIDGE} exists already (a real node is running here)")
    with ControlPlane(scheduler=False) as cp:
        cp.wait_default_service_account("default")
        ns = "/api/v1/namespaces/default"
        for name, ip in (("web", {}), ("workers", {"clusterIP": "None"})):
            spec: dict[str, Any] = {"ports": [{"port": 80}], **ip}
            cp.create(
                f"{ns}/services", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}
            )
        web = cp.get(f"{ns}/services/web")
        dns = ClusterDNS(cp, interval=0.2).start()
        try:
            eps = cp.get(f"/api/v1/namespaces/{SERVICE_NAMESPACE}/endpoints/{SERVICE_NAME}")
            assert cp.get(f"/api/v1/namespaces/{SERVICE_NAMESPACE}/services/{SERVICE_NAME}")["spec"]["clusterIP"] == (
                CLUSTER_DNS_IP
            )
            assert [a["ip"] for a in eps["subsets"][0]["addresses"]] == [BRIDGE_ADDRESS]
            assert query_a("web.default.svc.cluster.local") == [web["spec"]["clusterIP"]]
            assert query_a("web.default.svc") == [web["spec"]["clusterIP"]]
            assert query_a("nope.default.svc.cluster.local") is None  # NXDOMAIN, not a timeout or REFUSED

            cp.create(
                f"{ns}/pods",
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "w-0"},
                    "spec": {"hostname": "w-0", "subdomain": "workers", "containers": [{"name": "c", "image": "x"}]},
                },
            )
            cp.merge_patch(
                f"{ns}/pods/w-0/status", {"status": {"podIP": "10.244.0.9", "podIPs": [{"ip": "10.244.0.9"}]}}
            )
            got = cp.wait_for(
                lambda: query_a("w-0.workers.default.svc.cluster.local"), timeout=15, what="the pod's record"
            )
            assert got == ["10.244.0.9"]
            assert query_a("workers.default.svc.cluster.local") == ["10.244.0.9"]
            assert dns.reloads >= 1
            pid = dns.proc.pid if dns.proc else None
        finally:
            dns.stop()
        assert pid is not None and not os.path.exists(f"/proc/{pid}")  # dnsmasq ended and reaped
        names = [s["metadata"]["name"] for s in cp.get(f"/api/v1/namespaces/{SERVICE_NAMESPACE}/services")["items"]]
        assert SERVICE_NAME not in names
        assert not _bridge_exists()
