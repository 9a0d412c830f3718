#!/usr/bin/env python3
"""Operator scale benchmark: N LoRAFineTunes applied at once against the local control plane.

What it does (issue #3, "Benchmark (not a timed test)"):

1. starts a real local control plane (``tests/cluster/controlplane.py``: etcd, kube-apiserver,
   controller-manager, scheduler v1.20.2) with an apiserver *audit log* for one extra static-token
   user, ``kubelora-operator`` (group system:masters), so every request the operator makes is
   counted exactly, by verb, resource and user agent (kopf's aiohttp client and the operator's own
   ``kubernetes.client`` REST layer both authenticate through the operator's kubeconfig);
2. applies the CRD, registers fake AMX CPU nodes with room for every worker (nothing runs the
   pods: there is no kubelet, the scheduler binds them and they stay Pending);
3. starts one operator process (``python -m kubelora_operator run --standalone --namespace NS``)
   with the production default settings (resync 30 s) unless ``--resync-seconds`` says otherwise;
4. creates N LoRAFineTunes (``--workers`` CPU workers each) from ``--threads`` client threads as
   fast as the apiserver takes them, while two watches (pods by label ``kubelora.dev/name``, and
   the LoRAFineTunes) timestamp when each resource's worker pods appear and when it gets
   Validated=True and Scheduled=True;
5. samples the operator's RSS (VmRSS/VmHWM) and CPU time (utime+stime) from /proc every 0.2 s;
6. after every resource is done, keeps watching for ``--settle`` seconds (one resync period by
   default) to measure the steady-state request rate of an idle fleet.

Usage (from the repository root, in the project's virtual environment; binaries from
``tests/cluster/build.sh``)::

    python bench/operator_scale.py --resources 10      # smoke run
    python bench/operator_scale.py --resources 200     # the benchmark

Results: ``bench/results/operator-<date>.json`` (``--out`` to override) and a summary on stdout.

Why one file of more than 400 lines: it is a script run directly and copied as a whole into a scratch
directory to measure an older commit beside the current one (docs/operator-benchmark.md); its parts
(watches, /proc sampling, audit-log summaries) serve only this benchmark.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster.controlplane import ApiError, ControlPlane  # noqa: E402
from tests.operator.audit import AuditedControlPlane, parse_stamp, read_audit  # noqa: E402
from tests.operator.cluster_helpers import AMX_LABELS, LFT_API, ensure_crd  # noqa: E402

LABEL_NAME = "kubelora.dev/name"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- control plane


_ts = parse_stamp


def classify(ev: dict[str, Any]) -> str:
    ref = ev.get("objectRef") or {}
    res = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
    return f"{ev.get('verb')} {res}"


def agent(ev: dict[str, Any]) -> str:
    ua = ev.get("userAgent") or ""
    if ua.startswith("kopf"):
        return "kopf"
    if ua.startswith("OpenAPI-Generator"):
        return "kubelora.kube (kubernetes.client)"
    return ua.split("/")[0] or "?"


def summarize_requests(events: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    """The operator's requests received in [t0, t1), counted and timed (apiserver-side latency)."""
    sel = [e for e in events if t0 <= _ts(e["requestReceivedTimestamp"]) < t1]
    by_kind = collections.Counter(classify(e) for e in sel)
    by_agent = collections.Counter(agent(e) for e in sel)
    codes = collections.Counter(str((e.get("responseStatus") or {}).get("code", "?")) for e in sel)
    lat: dict[str, list[float]] = collections.defaultdict(list)
    for e in sel:
        if e.get("verb") != "watch":
            lat[classify(e)].append(_ts(e["stageTimestamp"]) - _ts(e["requestReceivedTimestamp"]))
    server_ms = {
        k: {
            "n": len(v),
            "p50_ms": round(pct(v, 50) * 1000, 1),
            "p90_ms": round(pct(v, 90) * 1000, 1),
            "sum_s": round(sum(v), 2),
        }
        for k, v in sorted(lat.items(), key=lambda kv: -sum(kv[1]))
    }
    return {
        "total": len(sel),
        "by_verb_resource": dict(by_kind.most_common()),
        "by_client": dict(by_agent.most_common()),
        "by_status_code": dict(codes.most_common()),
        "apiserver_latency_by_kind": server_ms,
    }


