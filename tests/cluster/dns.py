"""Cluster DNS for the real node (tests/cluster/node.py): dnsmasq on the CNI bridge address, serving a
hosts file made from the API's Services and headless Services' pods, behind a selectorless
``kube-system/kube-dns`` Service at the kubelet's ``clusterDNS`` IP.

Test scaffolding, not product: Debian ships no CoreDNS (/work/shared/notes/real-node.md). A polling
thread rewrites the hosts file and sends dnsmasq SIGHUP (it re-reads ``--addn-hosts`` files) when the
records change. Records, following the Kubernetes DNS spec for what the trainer pods use:

- every Service with a ClusterIP: ``svc.ns.svc.cluster.local`` and ``svc.ns.svc`` -> ClusterIP;
- every pod with ``hostname`` + ``subdomain`` where a headless Service named ``subdomain`` exists:
  ``hostname.subdomain.ns.svc.cluster.local`` (and ``...ns.svc``) -> podIP, and the Service's name ->
  each such pod's IP.

Names under ``cluster.local`` that are not in the file get NXDOMAIN at once (no upstream forwarding).

    with ControlPlane(serve_pods_at=addr) as cp, RealNode(cp, addr), ClusterDNS(cp):
        ...  # pods resolve Service and worker names
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from .controlplane import ApiError, ControlPlane, ControlPlaneError, _terminate
from .node import BRIDGE, CLUSTER_DNS_IP, POD_CIDR

DNSMASQ = "/usr/sbin/dnsmasq"  # Debian's dnsmasq-base (scripts/docker-engine.sh installs it)
CLUSTER_DOMAIN = "cluster.local"
SERVICE_NAMESPACE, SERVICE_NAME = "kube-system", "kube-dns"
#: The bridge's gateway address (the CNI bridge plugin's isGateway takes the subnet's first address).
BRIDGE_ADDRESS = POD_CIDR.rsplit(".", 1)[0] + ".1"
_PREFIX_LEN = POD_CIDR.rsplit("/", 1)[1]


def _names(name: str, namespace: str) -> list[str]:
    return [f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}", f"{name}.{namespace}.svc"]


def records(services: list[dict[str, Any]], pods: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(IP, name) pairs for the hosts file, sorted (so that an unchanged cluster gives the same file)."""
    out: set[tuple[str, str]] = set()
    headless: set[tuple[str, str]] = set()
    for svc in services:
        meta, spec = svc["metadata"], svc.get("spec") or {}
        ip = spec.get("clusterIP")
        if ip == "None":
            headless.add((meta["namespace"], meta["name"]))
        elif ip:
            out.update((ip, n) for n in _names(meta["name"], meta["namespace"]))
    for pod in pods:
        meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
        host, sub, ip = spec.get("hostname"), spec.get("subdomain"), status.get("podIP")
        if not (host and sub and ip) or (meta["namespace"], sub) not in headless:
            continue
        out.update((ip, f"{host}.{n}") for n in _names(sub, meta["namespace"]))
        out.update((ip, n) for n in _names(sub, meta["namespace"]))
    return sorted(out)


def hosts_text(recs: list[tuple[str, str]]) -> str:
    return "".join(f"{ip} {name}\n" for ip, name in recs)


def query_a(name: str, server: str = BRIDGE_ADDRESS, timeout: float = 2.0) -> list[str] | None:
    """IPv4 addresses of ``name`` from ``server`` (one UDP A query; the host has no dig); None: NXDOMAIN."""
    qid = random.randrange(1 << 16)
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, (server, 53))
        reply = s.recv(4096)
    rid, flags, _, ancount, _, _ = struct.unpack(">HHHHHH", reply[:12])
    if rid != qid:
        raise OSError(f"DNS reply id {rid} != query id {qid}")
    if flags & 0xF == 3:
        return None
    if flags & 0xF:
        raise OSError(f"DNS error rcode {flags & 0xF} for {name}")
    pos, out = 12 + len(question) + 4, []
    for _ in range(ancount):
        while reply[pos] and reply[pos] < 0xC0:  # the owner name: labels, or a compression pointer
            pos += reply[pos] + 1
        pos += 2 if reply[pos] >= 0xC0 else 1
        rtype, _, _, rdlen = struct.unpack(">HHIH", reply[pos : pos + 10])
        pos += 10
        if rtype == 1 and rdlen == 4:
            out.append(socket.inet_ntoa(reply[pos : pos + 4]))
        pos += rdlen
    return out


