"""Helpers of the operator's integration tests: the CRD, the operator process, fake nodes, a fake kubelet.

The control plane (tests/cluster) has no kubelet: tests play it here by patching pod status
(`run_pod`, `terminate_pod`), and `FakeKubelet` confirms graceful deletions (a bound pod that is
deleted stays Terminating until its kubelet says it is gone).

Isolation: nodes are cluster-wide and the control plane is shared by the whole session, so every
test puts its fake nodes in a pool of its own (label `kubelora-test/pool=<unique>`) and its
resources select that pool through `spec.placement.nodeSelector`.

Over 400 lines on purpose: the one toolkit of every operator integration module, so that they all
play the kubelet, start the operator and isolate their nodes the same way.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.controlplane import ApiError, ControlPlane, free_ports

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "lorafinetunes.kubelora.dev.yaml"
LFT_API = "/apis/kubelora.dev/v1alpha1"
POOL_LABEL = "kubelora-test/pool"
GPU_LABELS = {
    "intel.feature.node.kubernetes.io/gpu": "true",
    "feature.node.kubernetes.io/pci-0300_8086.present": "true",
}
AMX_LABELS = {
    "feature.node.kubernetes.io/cpu-cpuid.AMXBF16": "true",
    "feature.node.kubernetes.io/cpu-cpuid.AMXTILE": "true",
}


def uid() -> str:
    return uuid.uuid4().hex[:6]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------- CRD


def ensure_crd(cp: ControlPlane) -> dict[str, Any]:
    """Apply the committed CRD (idempotent) and wait until the server serves the kind."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    with contextlib.suppress(ApiError):
        cp.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    name = crd["metadata"]["name"]

    def established() -> dict[str, Any] | None:
        got = cp.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        conds = {c["type"]: c["status"] for c in (got.get("status") or {}).get("conditions") or []}
        return got if conds.get("Established") == "True" else None

    got = cp.wait_for(established, timeout=30, what="CRD Established")
    cp.wait_for(lambda: cp.get(LFT_API), timeout=30, what="kubelora.dev/v1alpha1 served")
    return got


# --------------------------------------------------------------------------- resources


