"""The whole product in real containers on a real node, checked from the outside (issue 11).

    sudo bash scripts/e2e-real-node.sh [--yes]       # or: python -m tests.realnode.e2e --yes

Starts Docker's engine (scripts/docker-engine.sh), builds the images with the demo model
(scripts/build-images.sh --with-demo-model), then a control plane serving pods at this host's address,
a real node (kubelet + dockershim + kube-proxy + CNI bridge), SeaweedFS reachable from pods, and cluster
DNS (tests/cluster/dns.py). It labels the node as an AMX node (the chart's settings.amxNodeLabel: the
placement is what is tested, not the CPU), `helm install`s the chart with the local images, so the
operator runs in its own container with in-cluster config and the chart's RBAC, and `kubectl apply`s
examples/local/two-workers-s3.yaml cut to a small step budget that fits one 2-core node. After
Succeeded it checks, from outside: status.artifact against the bucket's manifest.json, the adapter loads
with peft and lowers the held-out loss, worker 0's `kubectl logs` has progress lines, `kubectl get lft`
has every column filled, Events were posted. Last line: `N passed, M failed`; exit 1 on any failure.

Tears down what it started (helm release, node, DNS, S3, control plane); leaves dockerd and the images
(cached by input hash) for the next run. Not a pytest file on purpose: it needs root, changes iptables
and takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.controlplane import ControlPlane, find_tool
from tests.cluster.dns import ClusterDNS
from tests.cluster.node import RealNode
from tests.s3server import S3Server

from .test_serve_pods_at import _host_address

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubelora"
SCRIPTS = ROOT / "scripts"
EXAMPLE = ROOT / "examples" / "local" / "two-workers-s3.yaml"
DOCKER = "/usr/bin/docker"  # Debian's 20.10 client, the one scripts/docker-engine.sh pairs with its engine
RELEASE, OPERATOR_NS, NS = "kubelora", "kubelora-system", "e2e"
LFT_API = "/apis/kubelora.dev/v1alpha1"
NAME = "two-workers-s3"
MAX_STEPS = 12
WARNING = (
    "e2e-real-node: this run installs and starts a container engine (Debian's docker.io, via "
    "scripts/docker-engine.sh) and changes iptables (DOCKER-USER rules, kube-proxy chains, a cni0 bridge)."
)


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


def manifests(s3: S3Server, bucket: str) -> str:
    """The example's Secret + LoRAFineTune, placeholders filled, cut to a budget for one 2-core node:
    2 workers x 900m CPU (the operator pod needs 50m of the 2 cores), 12 steps of 256 tokens."""
    text = EXAMPLE.read_text()
    for placeholder, value in {
        "REPLACE-WITH-ACCESS-KEY-ID": s3.access_key,
        "REPLACE-WITH-SECRET-ACCESS-KEY": s3.secret_key,
        "REPLACE-WITH-S3-ENDPOINT": s3.endpoint,
        "REPLACE-WITH-BUCKET": bucket,
    }.items():
        text = text.replace(placeholder, value)
    docs = [d for d in yaml.safe_load_all(text) if d]
    lft = next(d for d in docs if d["kind"] == "LoRAFineTune")
    spec = lft["spec"]
    spec["resources"] = {"cpu": "900m", "memory": "3Gi"}
    spec["data"].update({"cutoffLen": 256, "maxSamples": 64, "maxEvalSamples": 12})
    spec["training"].update({"maxSteps": MAX_STEPS, "saveSteps": 6, "warmupSteps": 2})
    spec["evaluation"] = {"maxExactMatchSamples": 4, "maxNewTokens": 8, "samplePrompts": 1}
    return yaml.safe_dump_all(docs)


def wait_finished(cl: Cluster, timeout: float) -> dict[str, Any]:
    """The LoRAFineTune once Succeeded or Failed (or the last seen object at the timeout)."""
    deadline, last_phase = time.monotonic() + timeout, None
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        obj = cl.cp.get(f"{LFT_API}/namespaces/{NS}/lorafinetunes/{NAME}")
        phase = (obj.get("status") or {}).get("phase")
        if phase != last_phase:
            say(f"{NAME}: phase {phase}")
            last_phase = phase
        if phase in ("Succeeded", "Failed"):
            return obj
        time.sleep(5)
    return obj


def read_manifest(s3: S3Server, bucket: str, status: dict[str, Any]) -> dict[str, Any]:
    """manifest.json (the completion marker) under status.artifact.uri, which must be the manifest's uri."""
    uri = status["artifact"]["uri"]
    assert uri.startswith(f"s3://{bucket}/adapters/{NAME}"), uri
    key = uri.removeprefix(f"s3://{bucket}/").rstrip("/") + "/manifest.json"  # the trainer's layout
    manifest = json.loads(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    assert uri == manifest["uri"], (uri, manifest["uri"])
    return manifest


def check_sha256(status: dict[str, Any], manifest: dict[str, Any]) -> None:
    """status.artifact.sha256 (from worker 0's termination message) == the manifest's."""
    got, want = status["artifact"].get("sha256"), manifest["adapter"]["sha256"]
    assert got == want, f"status.artifact {status['artifact']} vs manifest adapter {manifest['adapter']}"


def check_peft(s3: S3Server, bucket: str, manifest: dict[str, Any], work: Path) -> None:
    """Download the adapter files the manifest lists and load them onto the bundled base model."""
    from kubelora_trainer.config import ModelConfig
    from kubelora_trainer.model import convert_gguf, resolve_source
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prefix = manifest["uri"].removeprefix(f"s3://{bucket}/").rstrip("/")
    adapter = work / "adapter"
    adapter.mkdir(exist_ok=True)
    for f in manifest["files"]:
        if f["path"].startswith("adapter/"):
            s3.client().download_file(
                bucket, f"{prefix}/{f['path']}", str(adapter / f["path"].removeprefix("adapter/"))
            )
    base = convert_gguf(resolve_source(ModelConfig.model_validate({"nameOrPath": "smollm2-135m"})), work / "models")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    assert any("lora_" in n for n, _ in model.named_parameters()), "no LoRA parameters after loading"


def check_loss(s3: S3Server, bucket: str, manifest: dict[str, Any]) -> None:
    prefix = manifest["uri"].removeprefix(f"s3://{bucket}/").rstrip("/")
    summary = json.loads(s3.client().get_object(Bucket=bucket, Key=f"{prefix}/summary.json")["Body"].read())
    assert summary["eval_loss_after"] < summary["eval_loss_before"], summary


def check_columns(cl: Cluster) -> None:
    out = cl.kubectl("get", "lft", NAME, "-n", NS).splitlines()
    say("kubectl get lft:\n" + "\n".join(out))
    header, row = out[0].split(), out[1].split()
    assert len(row) == len(header) and "<none>" not in row, out


def check_logs(cl: Cluster) -> None:
    log = cl.kubectl("logs", "-n", NS, f"{NAME}-worker-0")
    steps = re.findall(r"step (\d+)/(\d+) loss", log)
    assert steps and int(steps[-1][0]) == MAX_STEPS, f"progress lines {steps[-3:]} in:\n{log[-1500:]}"


def check_events(cl: Cluster) -> None:
    events = cl.cp.get(f"/api/v1/namespaces/{NS}/events")["items"]
    mine = [
        e for e in events if e["involvedObject"].get("kind") == "LoRAFineTune" and e["involvedObject"]["name"] == NAME
    ]
    reasons = sorted({e["reason"] for e in mine})
    say(f"events on {NAME}: {reasons}")
    assert mine, "no Events on the LoRAFineTune"


def check_in_containers(cl: Cluster, node: str) -> None:
    """The operator and both workers ran as containers of this node's Docker engine."""
    pods = cl.cp.get(f"/api/v1/namespaces/{NS}/pods")["items"]
    assert sorted(p["metadata"]["name"] for p in pods) == [f"{NAME}-worker-0", f"{NAME}-worker-1"], pods
    assert {p["spec"]["nodeName"] for p in pods} == {node}
    ids = run([DOCKER, "ps", "-q", "--filter", f"label=io.kubernetes.pod.namespace={OPERATOR_NS}"]).split()
    assert len(ids) >= 2, "the operator's sandbox + container are not running"  # pause + operator


def e2e(cl: Cluster, checks: Checks, timeout: float, tag: str) -> None:
    values = chart_values()
    cl.cp.start()
    node = cl.node = RealNode(cl.cp, cl.address)
    node.start()
    say(f"node {node.name} Ready at {cl.address}")
    s3 = cl.s3 = PodReachableS3(cl.work / "s3", cl.address)
    s3.start()
    bucket = s3.create_bucket()
    key, _, value = str(values["settings"]["amxNodeLabel"]).partition("=")
    cl.cp.merge_patch(f"/api/v1/nodes/{node.name}", {"metadata": {"labels": {key: value or "true"}}})
    cl.helm_installed = True
    cl.helm(
        "install", RELEASE, str(CHART), "--namespace", OPERATOR_NS, "--create-namespace", "--wait", "--timeout", "5m",
        "--set", "image.repository=kubelora/operator", "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=IfNotPresent",
        "--set", f"settings.cpuImage=kubelora/trainer-cpu:{tag}", "--set", "settings.imagePullPolicy=IfNotPresent",
    )  # fmt: skip
    say("helm install: operator Deployment ready")
    # the CNI bridge exists now (the operator pod made it): DNS binds its address
    cl.dns = ClusterDNS(cl.cp).start()
    cl.cp.create_namespace(NS, wait_service_account=True)
    cl.kubectl("apply", "-n", NS, "-f", "-", stdin=manifests(s3, bucket))
    say(f"applied {NAME} ({MAX_STEPS} steps, 2 workers)")
    t0 = time.monotonic()
    obj = wait_finished(cl, timeout)
    status = obj.get("status") or {}
    say(f"{NAME}: {status.get('phase')} after {time.monotonic() - t0:.0f}s")
    if status.get("phase") != "Succeeded":
        checks.fail("Succeeded", f"phase {status.get('phase')}: {json.dumps(status)[:2000]}")
        for args in (
            ["get", "pods", "-A", "-o", "wide"],
            ["logs", "-n", NS, f"{NAME}-worker-0", "--tail", "40"],
            ["logs", "-n", NS, f"{NAME}-worker-1", "--tail", "40"],
            ["logs", "-n", OPERATOR_NS, f"deploy/{RELEASE}", "--tail", "60"],
        ):
            say(f"kubectl {' '.join(args)}:\n{_safe(cl, args)}")
        return
    checks.results.append(("Succeeded", True, ""))
    manifest = checks.check(
        "status.artifact.uri == the uri of the bucket's manifest.json", lambda: read_manifest(s3, bucket, status)
    )
    if manifest is not None:
        checks.check("status.artifact.sha256 == the manifest's adapter sha256", lambda: check_sha256(status, manifest))
        checks.check("the adapter loads with peft onto SmolLM2", lambda: check_peft(s3, bucket, manifest, cl.work))
        checks.check("held-out loss after < before (summary.json)", lambda: check_loss(s3, bucket, manifest))
    checks.check("kubectl logs worker-0: progress lines to the last step", lambda: check_logs(cl))
    checks.check("kubectl get lft: every column filled", lambda: check_columns(cl))
    checks.check("Events posted on the LoRAFineTune", lambda: check_events(cl))
    checks.check(
        "operator and workers ran in containers on the node",
        lambda: check_in_containers(cl, node.name),
    )


def _safe(cl: Cluster, args: list[str]) -> str:
    """kubectl output for diagnostics (its error text when it fails)."""
    try:
        return cl.kubectl(*args)
    except Exception as e:  # noqa: BLE001 - diagnostics only
        return f"({e})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--yes", action="store_true", help="run (also: CI=true or KUBELORA_E2E_REAL_NODE=1)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for Succeeded (default 900)")
    ap.add_argument("--skip-build", action="store_true", help="use the images already built")
    ap.add_argument("--tag", default=app_version(), help="image tag to build and run (default: the appVersion)")
    args = ap.parse_args(argv)
    print(WARNING, flush=True)
    if os.geteuid() != 0:
        print("e2e-real-node: needs root (container engine, iptables, port 53)", file=sys.stderr)
        return 2
    if not (args.yes or os.environ.get("CI") == "true" or os.environ.get("KUBELORA_E2E_REAL_NODE") == "1"):
        print("e2e-real-node: not run; pass --yes (or set KUBELORA_E2E_REAL_NODE=1) to go ahead", file=sys.stderr)
        return 2
    address = _host_address()
    if address is None:
        print("e2e-real-node: no non-loopback address on this host", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    checks = Checks()
    checks.check(
        "Docker engine up (scripts/docker-engine.sh start)",
        lambda: run(["bash", str(SCRIPTS / "docker-engine.sh"), "start"]),
    )
    if not args.skip_build and not checks.failed:
        say("building images (cached by input hash)")
        build = ["bash", str(SCRIPTS / "build-images.sh"), "--with-demo-model", "--tag", args.tag]
        build += ["--only", "operator,trainer-cpu,pause"]
        checks.check("images built (scripts/build-images.sh --with-demo-model)", lambda: run(build))
    if checks.failed:
        print(checks.summary(), flush=True)
        return 1
    with tempfile.TemporaryDirectory(prefix="kubelora-e2e-") as tmp:
        cl = Cluster(Path(tmp), address)
        try:
            e2e(cl, checks, args.timeout, args.tag)
        except Exception as e:  # noqa: BLE001 - reported as a failure, then torn down
            checks.fail("setup", f"{type(e).__name__}: {e}")
        finally:
            cl.teardown()
    say(f"wall time {time.monotonic() - t0:.0f}s")
    print(checks.summary(), flush=True)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