class ClusterDNS:
    """dnsmasq + its watcher + the kube-dns Service/Endpoints. ``stop()`` removes all of them."""

    def __init__(self, cp: ControlPlane, address: str = BRIDGE_ADDRESS, interval: float = 1.0):
        if not Path(DNSMASQ).exists():
            raise ControlPlaneError(f"{DNSMASQ} missing: apt-get install dnsmasq-base (scripts/docker-engine.sh)")
        self.cp, self.address, self.interval = cp, address, interval
        self.workdir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.reloads = 0  # SIGHUPs sent (the watcher saw a change)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created_bridge = False
        self._text = ""

    def __enter__(self) -> ClusterDNS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def hosts_file(self) -> Path:
        assert self.workdir is not None, "not started"
        return self.workdir / "hosts"

    def start(self) -> ClusterDNS:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="kubelora-dns-"))
        self._ensure_address()
        self._refresh()
        self.proc = subprocess.Popen(
            [
                DNSMASQ,
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-hosts",  # not this host's /etc/hosts
                "--no-resolv",  # no upstream: only cluster names
                f"--local=/{CLUSTER_DOMAIN}/",  # unknown cluster names: NXDOMAIN, not REFUSED
                f"--addn-hosts={self.hosts_file}",
                f"--listen-address={self.address}",
                "--bind-interfaces",
                "--port=53",
                "--user=root",  # the hosts file sits in a root-only temp dir
                "--pid-file=",
                f"--log-facility={self.workdir / 'dnsmasq.log'}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        with contextlib.suppress(subprocess.TimeoutExpired):
            _, err = self.proc.communicate(timeout=0.5)
            raise ControlPlaneError(f"dnsmasq exited with {self.proc.returncode}: {err.decode(errors='replace')}")
        self._publish_service()
        self._thread = threading.Thread(target=self._watch, name="cluster-dns-watch", daemon=True)
        self._thread.start()

    def _ensure_address(self) -> None:
        """dnsmasq binds the bridge address, which the CNI bridge plugin only creates with the first pod:
        create the bridge with that address now (the plugin accepts a bridge that already has it)."""
        if subprocess.run(["ip", "-o", "addr", "show", "to", self.address], capture_output=True, text=True).stdout:
            return
        if self.address != BRIDGE_ADDRESS:
            raise ControlPlaneError(f"no interface has {self.address}")
        if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0:
            subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True, capture_output=True)
            self._created_bridge = True
        for cmd in (["addr", "add", f"{self.address}/{_PREFIX_LEN}", "dev", BRIDGE], ["link", "set", BRIDGE, "up"]):
            subprocess.run(["ip", *cmd], check=True, capture_output=True)

    def _publish_service(self) -> None:
        ports = [("dns", "UDP"), ("dns-tcp", "TCP")]
        base = f"/api/v1/namespaces/{SERVICE_NAMESPACE}"
        meta = {"name": SERVICE_NAME, "namespace": SERVICE_NAMESPACE, "labels": {"k8s-app": "kube-dns"}}
        self.cp.create(
            f"{base}/services",
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": meta,
                "spec": {
                    "clusterIP": CLUSTER_DNS_IP,
                    "ports": [{"name": n, "protocol": p, "port": 53, "targetPort": 53} for n, p in ports],
                },
            },
        )
        self.cp.create(
            f"{base}/endpoints",
            {
                "apiVersion": "v1",
                "kind": "Endpoints",
                "metadata": meta,
                "subsets": [
                    {
                        "addresses": [{"ip": self.address}],
                        "ports": [{"name": n, "protocol": p, "port": 53} for n, p in ports],
                    }
                ],
            },
        )

    def _refresh(self) -> bool:
        """Rewrite the hosts file if the records changed; True when they did."""
        services = self.cp.get("/api/v1/services")["items"]
        pods = self.cp.get("/api/v1/pods")["items"]
        text = hosts_text(records(services, pods))
        if text == self._text:
            return False
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.hosts_file)
        self._text = text
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                changed = self._refresh()
            except (ApiError, OSError):
                continue  # the API restarting or going away at stop: try again next round
            if changed and self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGHUP)
                self.reloads += 1

    def log_tail(self, lines: int = 30) -> str:
        if self.workdir is None:
            return ""
        with contextlib.suppress(OSError):
            return "\n".join((self.workdir / "dnsmasq.log").read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.proc is not None:
            _terminate(self.proc)
            self.proc = None
        base = f"/api/v1/namespaces/{SERVICE_NAMESPACE}"
        for kind in ("endpoints", "services"):
            with contextlib.suppress(ApiError, OSError):
                self.cp.delete(f"{base}/{kind}/{SERVICE_NAME}")
        if self._created_bridge:
            subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
            self._created_bridge = False
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
