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
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.cluster.node import DOCKER
from tests.s3server import S3Server

from .faults import faults
from .harness import (
    NS,
    OPERATOR_NS,
    SCRIPTS,
    Checks,
    Cluster,
    app_version,
    check_sha256,
    diagnose,
    manifests,
    read_manifest,
    run,
    say,
    wait_finished,
)
from .test_serve_pods_at import _host_address

NAME = "two-workers-s3"
MAX_STEPS = 12
WARNING = (
    "e2e-real-node: this run installs and starts a container engine (Debian's docker.io, via "
    "scripts/docker-engine.sh) and changes iptables (DOCKER-USER rules, kube-proxy chains, a cni0 bridge)."
)


def check_peft(s3: S3Server, bucket: str, manifest: dict[str, Any], work: Path) -> None:
    """Download the adapter files the manifest lists and load them onto the bundled base model."""
    from kubelora_trainer.config import ModelConfig
    from kubelora_trainer.model import materialize
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
    # materialize: the GGUF converted once into the user's model cache ($KUBELORA_CACHE), not per run
    base = materialize(ModelConfig.model_validate({"nameOrPath": "smollm2-135m"}))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.location), str(adapter))
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


def e2e(cl: Cluster, checks: Checks, bucket: str, timeout: float) -> None:
    """The happy path: the example, cut to one 2-core node, Succeeded and checked from outside."""
    s3, node = cl.s3, cl.node
    assert s3 is not None and node is not None
    cl.apply(*manifests(s3, bucket, NAME, MAX_STEPS, save_steps=6))
    say(f"applied {NAME} ({MAX_STEPS} steps, 2 workers)")
    t0 = time.monotonic()
    obj = wait_finished(cl, NAME, timeout)
    status = obj.get("status") or {}
    say(f"{NAME}: {status.get('phase')} after {time.monotonic() - t0:.0f}s")
    if status.get("phase") != "Succeeded":
        checks.fail("Succeeded", f"phase {status.get('phase')}: {json.dumps(status)[:2000]}")
        diagnose(cl, NAME)
        return
    checks.results.append(("Succeeded", True, ""))
    manifest = checks.check(
        "status.artifact.uri == the uri of the bucket's manifest.json",
        lambda: read_manifest(s3, bucket, NAME, status),
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--yes", action="store_true", help="run (also: CI=true or KUBELORA_E2E_REAL_NODE=1)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for Succeeded (default 900)")
    ap.add_argument("--skip-build", action="store_true", help="use the images already built")
    ap.add_argument("--tag", default=app_version(), help="image tag to build and run (default: the appVersion)")
    ap.add_argument("--faults", action="store_true", help="then the fault run (tests/realnode/faults.py)")
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
    stages: dict[str, float] = {}
    checks = Checks()

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        t = time.monotonic()
        try:
            return fn()
        finally:
            stages[name] = time.monotonic() - t

    checks.check(
        "Docker engine up (scripts/docker-engine.sh start)",
        lambda: stage("docker engine", lambda: run(["bash", str(SCRIPTS / "docker-engine.sh"), "start"])),
    )
    if not args.skip_build and not checks.failed:
        say("building images (cached by input hash)")
        build = ["bash", str(SCRIPTS / "build-images.sh"), "--with-demo-model", "--tag", args.tag]
        build += ["--only", "operator,trainer-cpu,pause"]
        checks.check(
            "images built (scripts/build-images.sh --with-demo-model)", lambda: stage("images", lambda: run(build))
        )
    if checks.failed:
        print(checks.summary(), flush=True)
        return 1
    with tempfile.TemporaryDirectory(prefix="kubelora-e2e-") as tmp:
        cl = Cluster(Path(tmp), address)
        try:
            bucket = stage("cluster up", lambda: cl.start(args.tag))
            stage("happy path", lambda: e2e(cl, checks, bucket, args.timeout))
            if args.faults:
                stage("faults", lambda: faults(cl, checks, bucket, args.timeout))
        except Exception as e:  # noqa: BLE001 - reported as a failure, then torn down
            checks.fail("run aborted", f"{type(e).__name__}: {e}")
        finally:
            stage("teardown", cl.teardown)
    say("stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in stages.items()))
    say(f"wall time {time.monotonic() - t0:.0f}s")
    print(checks.summary(), flush=True)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
