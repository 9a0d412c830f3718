"""What the real-node runs share (tests/realnode/e2e.py, faults.py): the cluster they start, named checks,
the example cut to one 2-core node, and waits and reads against the API and the bucket.

Test scaffolding: everything here needs root and a Docker engine (scripts/docker-engine.sh).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.controlplane import ControlPlane, find_tool
from tests.cluster.dns import ClusterDNS
from tests.cluster.node import RealNode
from tests.s3server import S3Server

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubelora"
SCRIPTS = ROOT / "scripts"
EXAMPLE = ROOT / "examples" / "local" / "two-workers-s3.yaml"
RELEASE, OPERATOR_NS, NS = "kubelora", "kubelora-system", "e2e"
LFT_API = "/apis/kubelora.dev/v1alpha1"


def say(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class PodReachableS3(S3Server):
    """SeaweedFS listening on all addresses and advertising ``address``: pods reach it there (the base
    class binds 127.0.0.1, which a pod's network namespace cannot reach)."""

    def __init__(self, root: Path, address: str) -> None:
        super().__init__(root)
        self.address = address

    @property
    def endpoint(self) -> str:
        return f"http://{self.address}:{self.ports['s3']}"

    def _command(self) -> list[str]:
        swap = {"-ip=127.0.0.1": f"-ip={self.address}", "-ip.bind=127.0.0.1": "-ip.bind=0.0.0.0"}
        return [swap.get(arg, arg) for arg in super()._command()]


class Checks:
    """Named pass/fail results; a check that raises counts as failed with the error as its reason."""

    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []

    def check(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
            self.results.append((name, False, f"{type(e).__name__}: {e}"))
            say(f"FAIL {name}: {type(e).__name__}: {e}")
            return None
        self.results.append((name, True, ""))
        say(f"ok   {name}")
        return value

    def fail(self, name: str, why: str) -> None:
        self.results.append((name, False, why))
        say(f"FAIL {name}: {why}")

    @property
    def failed(self) -> int:
        return sum(not ok for _, ok, _ in self.results)

    def summary(self) -> str:
        return f"{len(self.results) - self.failed} passed, {self.failed} failed"


def run(argv: list[str], env: dict[str, str] | None = None, stdin: str | None = None) -> str:
    """Run a command; its stdout, or a RuntimeError with its output."""
    proc = subprocess.run(argv, capture_output=True, text=True, input=stdin, env={**os.environ, **(env or {})})
    if proc.returncode:
        raise RuntimeError(
            f"{' '.join(argv[:4])} ... exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
    return proc.stdout


class Cluster:
    """Everything the run starts, in start order; ``teardown()`` stops each that started."""

    def __init__(self, work: Path, address: str):
        self.work, self.address = work, address
        self.cp = ControlPlane(serve_pods_at=address)
        self.node: RealNode | None = None
        self.dns: ClusterDNS | None = None
        self.s3: PodReachableS3 | None = None
        self.helm_installed = False

    def env(self) -> dict[str, str]:
        helm_home = self.work / "helm"
        return {
            **self.cp.env(),
            "HELM_CACHE_HOME": str(helm_home / "cache"),
            "HELM_CONFIG_HOME": str(helm_home / "config"),
            "HELM_DATA_HOME": str(helm_home / "data"),
        }

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return run([str(find_tool("kubectl")), *args], env=self.env(), stdin=stdin)

    def helm(self, *args: str) -> str:
        return run([str(find_tool("helm")), *args], env=self.env())

    def start(self, tag: str) -> str:
        """Control plane, real node (labelled as an AMX node: the placement is what is tested, not the
        CPU), SeaweedFS reachable from pods, `helm install` of the chart with the images tagged ``tag``,
        cluster DNS, the run namespace. Returns the bucket the runs write to."""
        values = chart_values()
        self.cp.start()
        node = self.node = RealNode(self.cp, self.address)
        node.start()
        say(f"node {node.name} Ready at {self.address}")
        s3 = self.s3 = PodReachableS3(self.work / "s3", self.address)
        s3.start()
        bucket = s3.create_bucket()
        key, _, value = str(values["settings"]["amxNodeLabel"]).partition("=")
        self.cp.merge_patch(f"/api/v1/nodes/{node.name}", {"metadata": {"labels": {key: value or "true"}}})
        self.helm_installed = True
        self.helm(
            "install", RELEASE, str(CHART), "--namespace", OPERATOR_NS, "--create-namespace", "--wait",
            "--timeout", "5m", "--set", "image.repository=kubelora/operator", "--set", f"image.tag={tag}",
            "--set", "image.pullPolicy=IfNotPresent", "--set", f"settings.cpuImage=kubelora/trainer-cpu:{tag}",
            "--set", "settings.imagePullPolicy=IfNotPresent",
        )  # fmt: skip
        say("helm install: operator Deployment ready")
        # the CNI bridge exists now (the operator pod made it): DNS binds its address
        self.dns = ClusterDNS(self.cp).start()
        self.cp.create_namespace(NS, wait_service_account=True)
        return bucket

    def apply(self, *objs: dict[str, Any]) -> None:
        self.kubectl("apply", "-n", NS, "-f", "-", stdin=yaml.safe_dump_all(objs))

    def teardown(self) -> None:
        """helm uninstall, node, DNS, S3, control plane: each attempted even if one before it fails."""
        steps: list[tuple[str, Callable[[], Any]]] = []
        if self.helm_installed:
            steps.append(("helm uninstall", lambda: self.helm("uninstall", RELEASE, "-n", OPERATOR_NS, "--wait")))
        if self.node is not None:
            steps.append(("node stop", self.node.stop))
        if self.dns is not None:
            steps.append(("dns stop", self.dns.stop))
        if self.s3 is not None:
            steps.append(("s3 stop", self.s3.stop))
        steps.append(("control plane stop", self.cp.stop))
        for what, fn in steps:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - keep tearing down
                say(f"teardown: {what} failed: {e}")


def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def app_version() -> str:
    return str(yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])


def manifests(s3: S3Server, bucket: str, name: str, max_steps: int, save_steps: int) -> tuple[dict, dict]:
    """The example's Secret + LoRAFineTune named ``name`` (adapter under ``adapters/<name>``),
    placeholders filled, cut to a budget for one 2-core node: 2 workers x 900m CPU (the operator pod
    needs 50m of the 2 cores), ``max_steps`` steps of 256 tokens."""
    text = EXAMPLE.read_text()
    for placeholder, value in {
        "REPLACE-WITH-ACCESS-KEY-ID": s3.access_key,
        "REPLACE-WITH-SECRET-ACCESS-KEY": s3.secret_key,
        "REPLACE-WITH-S3-ENDPOINT": s3.endpoint,
        "REPLACE-WITH-BUCKET": bucket,
    }.items():
        text = text.replace(placeholder, value)
    docs = [d for d in yaml.safe_load_all(text) if d]
    secret = next(d for d in docs if d["kind"] == "Secret")
    lft = next(d for d in docs if d["kind"] == "LoRAFineTune")
    lft["metadata"]["name"] = name
    spec = lft["spec"]
    spec["output"]["s3"]["uri"] = f"s3://{bucket}/adapters/{name}"
    spec["resources"] = {"cpu": "900m", "memory": "3Gi"}
    spec["data"].update({"cutoffLen": 256, "maxSamples": 64, "maxEvalSamples": 12})
    spec["training"].update({"maxSteps": max_steps, "saveSteps": save_steps, "warmupSteps": 2})
    spec["evaluation"] = {"maxExactMatchSamples": 4, "maxNewTokens": 8, "samplePrompts": 1}
    return secret, lft


def lft_of(cl: Cluster, name: str) -> dict[str, Any]:
    return cl.cp.get(f"{LFT_API}/namespaces/{NS}/lorafinetunes/{name}")


def wait_finished(cl: Cluster, name: str, timeout: float) -> dict[str, Any]:
    """The LoRAFineTune once Succeeded or Failed (or the last seen object at the timeout)."""
    deadline, last_phase = time.monotonic() + timeout, None
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        obj = lft_of(cl, name)
        phase = (obj.get("status") or {}).get("phase")
        if phase != last_phase:
            say(f"{name}: phase {phase}")
            last_phase = phase
        if phase in ("Succeeded", "Failed"):
            return obj
        time.sleep(5)
    return obj


def read_manifest(s3: S3Server, bucket: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
    """manifest.json (the completion marker) under status.artifact.uri, which must be the manifest's uri."""
    uri = status["artifact"]["uri"]
    assert uri.startswith(f"s3://{bucket}/adapters/{name}"), uri
    key = uri.removeprefix(f"s3://{bucket}/").rstrip("/") + "/manifest.json"  # the trainer's layout
    manifest = json.loads(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    assert uri == manifest["uri"], (uri, manifest["uri"])
    return manifest


def check_sha256(status: dict[str, Any], manifest: dict[str, Any]) -> None:
    """status.artifact.sha256 (from worker 0's termination message) == the manifest's."""
    got, want = status["artifact"].get("sha256"), manifest["adapter"]["sha256"]
    assert got == want, f"status.artifact {status['artifact']} vs manifest adapter {manifest['adapter']}"


def diagnose(cl: Cluster, name: str) -> None:
    """Print what explains a run that did not succeed: pods, both workers' and the operator's logs."""
    for args in (
        ["get", "pods", "-A", "-o", "wide"],
        ["logs", "-n", NS, f"{name}-worker-0", "--tail", "40"],
        ["logs", "-n", NS, f"{name}-worker-1", "--tail", "40"],
        ["logs", "-n", OPERATOR_NS, f"deploy/{RELEASE}", "--tail", "60"],
    ):
        say(f"kubectl {' '.join(args)}:\n{safe_kubectl(cl, args)}")


def safe_kubectl(cl: Cluster, args: list[str]) -> str:
    """kubectl output for diagnostics (its error text when it fails)."""
    try:
        return cl.kubectl(*args)
    except Exception as e:  # noqa: BLE001 - diagnostics only
        return f"({e})"