def timeline(events: list[dict[str, Any]], t0: float, t1: float, step: float) -> list[dict[str, Any]]:
    """Operator requests per `step` seconds from t0: total and the top kinds."""
    buckets: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for e in events:
        t = _ts(e["requestReceivedTimestamp"])
        if t0 <= t < t1:
            buckets[int((t - t0) // step)][classify(e)] += 1
    out = []
    for i in range(int((t1 - t0) // step) + 1):
        c = buckets.get(i, collections.Counter())
        out.append({"t_s": i * step, "total": sum(c.values()), **dict(c.most_common(4))})
    return out


def apiserver_requests(cp: ControlPlane) -> dict[str, float]:
    """apiserver_request_total by "verb resource[/subresource]", summed over codes and clients
    (every client: the scheduler's bindings and the controllers' Endpoints too, not only the operator)."""
    req = urllib.request.Request(cp.server + "/metrics", headers={"Authorization": f"Bearer {cp.token}"})
    with urllib.request.urlopen(req, timeout=30, context=cp.ssl_context()) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            kind = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            key = f"{labels.get('verb', '').lower()} {kind}".strip()
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def requests_delta(before: Mapping[str, float], after: Mapping[str, float], top: int = 15) -> dict[str, Any]:
    """The requests between two `apiserver_requests` readings: total and the largest kinds."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    kinds = sorted(((k, round(v)) for k, v in delta.items() if v >= 1), key=lambda kv: -kv[1])
    return {"total": round(sum(delta.values())), "by_verb_resource": dict(kinds[:top])}


class Poster:
    """POSTs from many threads over one kept-alive HTTPS connection per thread.

    Why: kubectl, Argo CD and controllers reuse their connections; a new connection per request (as
    `ControlPlane.request` makes, fine for tests) cost the API server a TLS handshake each, about 5% of
    its CPU during a 1,000-resource ramp (RSA in its pprof profile), on top of what it measures."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        url = urllib.parse.urlsplit(cp.server)
        self.host, self.port = url.hostname or "127.0.0.1", url.port
        self._local = threading.local()

    def post(self, path: str, obj: Mapping[str, Any]) -> None:
        conn: http.client.HTTPSConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(self.host, self.port, context=self.cp.ssl_context(), timeout=60)
            self._local.conn = conn
        headers = {
            "Authorization": f"Bearer {self.cp.token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        try:
            conn.request("POST", path, json.dumps(obj).encode(), headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            self._local.conn = None
            raise
        if resp.status >= 300:
            raise ApiError("POST", path, resp.status, data.decode(errors="replace"))


class ApiserverProfile(threading.Thread):
    """A CPU profile of the apiserver over `seconds` (its pprof endpoint; the control plane runs with
    --profiling=true for it), written to `path`: read it with `go tool pprof -top KUBE_APISERVER PATH`."""

    def __init__(self, cp: ControlPlane, seconds: float, path: Path) -> None:
        super().__init__(daemon=True, name="apiserver profile")
        self.cp, self.seconds, self.path = cp, seconds, path
        self.error: str | None = None

    def run(self) -> None:
        url = f"{self.cp.server}/debug/pprof/profile?seconds={int(self.seconds)}"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.cp.token}"})
        try:
            with urllib.request.urlopen(req, timeout=self.seconds + 60, context=self.cp.ssl_context()) as r:
                self.path.write_bytes(r.read())
        except OSError as err:
            self.error = str(err)


# --------------------------------------------------------------------------- watching


class Watch(threading.Thread):
    """A raw streaming watch; calls on_event(type, object) for each event; stops with stop()."""

    def __init__(self, cp: ControlPlane, path: str, params: dict[str, str], on_event: Any) -> None:
        super().__init__(daemon=True, name=f"watch {path}")
        self.cp, self.path, self.params, self.on_event = cp, path, params, on_event
        self.ready = threading.Event()
        self._halt = threading.Event()
        self.error: BaseException | None = None
        self._resp: Any = None
        self.restarts = 0  # watches after the first: each one costs the API server a request
        self.relists = 0  # of them without a resourceVersion (after a 410): every object sent again

    def run(self) -> None:
        rv = ""
        while not self._halt.is_set():
            try:
                params = {**self.params, "watch": "1", "timeoutSeconds": "600", "allowWatchBookmarks": "false"}
                if rv:
                    params["resourceVersion"] = rv
                if self.ready.is_set():
                    self.restarts += 1
                    self.relists += not rv
                url = self.cp.server + self.path + "?" + urllib.parse.urlencode(params)
                req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.cp.token}"})
                self._resp = urllib.request.urlopen(req, timeout=700, context=self.cp.ssl_context())
                self.ready.set()
                for raw in self._resp:
                    if self._halt.is_set():
                        return
                    ev = json.loads(raw)
                    obj = ev.get("object") or {}
                    if ev.get("type") == "ERROR":
                        rv = ""
                        break
                    rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
                    self.on_event(ev["type"], obj, time.time())
            except Exception as err:  # noqa: BLE001
                if self._halt.is_set():
                    return
                self.error = err
                time.sleep(0.2)

    def stop(self) -> None:
        self._halt.set()
        with contextlib.suppress(Exception):
            if self._resp is not None:
                self._resp.fp.raw._sock.shutdown(socket.SHUT_RDWR)


class Tracker:
    """First-seen times per resource: worker pods created, Validated=True, Scheduled=True."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.lock = threading.Lock()
        self.pods: dict[str, dict[str, float]] = collections.defaultdict(dict)  # lft -> pod -> t
        self.cond: dict[str, dict[str, float]] = collections.defaultdict(dict)  # lft -> type -> t
        self.bound: dict[str, dict[str, float]] = collections.defaultdict(dict)
        self.changed = threading.Event()

    def on_pod(self, typ: str, pod: dict[str, Any], t: float) -> None:
        meta = pod.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(LABEL_NAME)
        if not owner or typ not in ("ADDED", "MODIFIED"):
            return
        with self.lock:
            self.pods[owner].setdefault(meta["name"], t)
            if (pod.get("spec") or {}).get("nodeName"):
                self.bound[owner].setdefault(meta["name"], t)
        self.changed.set()

    def on_lft(self, typ: str, obj: dict[str, Any], t: float) -> None:
        name = (obj.get("metadata") or {}).get("name")
        if not name or typ not in ("ADDED", "MODIFIED"):
            return
        with self.lock:
            for c in (obj.get("status") or {}).get("conditions") or []:
                if c.get("status") == "True":
                    self.cond[name].setdefault(c["type"], t)
        self.changed.set()

    def workers_done(self, name: str) -> float | None:
        got = self.pods.get(name) or {}
        return max(got.values()) if len(got) >= self.workers else None

    def all_done(self, names: list[str]) -> bool:
        with self.lock:
            return all(
                self.workers_done(n) is not None and "Validated" in self.cond[n] and "Scheduled" in self.cond[n]
                for n in names
            )


# --------------------------------------------------------------------------- the operator process


class ProcSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True, name="proc sampler")
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float, float, int]] = []  # t, rss MiB, cpu s, threads
        self.hwm_mib = 0.0
        self._halt = threading.Event()

    def read(self) -> tuple[float, float, float, int] | None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return None
        fields = {ln.split(":")[0]: ln.split(":", 1)[1].split() for ln in status.splitlines() if ":" in ln}
        rss = int(fields["VmRSS"][0]) / 1024
        self.hwm_mib = max(self.hwm_mib, int(fields["VmHWM"][0]) / 1024)
        after = stat.rsplit(")", 1)[1].split()
        cpu = (int(after[11]) + int(after[12])) / CLK_TCK  # utime, stime
        return time.time(), rss, cpu, int(fields["Threads"][0])

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            s = self.read()
            if s:
                self.samples.append(s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2)
        s = self.read()
        if s:
            self.samples.append(s)

    def at(self, t: float) -> tuple[float, float, float, int]:
        best = self.samples[0]
        for s in self.samples:
            if s[0] <= t:
                best = s
        return best


# --------------------------------------------------------------------------- the run


#: The claim the resources write to with `--output pvc` (each into its own default subPath).
BENCH_CLAIM = "bench-runs"


def lft_body(name: str, workers: int, output: str = "s3") -> dict[str, Any]:
    where = {"pvc": {"claimName": BENCH_CLAIM}} if output == "pvc" else {"s3": {"uri": f"s3://bench/adapters/{name}"}}
    return {
        "apiVersion": "kubelora.dev/v1alpha1",
        "kind": "LoRAFineTune",
        "metadata": {"name": name},
        "spec": {
            "device": "cpu",
            "workers": workers,
            "resources": {"cpu": "1", "memory": "2Gi"},
            "data": {"path": "sample://train.jsonl"},
            "training": {"maxSteps": 20},
            "output": where,
        },
    }


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * (len(s) - 1))))
    return s[k]


def dist(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "min": round(min(values), 3),
        "p50": round(pct(values, 50), 3),
        "p90": round(pct(values, 90), 3),
        "p99": round(pct(values, 99), 3),
        "max": round(max(values), 3),
        "mean": round(statistics.fmean(values), 3),
    }


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    with contextlib.suppress(Exception):
        import kopf

        info["kopf"] = getattr(kopf, "__version__", None) or _dist_version("kopf")
    with contextlib.suppress(Exception):
        info["kubernetes_client"] = _dist_version("kubernetes")
    return info


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resources", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2, help="worker pods per resource")
    ap.add_argument("--nodes", type=int, default=0, help="fake AMX nodes (0: enough for every worker)")
    ap.add_argument("--threads", type=int, default=16, help="client threads creating resources")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--settle", type=float, default=35, help="idle seconds watched after the last resource is done")
    ap.add_argument("--idle-window", type=float, default=60, help="the settle window's last seconds counted as idle")
    ap.add_argument("--resync-seconds", type=float, default=None, help="KUBELORA_RESYNC_SECONDS (default: 30)")
    ap.add_argument("--verbose-operator", action="store_true", help="run the operator with --verbose")
    ap.add_argument(
        "--output",
        choices=("s3", "pvc"),
        default="s3",
        help="where the resources deliver: s3 (no run directory), or pvc (one ReadWriteMany claim, a run "
        "directory per resource: every start checks the namespace's run directories)",
    )
    ap.add_argument(
        "--floor",
        choices=("service", "no-service", "service-events"),
        default=None,
        help="run bench/operator_floor.py instead of the operator: the least any operator of this object "
        "model sends (its ConfigMap, Service unless no-service, pods and one status patch per resource; "
        "service-events: and the operator's two Events)",
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep-logs", type=Path, default=None, help="copy operator/audit logs to this dir")
    ap.add_argument(
        "--apiserver-profile",
        type=float,
        default=0,
        metavar="SECONDS",
        help="CPU-profile the apiserver for SECONDS from the first create (pprof beside --out)",
    )
    args = ap.parse_args()

    n, w = args.resources, args.workers
    per_node_cpu = 64
    nodes = args.nodes or max(2, -(-n * w // (per_node_cpu - 4)))
    load_before = os.getloadavg()
    bench_dir = Path(tempfile.mkdtemp(prefix="kubelora-bench-"))
    result: dict[str, Any] = {
        "benchmark": "operator_scale",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
        "machine": machine_info(),
        "params": {
            "resources": n,
            "workers_per_resource": w,
            "worker_pods_total": n * w,
            "fake_amx_nodes": nodes,
            "node_capacity": {"cpu": str(per_node_cpu), "memory": "512Gi", "pods": "250"},
            "create_threads": args.threads,
            "create_client": "one kept-alive HTTPS connection per thread",
            "resync_seconds": args.resync_seconds or 30,
            "output": args.output,
            "operator_verbose": args.verbose_operator,
            "operator": f"bench/operator_floor.py ({args.floor})" if args.floor else "python -m kubelora_operator run",
            "kubernetes": "v1.20.2 local control plane (etcd, apiserver, controller-manager, scheduler; no kubelet)",
        },
        "load_average_before": [round(x, 2) for x in load_before],
    }

    print(f"[bench] starting control plane ({bench_dir})", flush=True)
    cp = AuditedControlPlane(bench_dir)
    if args.apiserver_profile:
        cp.extra_apiserver_args.append("--profiling=true")  # the last of a repeated flag wins
    cp.start()
    op_proc: subprocess.Popen[bytes] | None = None
    watches: list[Watch] = []
    sampler: ProcSampler | None = None
    try:
        result["control_plane_start_s"] = round(cp.start_seconds or 0, 2)
        ensure_crd(cp)
        ns = "bench"
        cp.create_namespace(ns)
        if args.output == "pvc":  # a volume for the claim to bind to: pods with an unbound claim are not scheduled
            rwx = ["ReadWriteMany"]
            volume = {"capacity": {"storage": "100Gi"}, "accessModes": rwx, "nfs": {"server": "nfs.bench", "path": "/"}}
            cp.create("/api/v1/persistentvolumes", {"metadata": {"name": f"{ns}-{BENCH_CLAIM}"}, "spec": volume})
            claim = {"accessModes": rwx, "resources": {"requests": {"storage": "100Gi"}}, "storageClassName": ""}
            cp.create(f"/api/v1/namespaces/{ns}/persistentvolumeclaims", {"metadata": {"name": BENCH_CLAIM}, "spec": claim})
        for i in range(nodes):
            cp.add_fake_node(f"amx-{i}", dict(AMX_LABELS), {"cpu": str(per_node_cpu), "memory": "512Gi", "pods": "250"})
        print(f"[bench] {nodes} fake AMX nodes; starting the operator", flush=True)

        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBELORA_")}
        env.update(
            {"KUBECONFIG": str(cp.operator_kubeconfig), "PYTHONUNBUFFERED": "1", "NO_PROXY": "*", "no_proxy": "*"}
        )
        if args.resync_seconds:
            env["KUBELORA_RESYNC_SECONDS"] = str(args.resync_seconds)
        op_log = bench_dir / "operator.log"
        argv = [sys.executable, "-m", "kubelora_operator", "run", "--standalone", "--namespace", ns]
        if args.floor:
            argv = [sys.executable, str(REPO / "bench" / "operator_floor.py"), "--namespace", ns]
            argv += {"no-service": ["--no-service"], "service-events": ["--events"]}.get(args.floor, [])
        if args.verbose_operator:
            argv.append("--verbose")
        t_op = time.time()
        with op_log.open("wb") as fh:
            op_proc = subprocess.Popen(
                argv, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
            )
        sampler = ProcSampler(op_proc.pid)
        sampler.start()
        cp_samplers = {k: ProcSampler(p.pid, interval=0.5) for k, p in cp.procs.items()}
        for cs in cp_samplers.values():
            cs.start()

        # Ready = the operator listed (then watches: an idle watch reaches the audit log only when it
        # ends) both LoRAFineTunes and worker pods.
        def watching() -> bool:
            evs = read_audit(cp.audit_log)
            kinds = {(e.get("objectRef") or {}).get("resource") for e in evs if e.get("verb") in ("list", "watch")}
            return {"lorafinetunes", "pods"} <= kinds

        deadline = time.time() + 60
        while not watching():
            if op_proc.poll() is not None:
                raise RuntimeError(f"operator exited:\n{op_log.read_text()[-3000:]}")
            if time.time() > deadline:
                raise RuntimeError(f"operator not watching after 60 s:\n{op_log.read_text()[-3000:]}")
            time.sleep(0.2)
        time.sleep(2.0)
        result["operator_startup"] = {
            "seconds_to_watching": round(time.time() - t_op, 2),
            "rss_mib": round(sampler.read()[1], 1) if sampler.read() else None,  # type: ignore[index]
            "requests": len(read_audit(cp.audit_log)),
        }

        tracker = Tracker(w)
        watches = [
            Watch(cp, f"/api/v1/namespaces/{ns}/pods", {"labelSelector": LABEL_NAME}, tracker.on_pod),
            Watch(cp, f"{LFT_API}/namespaces/{ns}/lorafinetunes", {}, tracker.on_lft),
        ]
        for wt in watches:
            wt.start()
        for wt in watches:
            wt.ready.wait(10)

        names = [f"bench-{i:04d}" for i in range(n)]
        created_at: dict[str, float] = {}
        create_latency: list[float] = []
        errors: list[str] = []
        metrics_before = apiserver_requests(cp)
        load_at_start = os.getloadavg()

        poster = Poster(cp)

        def create(name: str) -> None:
            t = time.time()
            try:
                poster.post(f"{LFT_API}/namespaces/{ns}/lorafinetunes", lft_body(name, w, args.output))
            except ApiError as err:
                errors.append(f"{name}: {err}")
                return
            created_at[name] = t
            create_latency.append(time.time() - t)

        print(f"[bench] creating {n} LoRAFineTunes ({w} workers each) from {args.threads} threads", flush=True)
        profile = None
        if args.apiserver_profile:
            pprof = (args.out or bench_dir / "result.json").with_suffix(".apiserver.pprof")
            profile = ApiserverProfile(cp, args.apiserver_profile, pprof)
            profile.start()
        t0 = time.time()
        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(create, names))
        t_created = time.time()
        print(f"[bench] all created in {t_created - t0:.2f}s; waiting for workers", flush=True)

        last_report = time.time()
        while not tracker.all_done(names):
            if op_proc.poll() is not None:
                raise RuntimeError(f"operator exited:\n{op_log.read_text()[-3000:]}")
            if time.time() - t0 > args.timeout:
                break
            tracker.changed.wait(0.5)
            tracker.changed.clear()
            if time.time() - last_report > 10:
                last_report = time.time()
                with tracker.lock:
                    done = sum(1 for nm in names if tracker.workers_done(nm) is not None)
                    sched = sum(1 for nm in names if "Scheduled" in tracker.cond[nm])
                print(f"[bench] t+{time.time() - t0:.0f}s: {done}/{n} with workers, {sched}/{n} Scheduled", flush=True)
        t_done = time.time()
        timed_out = not tracker.all_done(names)
        metrics_after = apiserver_requests(cp)
        load_at_done = os.getloadavg()
        print(
            f"[bench] done after {t_done - t0:.2f}s (timed out: {timed_out}); settling {args.settle:.0f}s", flush=True
        )
        time.sleep(args.settle)
        t_end = time.time()
        sampler.stop()

        with tracker.lock:
            pods_done = {nm: tracker.workers_done(nm) for nm in names}
            first_pod = {nm: min(tracker.pods[nm].values()) for nm in names if tracker.pods.get(nm)}
            validated = {nm: tracker.cond[nm].get("Validated") for nm in names}
            scheduled = {nm: tracker.cond[nm].get("Scheduled") for nm in names}
            bound = {nm: (max(tracker.bound[nm].values()) if len(tracker.bound[nm]) >= w else None) for nm in names}

        def rel(d: dict[str, float | None], base: float) -> list[float]:
            return [v - base for v in d.values() if v is not None]

        def per_res(d: dict[str, float | None]) -> list[float]:
            return [d[nm] - created_at[nm] for nm in names if d.get(nm) is not None and nm in created_at]

        all_workers_t = max((v for v in pods_done.values() if v is not None), default=float("nan"))
        result["timings_s"] = {
            "create_all_resources": round(t_created - t0, 3),
            "create_request_latency": dist(create_latency),
            "first_create_to_all_workers_created": round(all_workers_t - t0, 3),
            "first_create_to_all_validated": round(max(rel(validated, t0), default=float("nan")), 3),
            "first_create_to_all_pods_bound": round(max(rel(bound, t0), default=float("nan")), 3),
            "first_create_to_all_scheduled_condition": round(max(rel(scheduled, t0), default=float("nan")), 3),
            "first_create_to_done": round(t_done - t0, 3),
            "per_resource_create_to_validated": dist(per_res(validated)),
            "per_resource_create_to_first_worker": dist(per_res(first_pod)),  # type: ignore[arg-type]
            "per_resource_create_to_all_workers": dist(per_res(pods_done)),
            "per_resource_create_to_scheduled_condition": dist(per_res(scheduled)),
            "workers_created_per_second": round(
                sum(len(tracker.pods[nm]) for nm in names) / max(1e-9, all_workers_t - t0), 2
            ),
        }
        result["completed"] = {
            "timed_out": timed_out,
            "resources_created": len(created_at),
            "create_errors": errors[:20],
            "with_all_workers": sum(1 for v in pods_done.values() if v is not None),
            "validated": sum(1 for v in validated.values() if v is not None),
            "scheduled": sum(1 for v in scheduled.values() if v is not None),
        }

        events = read_audit(cp.audit_log)
        idle_window = min(args.idle_window, t_end - t_done)
        ramp = summarize_requests(events, t0, t_done)
        settle = summarize_requests(events, t_done, t_end)
        result["operator_requests"] = {
            "method": (
                "apiserver audit log (Metadata level) of the operator's own static-token user; one record per "
                "request (audit ID), counted by requestReceivedTimestamp"
            ),
            "ramp_first_create_to_done": ramp,
            "ramp_per_resource": round(ramp["total"] / n, 2),
            "settle_window_s": round(t_end - t_done, 1),
            "settle": settle,
            "settle_per_resource_per_minute": round(settle["total"] / n / ((t_end - t_done) / 60), 2),
            # The settled fleet: the last `--idle-window` seconds of the settle window (the ramp's tail and
            # the first resync wave are over; at least one full resync period when settle >= 2 periods).
            "idle_window_s": idle_window,
            "idle": summarize_requests(events, t_end - idle_window, t_end),
            "idle_per_resource_per_minute": round(
                len([e for e in events if t_end - idle_window <= _ts(e["requestReceivedTimestamp"]) < t_end])
                / n
                / (idle_window / 60),
                3,
            ),
            "whole_run_total": len(events),
            "timeline_5s_buckets_from_first_create": timeline(events, t0, t_end, 5.0),
        }
        ramp = requests_delta(metrics_before, metrics_after)
        result["apiserver_request_total_delta_all_clients_during_ramp"] = ramp["total"]
        result["apiserver_requests_all_clients_during_ramp"] = ramp["by_verb_resource"]
        result["bench_watches"] = {
            wt.path.rsplit("/", 1)[-1]: {"restarts": wt.restarts, "relists": wt.relists} for wt in watches
        }

        s_start = sampler.at(t0)
        s_done = sampler.at(t_done)
        s_end = sampler.samples[-1]
        result["operator_process"] = {
            "peak_rss_mib_vmhwm": round(sampler.hwm_mib, 1),
            "rss_mib_before_first_create": round(s_start[1], 1),
            "rss_mib_at_done": round(s_done[1], 1),
            "rss_mib_at_end": round(s_end[1], 1),
            "cpu_s_startup": round(s_start[2], 2),
            "cpu_s_ramp": round(s_done[2] - s_start[2], 2),
            "cpu_s_settle": round(s_end[2] - s_done[2], 2),
            "cpu_s_per_resource_ramp": round((s_done[2] - s_start[2]) / n, 4),
            "cpu_utilisation_ramp": round((s_done[2] - s_start[2]) / max(1e-9, t_done - t0), 3),
            "threads_peak": max(s[3] for s in sampler.samples),
        }
        rss_series = [(round(s[0] - t0, 1), round(s[1], 1), round(s[2], 2)) for s in sampler.samples[::10]]
        result["operator_process"]["series_t_rss_cpu_every_2s"] = rss_series
        for cs in cp_samplers.values():
            cs.stop()
        result["control_plane_cpu_s"] = {
            k: {
                "ramp": round(cs.at(t_done)[2] - cs.at(t0)[2], 2),
                "settle": round(cs.samples[-1][2] - cs.at(t_done)[2], 2),
            }
            for k, cs in cp_samplers.items()
            if cs.samples
        }
        result["control_plane_rss_mib_at_end"] = {k: round(v, 1) for k, v in cp.rss_mib().items() if v}
        if profile is not None:
            profile.join(args.apiserver_profile + 60)
            result["apiserver_profile"] = {
                "seconds_from_first_create": args.apiserver_profile,
                "file": profile.path.name if profile.path.exists() else None,
                "binary": str(cp.bin_dir / "kube-apiserver"),
                "error": profile.error,
            }
        result["load_average_at_first_create"] = [round(x, 2) for x in load_at_start]
        result["load_average_at_done"] = [round(x, 2) for x in load_at_done]
        log_text = op_log.read_text(errors="replace")
        result["operator_log"] = {
            "lines": log_text.count("\n"),
            "errors": sum(1 for ln in log_text.splitlines() if " ERROR" in ln or "Traceback" in ln),
            "warnings": sum(1 for ln in log_text.splitlines() if "WARNING" in ln),
            "sample_problems": [ln[:300] for ln in log_text.splitlines() if "ERROR" in ln or "WARNING" in ln][:10],
        }
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for f in (op_log, cp.audit_log):
                with contextlib.suppress(OSError):
                    (args.keep_logs / f.name).write_bytes(f.read_bytes())
    finally:
        for wt in watches:
            wt.stop()
        if sampler is not None:
            sampler._halt.set()
        if op_proc is not None and op_proc.poll() is None:
            os.killpg(op_proc.pid, signal.SIGTERM)
            try:
                op_proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(op_proc.pid, signal.SIGKILL)
        cp.stop()

    out = args.out or REPO / "bench" / "results" / f"operator-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    t = result["timings_s"]
    r = result["operator_requests"]
    p = result["operator_process"]
    print(
        json.dumps(
            {
                "resources": n,
                "first_create_to_all_workers_created_s": t["first_create_to_all_workers_created"],
                "first_create_to_all_scheduled_condition_s": t["first_create_to_all_scheduled_condition"],
                "requests_per_resource_ramp": r["ramp_per_resource"],
                "ramp_requests_by_kind": r["ramp_first_create_to_done"]["by_verb_resource"],
                "settle_requests_per_resource_per_minute": r["settle_per_resource_per_minute"],
                "idle_requests_per_resource_per_minute": r["idle_per_resource_per_minute"],
                "peak_rss_mib": p["peak_rss_mib_vmhwm"],
                "cpu_s_ramp": p["cpu_s_ramp"],
                "completed": result["completed"],
                "load_average_at_done": result["load_average_at_done"],
            },
            indent=2,
        )
    )
    print(f"[bench] wrote {out}")
    return 0 if not result["completed"]["timed_out"] else 1


if __name__ == "__main__":
    sys.exit(main())
