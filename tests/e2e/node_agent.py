"""A test-only node agent that plays the kubelet for fake Nodes: it runs pods as local processes.

The local control plane (tests/cluster) has no kubelet. This agent watches (polls) the pods that the
real scheduler bound to its nodes (`spec.nodeName`) and, for each, runs the first container's
command + args as a LOCAL PROCESS (own process group), then reports pod status back through the API
(status subresource): Running (podIP 127.0.0.1, startTime, containerStatuses running) and at exit
Succeeded/Failed with `state.terminated {exitCode, reason, message}`, the message being the content of
the container's terminationMessagePath (default /dev/termination-log, mapped to a per-pod file; the
trainer honours KUBELORA_TERMINATION_LOG, which the agent sets).

Processes cannot mount, so mounts become directories and absolute mount paths are REWRITTEN:

* volumes: configMap -> files from the ConfigMap's data (text rewritten too: the trainer config
  inside names /output), secret -> files, emptyDir -> a directory per pod, persistentVolumeClaim ->
  the bound PV's hostPath/local path (else `<root>/pvcs/<namespace>/<claim>`), + subPath; hostPath ->
  that path.
* every absolute mount path at the start of a path in the command, args, env values, workingDir and
  ConfigMap files is replaced by its local directory (`/etc/kubelora` -> `<root>/pods/<pod>/...`).
* cluster DNS names (`*.svc`, `*.svc.cluster.local`) -> 127.0.0.1: all pods run on this machine.
* `python`, `torchrun`, ... resolve to this interpreter's environment: its bin dir is first on PATH.

Env: `value` (with `$(VAR)` expansion), `valueFrom.secretKeyRef` / `configMapKeyRef` (read through
the API), `fieldRef` (metadata.name/namespace/uid, spec.nodeName, status.podIP/hostIP ->
127.0.0.1). Ports are not remapped: run one job at a time per distinct port (the e2e tests start the
operator with free KUBELORA_MASTER_PORT / KUBELORA_METRICS_PORT, and it scrapes 127.0.0.1:<port>).

Deletion: a pod with a deletionTimestamp gets SIGTERM to its process group, SIGKILL after its grace
period, and once the process is gone the agent confirms with a delete of gracePeriodSeconds=0 (what a
kubelet does; without it the pod would stay Terminating forever).

In a test: ``NodeAgent(api, ["n1", "n2"], root).start()`` ... ``.stop()`` (thread), or from a shell:
``python -m tests.e2e.node_agent --kubeconfig K --nodes n1,n2 --root DIR``.

Over 400 lines on purpose: it is one kubelet stand-in (pod lifecycle, volume and path rewriting,
env resolution, deletion), whose parts all act on the same running pod.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("node-agent")

POD_IP = "127.0.0.1"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
_DNS_NAME = re.compile(r"(?<![\w.\-/@])[a-z0-9]([-a-z0-9.]*[a-z0-9])?\.svc(\.cluster\.local)?(?![\w\-])")
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------- a minimal API client


class ApiError(RuntimeError):
    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        self.status = status
        super().__init__(f"{method} {path}: HTTP {status}: {body[:300]}")


class Api:
    """JSON calls to an apiserver with a bearer token (stdlib only)."""

    def __init__(self, server: str, token: str, ca_file: str | None = None, ca_data: bytes | None = None) -> None:
        self.server, self.token = server.rstrip("/"), token
        if ca_data is not None:
            self._ssl = ssl.create_default_context(cadata=ca_data.decode())
        elif ca_file:
            self._ssl = ssl.create_default_context(cafile=ca_file)
        else:
            self._ssl = ssl.create_default_context()

    @classmethod
    def from_kubeconfig(cls, path: str | Path) -> Api:
        import yaml

        cfg = yaml.safe_load(Path(path).read_text())
        ctx_name = cfg.get("current-context")
        ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
        ca_data = cluster.get("certificate-authority-data")
        return cls(
            cluster["server"],
            user["token"],
            ca_file=cluster.get("certificate-authority"),
            ca_data=base64.b64decode(ca_data) if ca_data else None,
        )

    def request(self, method: str, path: str, body: Any = None, *, params: dict | None = None,
                content_type: str = "application/json", timeout: float = 30) -> Any:
        url = self.server + path + ("?" + urllib.parse.urlencode(params) if params else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise ApiError(method, path, e.code, e.read().decode(errors="replace")) from None
        return json.loads(raw) if raw else None

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def patch_status(self, ns: str, name: str, status: dict[str, Any]) -> Any:
        return self.request("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": status},
                            content_type="application/merge-patch+json")


# --------------------------------------------------------------------------- one pod


@dataclass
class PodRun:
    """The agent's record of one pod (by uid)."""

    ns: str
    name: str
    uid: str
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    started_at: str | None = None
    exit_code: int | None = None
    reported: bool = False
    deleting: bool = False
    confirmed: bool = False
    error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _die_with_parent() -> None:  # between fork and exec: die when the agent's process dies
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


