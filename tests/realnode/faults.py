"""Fault runs on the real node (issue 11): one 2-worker LoRAFineTune meets three faults in turn, each
triggered at a deterministic point, not after a sleep.

    sudo bash scripts/e2e-real-node.sh --yes --faults    # after the happy path, same cluster

1. ``docker kill`` of worker 1's trainer container once the first checkpoint is complete on disk (its
   run dir is a hostPath PersistentVolume, ``output.s3.workdirPvc``): the operator restarts the attempt
   and the next one must log ``resumed from ... at step N`` with N > 0 and train on from step N + 1.
2. Delete the operator pod while that attempt trains: the chart's Deployment must replace it (a new
   uid, Ready), and a watch on the run's pods must never see a duplicate worker (one uid per worker
   per attempt, never more than ``workers`` pods at once).
3. Stop SeaweedFS during the upload: the test-only knob ``KUBELORA_TEST_UPLOAD_HOLD`` (trainer
   artifacts.py) pauses the upload after its first object; the bucket then must hold part of the
   artifact and no manifest.json; S3 is stopped, the upload released against the dead endpoint, and
   S3 started again (same ports, same data) once the trainer has logged a retry.

The run must then end Succeeded with status.artifact (uri, sha256) equal to the bucket's manifest.
Every check counts in the driver's final ``N passed, M failed`` line.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from kubelora_operator.names import OUTPUT_DIR
from kubelora_operator.plan import CONTAINER_NAME, LABEL_ATTEMPT, LABEL_NAME
from kubelora_trainer.artifacts import MANIFEST_FILE, TEST_UPLOAD_HOLD_ENV
from kubelora_trainer.checkpoint import STATE_FILE

from tests.cluster.node import DOCKER

from .harness import (
    NS,
    OPERATOR_NS,
    Checks,
    Cluster,
    chart_values,
    check_sha256,
    diagnose,
    lft_of,
    manifests,
    read_manifest,
    run,
    say,
    wait_finished,
)

NAME = "faults"
MAX_STEPS, SAVE_STEPS = 12, 4
CLAIM = f"{NAME}-workdir"
HOLD_FILE = "upload-hold"
WAIT_S = 420  # a bound for each wait below; one 2-core node runs the whole fault run in about 4 minutes


class PodWatch:
    """Every worker pod of one LoRAFineTune that the API reports, from a watch (not polling, so a pod
    created and deleted between two looks is seen too)."""

    def __init__(self, cl: Cluster, name: str) -> None:
        self.cp, self.selector = cl.cp, f"{LABEL_NAME}={name}"
        self.uids: dict[str, tuple[str, str]] = {}  # uid -> (pod name, attempt label)
        self.live: set[str] = set()
        self.max_live = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pod-watch", daemon=True)

    def start(self) -> PodWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=40)

    def _see(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        self.uids.setdefault(meta["uid"], (meta["name"], meta.get("labels", {}).get(LABEL_ATTEMPT, "?")))
        if kind == "DELETED":
            self.live.discard(meta["uid"])
        else:
            self.live.add(meta["uid"])
        self.max_live = max(self.max_live, len(self.live))

    def _run(self) -> None:
        path = f"/api/v1/namespaces/{NS}/pods"
        try:
            listing = self.cp.get(path, params={"labelSelector": self.selector})
            for pod in listing["items"]:
                self._see("ADDED", pod)
            rv = listing["metadata"]["resourceVersion"]
            while not self._stop.is_set():
                query = {"watch": "1", "labelSelector": self.selector, "resourceVersion": rv, "timeoutSeconds": 5}
                req = urllib.request.Request(f"{self.cp.server}{path}?{urllib.parse.urlencode(query)}")
                req.add_header("Authorization", f"Bearer {self.cp.token}")
                with urllib.request.urlopen(req, timeout=40, context=self.cp.ssl_context()) as stream:
                    for line in stream:
                        event = json.loads(line)
                        if event["type"] == "ERROR":
                            raise RuntimeError(f"watch error: {event['object']}")
                        self._see(event["type"], event["object"])
                        rv = event["object"]["metadata"]["resourceVersion"]
        except Exception as e:  # noqa: BLE001 - reported by check_no_duplicates
            self.error = f"{type(e).__name__}: {e}"

    def check_no_duplicates(self, workers: int) -> None:
        assert self.error is None, f"the pod watch broke: {self.error}"
        per_slot: dict[tuple[str, str], list[str]] = {}
        for uid, slot in self.uids.items():
            per_slot.setdefault(slot, []).append(uid)
        dups = {f"{n} attempt {a}": u for (n, a), u in per_slot.items() if len(u) > 1}
        assert not dups, f"worker pods created twice: {dups}"
        assert self.max_live <= workers, f"{self.max_live} worker pods existed at once (workers: {workers})"
        say(f"pod watch: {sorted(per_slot)}; at most {self.max_live} at once")


def add_hostpath_claim(cl: Cluster, directory: Path) -> None:
    """A hostPath PV pre-bound to CLAIM (ReadWriteMany: both workers mount the run dir; one node)."""
    pv = f"{NS}-{CLAIM}"
    cl.cp.create("/api/v1/persistentvolumes", {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                 "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(directory)},
                 "claimRef": {"namespace": NS, "name": CLAIM}},
    })  # fmt: skip
    cl.cp.create(f"/api/v1/namespaces/{NS}/persistentvolumeclaims", {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CLAIM},
        "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                 "resources": {"requests": {"storage": "1Gi"}}},
    })  # fmt: skip
    cl.cp.wait_for(
        lambda: cl.cp.get(f"/api/v1/namespaces/{NS}/persistentvolumeclaims/{CLAIM}")["status"].get("phase") == "Bound",
        timeout=60,
        what=f"{CLAIM} Bound",
    )


def worker_pod(cl: Cluster, index: int) -> dict[str, Any]:
    return cl.cp.get(f"/api/v1/namespaces/{NS}/pods/{NAME}-worker-{index}")


def worker_log(cl: Cluster, index: int) -> str:
    try:
        return cl.kubectl("logs", "-n", NS, f"{NAME}-worker-{index}")
    except RuntimeError:  # not started yet, or gone between two attempts
        return ""


def newest_checkpoint(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint (state.json is written last) in the run dir."""
    steps = [int(p.parent.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob(f"step-*/{STATE_FILE}")]
    return max(steps, default=None)


def kill_worker(cl: Cluster, index: int) -> str:
    """`docker kill` (SIGKILL) of the worker's trainer container; returns the container id."""
    pod = f"{NAME}-worker-{index}"
    labels = [f"io.kubernetes.pod.namespace={NS}", f"io.kubernetes.pod.name={pod}",
              f"io.kubernetes.container.name={CONTAINER_NAME}"]  # fmt: skip
    ids = run([DOCKER, "ps", "-q", *(a for label in labels for a in ("--filter", f"label={label}"))]).split()
    assert len(ids) == 1, f"containers of {pod}: {ids}"
    run([DOCKER, "kill", ids[0]])
    return ids[0]


def wait_resumed(cl: Cluster, killed_at: int) -> str:
    """Attempt 1's worker 0 log once it trains: it must resume from a checkpoint at or after the one the
    kill followed, and its first progress line must be the step after it (not step 1)."""

    def attempt1_trains() -> str | None:
        pod = worker_pod(cl, 0)
        if pod["metadata"]["labels"].get(LABEL_ATTEMPT) != "1":
            return None
        log = worker_log(cl, 0)
        return log if re.search(r"step \d+/\d+ loss", log) else None

    log = cl.cp.wait_for(attempt1_trains, timeout=WAIT_S, interval=2, what="attempt 1 to train")
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    first = int(re.findall(r"step (\d+)/\d+ loss", log)[0])
    assert resumed, f"attempt 1 did not resume from a checkpoint (first step {first}):\n{log[-1500:]}"
    step = int(resumed.group(1))
    assert step >= killed_at > 0 and first == step + 1, f"resumed at {step}, first step {first}, kill after {killed_at}"
    say(f"attempt 1 resumed from step {step}, trains from step {first}")
    return log


def operator_pods(cl: Cluster) -> list[dict[str, Any]]:
    return cl.cp.get(f"/api/v1/namespaces/{OPERATOR_NS}/pods")["items"]


def replace_operator(cl: Cluster) -> None:
    """Delete the operator pod; the Deployment must bring up another (new uid) that becomes Ready."""
    (old,) = operator_pods(cl)
    cl.cp.delete(f"/api/v1/namespaces/{OPERATOR_NS}/pods/{old['metadata']['name']}")
    say(f"deleted operator pod {old['metadata']['name']}")

    def replaced() -> bool:
        pods = [p for p in operator_pods(cl) if p["metadata"]["uid"] != old["metadata"]["uid"]]
        statuses = [s for p in pods for s in p["status"].get("containerStatuses", [])]
        return len(pods) == 1 and bool(statuses) and all(s["ready"] for s in statuses)

    cl.cp.wait_for(replaced, timeout=180, interval=1, what="a new operator pod Ready")


def stop_s3_during_upload(cl: Cluster, bucket: str, hold: Path) -> None:
    """Wait for the upload to hold after its first object; the bucket must show a partial artifact
    without manifest.json. Stop S3, release the upload, start S3 again after the trainer's first retry."""
    assert cl.s3 is not None
    cl.cp.wait_for(lambda: hold.is_file() and hold.read_text() == "holding", timeout=WAIT_S, interval=0.2,
                   what="the upload to hold after its first object")  # fmt: skip
    prefix = f"adapters/{NAME}/"
    keys = [o["Key"] for o in cl.s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    assert keys and prefix + MANIFEST_FILE not in keys, f"objects while the upload holds: {keys}"
    say(f"upload held with {keys} in the bucket, no {MANIFEST_FILE}; stopping S3")
    cl.s3.stop()
    hold.write_text("released")
    cl.cp.wait_for(lambda: "transient error" in worker_log(cl, 0), timeout=90, interval=0.5,
                   what="the uploader to log a retry against the stopped S3")  # fmt: skip
    artifact = (lft_of(cl, NAME).get("status") or {}).get("artifact") or {}
    assert not artifact.get("sha256"), f"status.artifact while S3 is down: {artifact}"
    took = cl.s3.start()
    say(f"S3 started again ({took:.1f}s)")


def faults(cl: Cluster, checks: Checks, bucket: str, timeout: float) -> None:
    """The fault run (module docstring); each fault's outcome is one or more named checks."""
    s3 = cl.s3
    assert s3 is not None
    pv_dir = cl.work / "pv"
    run_dir = pv_dir / NS / NAME  # the default subPath <namespace>/<name>
    run_dir.mkdir(parents=True)
    uid = int(chart_values()["settings"]["runAsUser"])
    for d in (pv_dir, pv_dir / NS, run_dir):
        d.chmod(0o755)
    run(["chown", f"{uid}:{uid}", str(run_dir)])  # hostPath: no fsGroup; the trainer writes here as uid
    add_hostpath_claim(cl, pv_dir)
    secret, lft = manifests(s3, bucket, NAME, MAX_STEPS, SAVE_STEPS)
    spec = lft["spec"]
    spec["output"]["s3"]["workdirPvc"] = {"claimName": CLAIM}
    spec.setdefault("distributed", {}).setdefault("env", []).append(
        {"name": TEST_UPLOAD_HOLD_ENV, "value": f"{OUTPUT_DIR}/{HOLD_FILE}"}
    )
    watch = PodWatch(cl, NAME).start()
    t0 = time.monotonic()
    cl.apply(secret, lft)
    say(f"applied {NAME} ({MAX_STEPS} steps, checkpoint every {SAVE_STEPS}, run dir on a hostPath PV)")
    try:
        killed_at = cl.cp.wait_for(lambda: newest_checkpoint(run_dir), timeout=WAIT_S, interval=0.2,
                                   what="the first checkpoint")  # fmt: skip
        checks.check(f"faults: docker kill worker 1's container after the checkpoint of step {killed_at}",
                     lambda: kill_worker(cl, 1))  # fmt: skip
        checks.check("faults: the next attempt resumes from the newest checkpoint (step > 0), not from 0",
                     lambda: wait_resumed(cl, killed_at))  # fmt: skip
        checks.check("faults: operator pod deleted mid-run, replaced by the Deployment (new pod Ready)",
                     lambda: replace_operator(cl))  # fmt: skip
        checks.check("faults: S3 stopped during the upload: partial objects, no manifest.json, retried",
                     lambda: stop_s3_during_upload(cl, bucket, run_dir / HOLD_FILE))  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a wait timed out; the checks below say what followed
        checks.fail("faults: the fault sequence", f"{type(e).__name__}: {e}")
    obj = wait_finished(cl, NAME, timeout)
    watch.stop()
    status = obj.get("status") or {}
    say(f"{NAME}: {status.get('phase')} after {time.monotonic() - t0:.0f}s, restarts {status.get('restarts')}")
    if status.get("phase") != "Succeeded":
        checks.fail(
            "faults: Succeeded after the three faults", f"phase {status.get('phase')}: {json.dumps(status)[:2000]}"
        )
        diagnose(cl, NAME)
    else:
        checks.results.append(("faults: Succeeded after the three faults", True, ""))
        checks.check("faults: status.artifact uri and sha256 == the bucket's manifest", lambda: check_sha256(
            status, read_manifest(s3, bucket, NAME, status)))  # fmt: skip
    checks.check("faults: no duplicate worker pods (one uid per worker per attempt, at most 2 at once)",
                 lambda: watch.check_no_duplicates(int(spec["workers"])))  # fmt: skip
