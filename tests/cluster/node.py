"""A real Kubernetes node on this host, joined to a ``ControlPlane(serve_pods_at=ADDR)``: kubelet v1.20.2
(dockershim, Docker's engine from scripts/docker-engine.sh) + kube-proxy (iptables) + a CNI bridge.

Test scaffolding for the real-container end-to-end run (issue 11); everything needs root. Facts behind
each setting: /work/shared/notes/real-node.md. ``stop()`` removes what ``start()`` added: processes, pod
containers, the DOCKER-USER rules, kube-proxy's iptables rules and the bridge.

    with ControlPlane(serve_pods_at=addr) as cp, RealNode(cp, addr) as node:
        ...  # pods scheduled to node.name run in real containers
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from .controlplane import NODE_BINARIES, ControlPlane, ControlPlaneError, _terminate, free_ports

POD_CIDR = "10.244.0.0/24"
BRIDGE = "cni0"
CNI_BIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins
CLUSTER_DNS_IP = "10.0.0.10"
PAUSE_IMAGE = "kubelora/pause:3.2"
DOCKER = "/usr/bin/docker"  # Debian's 20.10 client, the one scripts/docker-engine.sh pairs with its engine
# iptables rules that let pod traffic through Docker's FORWARD policy DROP (inserted, removed on stop).
FORWARD_RULES = (["-i", BRIDGE, "-j", "ACCEPT"], ["-o", BRIDGE, "-j", "ACCEPT"])


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check)


class RealNode:
    """kubelet + kube-proxy for one node named ``name`` at ``address`` (the control plane's serve_pods_at)."""

    def __init__(
        self,
        cp: ControlPlane,
        address: str,
        name: str = "kubelora-node",
        ready_timeout: float = 120,
        pause_image: str = PAUSE_IMAGE,
    ):
        if cp.bin_dir is None or not all((cp.bin_dir / b).exists() for b in NODE_BINARIES):
            raise ControlPlaneError("kubelet/kube-proxy not built: run `bash tests/cluster/build.sh --node` as root")
        self.cp, self.address, self.name, self.ready_timeout = cp, address, name, ready_timeout
        self.pause_image = pause_image
        self.workdir: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self._rules_added: list[list[str]] = []

    def __enter__(self) -> RealNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> RealNode:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        assert self.cp.bin_dir is not None and self.cp.kubeconfig is not None
        w = self.workdir = Path(tempfile.mkdtemp(prefix="kubelora-node-"))
        (w / "logs").mkdir()
        (w / "cni").mkdir()
        (w / "cni" / "10-kubelora.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "0.4.0",
                    "name": "kubelora",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": BRIDGE,
                            "isGateway": True,
                            "ipMasq": True,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_CIDR}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(w / "cni-ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                }
            )
        )
        kubelet_port, healthz, proxy_metrics, proxy_healthz = free_ports(4)
        (w / "kubelet-config.json").write_text(
            json.dumps(
                {
                    "kind": "KubeletConfiguration",
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "cgroupDriver": "cgroupfs",
                    "clusterDNS": [CLUSTER_DNS_IP],
                    "clusterDomain": "cluster.local",
                    "port": kubelet_port,
                    "readOnlyPort": 0,
                    "healthzPort": healthz,
                    "healthzBindAddress": "127.0.0.1",
                    # test scaffolding: the apiserver (kubectl logs) talks to the kubelet without a client cert
                    "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
                    "authorization": {"mode": "AlwaysAllow"},
                    "failSwapOn": False,
                    "evictionHard": {
                        "memory.available": "50Mi",
                        "nodefs.available": "1%",
                        "imagefs.available": "1%",
                        "nodefs.inodesFree": "1%",
                    },
                    "serializeImagePulls": False,
                }
            )
        )
        for rule in FORWARD_RULES:
            _run("iptables", "-I", "DOCKER-USER", *rule)
            self._rules_added.append(rule)
        b = self.cp.bin_dir
        self._spawn(
            "kubelet",
            [
                str(b / "kubelet"),
                f"--config={w / 'kubelet-config.json'}",
                f"--kubeconfig={self.cp.kubeconfig}",
                "--container-runtime=docker",
                f"--pod-infra-container-image={self.pause_image}",
                "--network-plugin=cni",
                f"--cni-bin-dir={CNI_BIN_DIR}",
                f"--cni-conf-dir={w / 'cni'}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.address}",
                f"--root-dir={w / 'kubelet'}",
                f"--cert-dir={w / 'kubelet-pki'}",
            ],
        )
        self._spawn(
            "kube-proxy",
            [
                str(b / "kube-proxy"),
                f"--kubeconfig={self.cp.kubeconfig}",
                "--proxy-mode=iptables",
                f"--cluster-cidr={POD_CIDR}",
                f"--hostname-override={self.name}",
                f"--metrics-bind-address=127.0.0.1:{proxy_metrics}",
                f"--healthz-bind-address=127.0.0.1:{proxy_healthz}",
                "--conntrack-max-per-core=0",  # leave the host's conntrack sysctls alone
            ],
        )
        self.cp.wait_for(self._ready, timeout=self.ready_timeout, interval=1, what=f"node {self.name} Ready")

    def _ready(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ControlPlaneError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
        node = self.cp.get(f"/api/v1/nodes/{self.name}")
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))
        untainted = not any(t.get("key") == "node.kubernetes.io/not-ready" for t in node["spec"].get("taints") or [])
        return ready and untainted

    def _spawn(self, name: str, argv: list[str]) -> None:
        assert self.workdir is not None
        with open(self.workdir / "logs" / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def log_tail(self, name: str, lines: int = 30) -> str:
        if self.workdir is None:
            return ""
        with contextlib.suppress(OSError):
            return "\n".join((self.workdir / "logs" / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        for name in ("kubelet", "kube-proxy"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                _terminate(proc)
        # pod containers kubelet's dockershim started (it labels every one of them)
        ids = _run(DOCKER, "ps", "-aq", "--filter", "label=io.kubernetes.docker.type", check=False).stdout.split()
        if ids:
            _run(DOCKER, "rm", "-f", *ids, check=False)
        if self.cp.bin_dir is not None and (self.cp.bin_dir / "kube-proxy").exists():
            _run(str(self.cp.bin_dir / "kube-proxy"), "--cleanup", check=False)
        while self._rules_added:
            _run("iptables", "-D", "DOCKER-USER", *self._rules_added.pop(), check=False)
        _run("ip", "link", "delete", BRIDGE, check=False)
        if self.workdir is not None:
            # kubelet may leave mounts (secret volumes) under its root dir
            for line in reversed(Path("/proc/mounts").read_text().splitlines()):
                target = line.split()[1]
                if target.startswith(str(self.workdir)):
                    _run("umount", "-l", target, check=False)
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