class NodeAgent:
    """Plays the kubelet for `nodes`: runs bound pods as processes under `root`."""

    def __init__(
        self,
        api: Api | Any,
        nodes: list[str],
        root: Path | str,
        *,
        interval: float = 0.5,
        extra_env: dict[str, str] | None = None,
        pvc_dirs: dict[str, str] | None = None,
    ) -> None:
        self.api = api
        self.nodes = list(nodes)
        self.root = Path(root)
        self.interval = interval
        self.extra_env = dict(extra_env or {})
        self.pvc_dirs = dict(pvc_dirs or {})  # "ns/claim" or "claim" -> local dir (overrides the PV)
        self.runs: dict[str, PodRun] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.bin_dir = str(Path(sys.executable).parent)
        (self.root / "pods").mkdir(parents=True, exist_ok=True)

    # ----- lifecycle

    def start(self) -> NodeAgent:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="node-agent")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for run in list(self.runs.values()):
            self._kill(run, grace=2)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as e:  # the API may be briefly unavailable; keep going
                log.warning("sync failed: %s", e)
            self._stop.wait(self.interval)

    # ----- what tests use

    def run_for(self, ns: str, name: str) -> PodRun | None:
        """The newest run of pod ns/name."""
        found = [r for r in self.runs.values() if r.ns == ns and r.name == name]
        return found[-1] if found else None

    def signal_pod(self, ns: str, name: str, sig: int = signal.SIGKILL) -> bool:
        """Send `sig` to the whole process group of the pod's container (a crash when SIGKILL)."""
        run = self.run_for(ns, name)
        if run is None or run.proc is None or run.proc.poll() is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.proc.pid, sig)
        return True

    # ----- one pass

    def sync(self) -> None:
        seen: set[str] = set()
        for node in self.nodes:
            items = self.api.get("/api/v1/pods", params={"fieldSelector": f"spec.nodeName={node}"})["items"]
            for pod in items:
                uid = pod["metadata"]["uid"]
                seen.add(uid)
                self._handle(pod)
        for uid, run in list(self.runs.items()):  # gone from the API: make sure nothing is left running
            if uid not in seen and run.proc is not None and run.proc.poll() is None:
                self._kill(run, grace=2)

    def _handle(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        run = self.runs.get(uid)
        if meta.get("deletionTimestamp"):
            if run is None:
                run = self.runs[uid] = PodRun(meta["namespace"], meta["name"], uid, self._pod_dir(pod))
            if not run.deleting:
                run.deleting = True
                grace = meta.get("deletionGracePeriodSeconds")
                if grace is None:
                    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
                threading.Thread(target=self._terminate_and_confirm, args=(run, float(grace)), daemon=True).start()
            return
        if run is not None:
            return
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            return  # finished before this agent started: leave it
        run = self.runs[uid] = PodRun(meta["namespace"], meta["name"], uid, self._pod_dir(pod))
        threading.Thread(target=self._run_pod, args=(run, pod), daemon=True, name=f"pod-{meta['name']}").start()

    def _pod_dir(self, pod: dict[str, Any]) -> Path:
        m = pod["metadata"]
        return self.root / "pods" / f"{m['namespace']}_{m['name']}_{m['uid'][:8]}"

    # ----- running

    def _run_pod(self, run: PodRun, pod: dict[str, Any]) -> None:
        container = pod["spec"]["containers"][0]
        try:
            with run.lock:
                if run.deleting:
                    return
                argv, env, cwd, term_file = self._prepare(run, pod, container)
                run.log_path = run.dir / "container.log"
                with open(run.log_path, "wb") as logf:
                    run.proc = subprocess.Popen(
                        argv,
                        env=env,
                        cwd=cwd,
                        stdout=logf,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                    )
                run.started_at = _now()
            self._report_running(run, pod, container)
        except Exception as e:
            run.error = f"{type(e).__name__}: {e}"
            log.exception("pod %s/%s could not start", run.ns, run.name)
            run.exit_code = 128
            self._report_terminated(run, pod, container, message=run.error, reason="StartError")
            return
        code = run.proc.wait()
        run.exit_code = code if code >= 0 else 128 - code
        if run.deleting:
            return  # the deletion path confirms; no status for a pod that is going away
        message = self._termination_message(container, term_file, run)
        self._report_terminated(run, pod, container, message=message)

    def _prepare(
        self, run: PodRun, pod: dict[str, Any], container: dict[str, Any]
    ) -> tuple[list[str], dict[str, str], str, Path]:
        ns = run.ns
        run.dir.mkdir(parents=True, exist_ok=True)
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        mounts: dict[str, str] = {}
        # Volume sources first (their local dirs), then each mount (+ subPath).
        sources: dict[str, Path] = {}
        cm_files: list[tuple[Path, str]] = []
        for mount in container.get("volumeMounts") or []:
            vol = volumes[mount["name"]]
            if mount["name"] not in sources:
                sources[mount["name"]] = self._volume_dir(run, pod, vol, cm_files)
            local = sources[mount["name"]]
            if mount.get("subPath"):
                local = local / mount["subPath"]
                local.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"].rstrip("/") or "/"] = str(local)
        term_path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
        term_file = run.dir / "termination-log"
        term_file.write_text("")
        mounts[term_path] = str(term_file)
        rewrite = self._rewriter(mounts)
        for path, text in cm_files:  # ConfigMap texts may name mount paths (the trainer config: /output)
            path.write_text(rewrite(text))

        env: dict[str, str] = {
            "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOSTNAME": pod["spec"].get("hostname") or pod["metadata"]["name"],
            "VIRTUAL_ENV": str(Path(self.bin_dir).parent),
            "NO_PROXY": "*",
            "no_proxy": "*",
            **self.extra_env,
        }
        for var in container.get("env") or []:
            if "value" in var:
                value = _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), var["value"])
            elif "valueFrom" in var:
                value = self._value_from(ns, pod, var["valueFrom"])
                if value is None:
                    continue
            else:
                value = ""
            env[var["name"]] = rewrite(value)
        env["KUBELORA_TERMINATION_LOG"] = str(term_file)
        argv = [rewrite(a) for a in (container.get("command") or []) + (container.get("args") or [])]
        if not argv:
            raise RuntimeError("container has no command: the agent cannot run an image's entrypoint")
        cwd = rewrite(container.get("workingDir") or str(run.dir))
        Path(cwd).mkdir(parents=True, exist_ok=True)
        (run.dir / "mounts.json").write_text(json.dumps(mounts, indent=1))
        return argv, env, cwd, term_file

    def _rewriter(self, mounts: dict[str, str]) -> Any:
        paths = sorted(mounts, key=len, reverse=True)
        pat = re.compile(r"(?<![\w.\-/])(" + "|".join(re.escape(p) for p in paths) + r")(?![\w.\-])")

        def rewrite(text: str) -> str:
            text = pat.sub(lambda m: mounts[m.group(1)], text)
            return _DNS_NAME.sub(POD_IP, text)

        return rewrite

    def _volume_dir(self, run: PodRun, pod: dict[str, Any], vol: dict[str, Any], cm_files: list) -> Path:
        ns, name = run.ns, vol["name"]
        d = run.dir / "volumes" / name
        if "emptyDir" in vol:
            d.mkdir(parents=True, exist_ok=True)
            return d
        if "configMap" in vol or "secret" in vol:
            d.mkdir(parents=True, exist_ok=True)
            if "configMap" in vol:
                src = vol["configMap"]
                obj = self.api.get(f"/api/v1/namespaces/{ns}/configmaps/{src['name']}")
                data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
                data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
                texts = set(obj.get("data") or {})
            else:
                src = vol["secret"]
                obj = self.api.get(f"/api/v1/namespaces/{ns}/secrets/{src['secretName']}")
                data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
                texts = set()
            items = src.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                f = d / item["path"]
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(data[item["key"]])
                if item["key"] in texts:
                    cm_files.append((f, data[item["key"]].decode()))
            return d
        if "persistentVolumeClaim" in vol:
            return self._claim_dir(ns, vol["persistentVolumeClaim"]["claimName"])
        if "hostPath" in vol:
            return Path(vol["hostPath"]["path"])
        raise RuntimeError(f"volume {name}: unsupported source {sorted(vol)}")

    def _claim_dir(self, ns: str, claim: str) -> Path:
        for key in (f"{ns}/{claim}", claim):
            if key in self.pvc_dirs:
                return Path(self.pvc_dirs[key])
        pvc = self.api.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{claim}")
        pv_name = (pvc.get("spec") or {}).get("volumeName")
        if pv_name:
            pv = self.api.get(f"/api/v1/persistentvolumes/{pv_name}")["spec"]
            for kind in ("hostPath", "local"):
                if kind in pv:
                    p = Path(pv[kind]["path"])
                    p.mkdir(parents=True, exist_ok=True)
                    return p
        d = self.root / "pvcs" / ns / claim
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _value_from(self, ns: str, pod: dict[str, Any], src: dict[str, Any]) -> str | None:
        for kind, res in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
            if kind in src:
                ref = src[kind]
                try:
                    obj = self.api.get(f"/api/v1/namespaces/{ns}/{res}/{ref['name']}")
                except ApiError as e:
                    if e.status == 404 and ref.get("optional"):
                        return None
                    raise
                if res == "secrets":
                    raw = (obj.get("data") or {}).get(ref["key"])
                    value = base64.b64decode(raw).decode() if raw is not None else None
                else:
                    value = (obj.get("data") or {}).get(ref["key"])
                if value is None and not ref.get("optional"):
                    raise RuntimeError(f"{kind} {ref['name']}/{ref['key']} not found")
                return value
        if "fieldRef" in src:
            fp = src["fieldRef"]["fieldPath"]
            meta = pod["metadata"]
            known = {
                "metadata.name": meta["name"],
                "metadata.namespace": meta["namespace"],
                "metadata.uid": meta["uid"],
                "spec.nodeName": pod["spec"].get("nodeName", ""),
                "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
                "status.podIP": POD_IP,
                "status.hostIP": POD_IP,
            }
            m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", fp)
            if m:
                return (meta.get(m.group(1)) or {}).get(m.group(2), "")
            return known.get(fp, "")
        if "resourceFieldRef" in src:
            return "1"
        return None

    def _termination_message(self, container: dict[str, Any], term_file: Path, run: PodRun) -> str:
        with contextlib.suppress(OSError):
            msg = term_file.read_text(errors="replace")[:4096]
            if msg.strip():
                return msg
        if run.exit_code and container.get("terminationMessagePolicy") == "FallbackToLogsOnError" and run.log_path:
            with contextlib.suppress(OSError):
                lines = run.log_path.read_text(errors="replace").splitlines()[-80:]
                return "\n".join(lines)[-2048:]
        return ""

    # ----- status

    def _container_status(self, run: PodRun, container: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "local://" + container.get("image", ""),
            "containerID": f"local://{run.uid}",
            "ready": "running" in state,
            "started": "running" in state,
            "restartCount": 0,
            "state": state,
        }

    def _report_running(self, run: PodRun, pod: dict[str, Any], container: dict[str, Any]) -> None:
        now = _now()
        status = {
            "phase": "Running",
            "hostIP": POD_IP,
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": now,
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": now}
                for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
            ],
            "containerStatuses": [self._container_status(run, container, {"running": {"startedAt": run.started_at}})],
        }
        with contextlib.suppress(ApiError):
            self.api.patch_status(run.ns, run.name, status)

    def _report_terminated(
        self, run: PodRun, pod: dict[str, Any], container: dict[str, Any], *, message: str, reason: str | None = None
    ) -> None:
        code = run.exit_code if run.exit_code is not None else 128
        term: dict[str, Any] = {
            "exitCode": code,
            "reason": reason or ("Completed" if code == 0 else "Error"),
            "startedAt": run.started_at or _now(),
            "finishedAt": _now(),
            "containerID": f"local://{run.uid}",
        }
        if message:
            term["message"] = message
        now = _now()
        status = {
            "phase": "Succeeded" if code == 0 else "Failed",
            "conditions": [
                {"type": t, "status": "False", "lastTransitionTime": now, "reason": "PodCompleted"}
                for t in ("Ready", "ContainersReady")
            ],
            "containerStatuses": [self._container_status(run, container, {"terminated": term})],
        }
        with contextlib.suppress(ApiError):
            self.api.patch_status(run.ns, run.name, status)
        run.reported = True

    # ----- deletion

    def _kill(self, run: PodRun, grace: float) -> None:
        proc = run.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # sweep the group (torchrun children)
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def _terminate_and_confirm(self, run: PodRun, grace: float) -> None:
        with run.lock:  # never races a start in progress
            pass
        self._kill(run, grace)
        with contextlib.suppress(ApiError):
            self.api.request(
                "DELETE",
                f"/api/v1/namespaces/{run.ns}/pods/{run.name}",
                {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                 "preconditions": {"uid": run.uid}},
            )
        run.confirmed = True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run pods bound to fake nodes as local processes.")
    ap.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    ap.add_argument("--nodes", required=True, help="comma-separated node names")
    ap.add_argument("--root", default=None, help="work dir (default: a temp dir)")
    ap.add_argument("--pvc-dir", action="append", default=[], metavar="[NS/]CLAIM=DIR")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s node-agent %(message)s")
    root = Path(a.root or tempfile.mkdtemp(prefix="kubelora-node-agent-"))
    pvc_dirs = dict(item.split("=", 1) for item in a.pvc_dir)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    agent = NodeAgent(Api.from_kubeconfig(a.kubeconfig), a.nodes.split(","), root, pvc_dirs=pvc_dirs).start()
    print(f"node agent for {a.nodes} in {root}", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        agent.stop()
        if not a.root:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