def lft_spec(pool: str, **over: Any) -> dict[str, Any]:
    """A valid spec (S3 output: no PVC to bind) placed in the test's node pool."""
    spec: dict[str, Any] = {
        "data": {"path": "sample://train.jsonl"},
        "training": {"maxSteps": 20},
        "output": {"s3": {"uri": "s3://bucket/runs/test"}},
        "placement": {"nodeSelector": {POOL_LABEL: pool}},
        "resources": {"gpus": 1, "cpu": "2", "memory": "4Gi"},
    }
    for key, value in over.items():
        if key in ("placement", "resources") and isinstance(value, dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = copy.deepcopy(value)
    return spec


def create_lft(cp: ControlPlane, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    body = {"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRAFineTune", "metadata": {"name": name}, "spec": spec}
    return cp.create(f"{LFT_API}/namespaces/{ns}/lorafinetunes", body)


def get_lft(cp: ControlPlane, ns: str, name: str) -> dict[str, Any]:
    return cp.get(f"{LFT_API}/namespaces/{ns}/lorafinetunes/{name}")


def patch_spec(cp: ControlPlane, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return cp.merge_patch(f"{LFT_API}/namespaces/{ns}/lorafinetunes/{name}", {"spec": spec})


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


def wait_condition(
    cp: ControlPlane,
    ns: str,
    name: str,
    type_: str,
    status: str = "True",
    reason: str | None = None,
    timeout: float = 30,
    contains: str | None = None,
) -> dict[str, Any]:
    """Wait until the resource has the condition; returns the resource."""

    def check() -> dict[str, Any] | None:
        obj = get_lft(cp, ns, name)
        cond = condition(obj, type_)
        if (
            cond
            and cond["status"] == status
            and (reason is None or cond["reason"] == reason)
            and (contains is None or contains in (cond.get("message") or ""))
        ):
            return obj
        return None

    try:
        return cp.wait_for(check, timeout=timeout, what=f"{name}: {type_}={status} {reason or ''}")
    except TimeoutError as err:
        obj = get_lft(cp, ns, name)
        raise AssertionError(f"{err}; status now: {obj.get('status')}") from None


def pods(cp: ControlPlane, ns: str, name: str) -> list[dict[str, Any]]:
    items = cp.get(f"/api/v1/namespaces/{ns}/pods", params={"labelSelector": f"kubelora.dev/name={name}"})["items"]
    return sorted(items, key=lambda p: p["metadata"]["name"])


def live_pods(cp: ControlPlane, ns: str, name: str) -> list[dict[str, Any]]:
    return [p for p in pods(cp, ns, name) if not p["metadata"].get("deletionTimestamp")]


def wait_pods(
    cp: ControlPlane, ns: str, name: str, n: int, pred: Callable[[dict], bool] = lambda p: True, timeout: float = 30
) -> list[dict]:
    def check() -> list[dict] | None:
        got = [p for p in live_pods(cp, ns, name) if pred(p)]
        return got if len(got) == n else None

    return cp.wait_for(check, timeout=timeout, what=f"{n} pods of {name}")


def events(cp: ControlPlane, ns: str, name: str) -> list[dict[str, Any]]:
    items = cp.get(f"/api/v1/namespaces/{ns}/events")["items"]
    return [
        e
        for e in items
        if e["involvedObject"].get("name") == name and e["involvedObject"].get("kind") == "LoRAFineTune"
    ]


def wait_events(
    cp: ControlPlane,
    ns: str,
    name: str,
    *reasons: str,
    pred: Callable[[list[dict[str, Any]]], bool] | None = None,
    timeout: float = 15,
) -> list[dict[str, Any]]:
    """The resource's Events once every reason (and `pred`) is there: Events follow the status patch."""

    def check() -> list[dict[str, Any]] | None:
        evs = events(cp, ns, name)
        have = {e["reason"] for e in evs}
        return evs if set(reasons) <= have and (pred is None or pred(evs)) else None

    return cp.wait_for(check, timeout=timeout, what=f"events {reasons} of {name}")


# --------------------------------------------------------------------------- nodes


def add_gpu_node(cp: ControlPlane, name: str, pool: str, gpus: int = 2) -> dict[str, Any]:
    return cp.add_fake_node(name, {**GPU_LABELS, POOL_LABEL: pool}, {"gpu.intel.com/i915": str(gpus)})


def add_amx_node(cp: ControlPlane, name: str, pool: str, cpu: str = "16") -> dict[str, Any]:
    return cp.add_fake_node(name, {**AMX_LABELS, POOL_LABEL: pool}, {"cpu": cpu, "memory": "64Gi"})


# --------------------------------------------------------------------------- the kubelet's part


def _container_status(pod: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    c = pod["spec"]["containers"][0]
    return {
        "name": c["name"],
        "image": c["image"],
        "imageID": "fake://" + c["image"],
        "containerID": "fake://" + pod["metadata"]["uid"],
        "ready": "running" in state,
        "started": "running" in state,
        "restartCount": 0,
        "state": state,
    }


def run_pod(cp: ControlPlane, ns: str, pod_name: str, ip: str = "127.0.0.1") -> dict[str, Any]:
    """Mark a bound pod Running with `ip`."""
    pod = cp.get(f"/api/v1/namespaces/{ns}/pods/{pod_name}")
    assert pod["spec"].get("nodeName"), f"{pod_name} is not bound"
    status = {
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": now(),
        "conditions": [
            {"type": "Initialized", "status": "True", "lastTransitionTime": now()},
            {"type": "Ready", "status": "True", "lastTransitionTime": now()},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": now()},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()},
        ],
        "containerStatuses": [_container_status(pod, {"running": {"startedAt": now()}})],
    }
    return cp.merge_patch(f"/api/v1/namespaces/{ns}/pods/{pod_name}/status", {"status": status})


def terminate_pod(
    cp: ControlPlane, ns: str, pod_name: str, exit_code: int, message: str | None = None
) -> dict[str, Any]:
    """The trainer container exited: phase Succeeded (0) or Failed, with a termination message."""
    pod = cp.get(f"/api/v1/namespaces/{ns}/pods/{pod_name}")
    term: dict[str, Any] = {
        "exitCode": exit_code,
        "reason": "Completed" if exit_code == 0 else "Error",
        "startedAt": now(),
        "finishedAt": now(),
        "containerID": "fake://" + pod["metadata"]["uid"],
    }
    if message:
        term["message"] = message
    status = {
        "phase": "Succeeded" if exit_code == 0 else "Failed",
        "containerStatuses": [_container_status(pod, {"terminated": term})],
    }
    return cp.merge_patch(f"/api/v1/namespaces/{ns}/pods/{pod_name}/status", {"status": status})


class FakeKubelet:
    """Confirms graceful pod deletions in a namespace (force-deletes pods that have a deletionTimestamp)."""

    def __init__(self, cp: ControlPlane, ns: str, interval: float = 0.3) -> None:
        self.cp, self.ns, self.interval = cp, ns, interval
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name=f"fake-kubelet-{ns}")
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                for pod in self.cp.get(f"/api/v1/namespaces/{self.ns}/pods")["items"]:
                    if pod["metadata"].get("deletionTimestamp"):
                        self.cp.delete(
                            f"/api/v1/namespaces/{self.ns}/pods/{pod['metadata']['name']}",
                            {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0},
                        )

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)


# --------------------------------------------------------------------------- the operator process


def operator_env(cp: ControlPlane, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBELORA_")}
    env.update(cp.env())
    env.update(
        {
            "KUBELORA_RESYNC_SECONDS": "1",
            "KUBELORA_PROGRESS_SECONDS": "0.5",
            "KUBELORA_SCRAPE_TIMEOUT_SECONDS": "1",
            "PYTHONUNBUFFERED": "1",
            "NO_PROXY": "*",
            "no_proxy": "*",
        }
    )
    env.update(extra)
    return env


class OperatorProcess:
    """`python -m kubelora_operator run --standalone --namespace NS` as a subprocess, logging to a file."""

    def __init__(self, cp: ControlPlane, ns: str, log_dir: Path, **env: str) -> None:
        self.cp, self.ns = cp, ns
        self.env = operator_env(cp, **env)
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.starts = 0

    def start(self, *args: str, **env: str) -> OperatorProcess:
        self.starts += 1
        self.log_path = self.log_dir / f"operator-{self.ns}-{self.starts}.log"
        fh = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kubelora_operator",
                "run",
                "--standalone",
                "--namespace",
                self.ns,
                "--verbose",
                *args,
            ],
            env={**self.env, **env},
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
        fh.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind (a crash)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def assert_alive(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, f"operator exited:\n{self.log_tail()}"


def release_lfts(cp: ControlPlane, ns: str) -> None:
    """Drop finalizers of the namespace's resources (the operator is gone) so the namespace can go."""
    with contextlib.suppress(ApiError):
        for obj in cp.get(f"{LFT_API}/namespaces/{ns}/lorafinetunes")["items"]:
            name = obj["metadata"]["name"]
            with contextlib.suppress(ApiError):
                cp.merge_patch(f"{LFT_API}/namespaces/{ns}/lorafinetunes/{name}", {"metadata": {"finalizers": None}})


@contextlib.contextmanager
def operator_in_namespace(
    cp: ControlPlane, log_dir: Path, **env: str
) -> Iterator[tuple[str, OperatorProcess, FakeKubelet]]:
    """A fresh namespace with the operator watching it and a fake kubelet; everything removed after."""
    ensure_crd(cp)
    ns = f"lft-{uid()}"
    cp.create_namespace(ns)
    op = OperatorProcess(cp, ns, log_dir, **env).start()
    kubelet = FakeKubelet(cp, ns)
    try:
        yield ns, op, kubelet
    finally:
        op.stop()
        kubelet.stop()
        release_lfts(cp, ns)
        with contextlib.suppress(ApiError):
            cp.delete_namespace(ns)


def free_port() -> int:
    return free_ports(1)[0]


class Env:
    """A module's operator and its namespace, as the integration tests' `env` fixtures yield them."""

    def __init__(self, cp: ControlPlane, ns: str, op: OperatorProcess) -> None:
        self.cp, self.ns, self.op = cp, ns, op


@contextlib.contextmanager
def operator_env_in_namespace(cp: ControlPlane, log_dir: Path, **extra: str) -> Iterator[Env]:
    """`operator_in_namespace` as one `Env` (what a module-scoped `env` fixture yields)."""
    with operator_in_namespace(cp, log_dir, **extra) as (ns, op, _):
        yield Env(cp, ns, op)


def show_operator_log(env: Env) -> None:
    """After a test: print the operator's log tail (pytest shows it on failure) and check it still runs."""
    print(f"--- operator log {env.op.log_path} ---\n{env.op.log_tail(150)}")
    env.op.assert_alive()
