"""Fault case of the local end-to-end harness: the S3 server stops while worker 0 uploads the adapter.

What the product promises (trainer/kubelora_trainer/artifacts.py, cli.py):

* `manifest.json` is written last: a partial upload is never published.
* transient errors (connection refused, 5xx, timeouts) are retried per object with exponential
  backoff (5 retries: 1+2+4+8+16 s); an outage shorter than that costs nothing but the wait.
* an outage that outlasts the retries ends the trainer with exit 1 ("S3 unreachable"), not 2 (bad
  input), so the operator restarts the job (counted against backoffLimit); a restart whose run dir
  survived on a PVC (`output.s3.workdirPvc`) only re-delivers the finished run (recipe.deliver_only),
  it does not train again.

The trigger is deterministic, not a sleep: the test-only env knob KUBELORA_TEST_UPLOAD_HOLD makes the
uploader pause after its first object (the file says "holding"); the test checks the bucket (one object,
no manifest), stops the server, releases the upload, and restarts the server only once the trainer has
logged a retry (case 1) or the operator has recorded the failed attempt (case 2).

Each test stops a private SeaweedFS server (`fresh_s3_server`), never the session one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from kubelora_trainer.artifacts import MANIFEST_FILE, TEST_UPLOAD_HOLD_ENV

from tests.operator.cluster_helpers import condition, pods, wait_events
from tests.s3server import S3Server

from .conftest import E2E, add_hostpath_claim, apply, load_example
from .test_two_workers_s3 import NAME, PREFIX, _check_artifact, _load_with_peft, _tiny, _wait_succeeded

pytestmark = [pytest.mark.cluster, pytest.mark.s3]

WORKER0 = f"{NAME}-worker-0"


def _apply_held(e: E2E, srv: S3Server, bucket: str, workdir: Path) -> tuple[Path, Path]:
    """The example on the tiny model, writing to `srv`, its run dir on a hostPath claim
    (output.s3.workdirPvc) and the upload hold knob set to a file in it. Returns (run dir, hold file)."""
    add_hostpath_claim(e, "e2e-workdir", workdir)
    secret, lft = load_example(
        bucket=bucket, endpoint=srv.endpoint, access_key=srv.access_key, secret_key=srv.secret_key, pool=e.pool
    )
    lft = _tiny(lft)
    lft["spec"]["output"]["s3"]["workdirPvc"] = {"claimName": "e2e-workdir"}
    # A path under the pods' /output mount (the agent maps mount paths, and /tmp is one of them).
    env = lft["spec"].setdefault("distributed", {}).setdefault("env", [])
    env.append({"name": TEST_UPLOAD_HOLD_ENV, "value": "/output/upload-hold"})
    apply(e.cp, e.ns, secret, lft)
    run_dir = workdir / e.ns / NAME  # the default subPath <namespace>/<name>
    return run_dir, run_dir / "upload-hold"


def _keys(srv: S3Server, bucket: str) -> list[str]:
    resp = srv.client().list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/")
    return sorted(o["Key"] for o in resp.get("Contents", []))


def _hold_then_stop(e: E2E, srv: S3Server, bucket: str, hold: Path) -> list[str]:
    """Wait until the upload holds after its first object; check that nothing is published; stop the
    server; release the upload (which then meets a dead endpoint). Returns the keys seen while held."""
    try:
        e.cp.wait_for(lambda: hold.is_file() and hold.read_text() == "holding", timeout=200, interval=0.1,
                      what="the upload to hold after its first object")
    except TimeoutError as err:
        raise AssertionError(f"{err}\n{e.diagnostics(NAME)}") from None
    keys = _keys(srv, bucket)
    assert len(keys) == 1 and keys[0].startswith(f"{PREFIX}/adapter/"), keys  # part of the artifact ...
    assert f"{PREFIX}/{MANIFEST_FILE}" not in keys  # ... and no completion marker
    srv.stop()
    hold.write_text("released")
    return keys


def _log(e: E2E, pod: str) -> str:
    run = e.agent.run_for(e.ns, pod)
    assert run is not None and run.log_path is not None
    return run.log_path.read_text(errors="replace") if run.log_path.exists() else ""


@pytest.mark.timeout(300)
def test_s3_stopped_during_upload_is_retried_and_the_run_completes(
    e2e: E2E, fresh_s3_server: S3Server, tiny_model_dir: Path, tmp_path: Path
):
    """A short outage in the middle of the upload: the uploader retries, no manifest while the
    artifact is partial, and once the server is back the same attempt finishes the delivery."""
    srv = fresh_s3_server
    bucket = srv.create_bucket()
    add_hostpath_claim(e2e, "e2e-models", tiny_model_dir.parent, read_only=True)
    _, hold = _apply_held(e2e, srv, bucket, tmp_path / "workdir")
    _hold_then_stop(e2e, srv, bucket, hold)
    try:
        e2e.cp.wait_for(lambda: "transient error" in _log(e2e, WORKER0), timeout=60, interval=0.1,
                        what="the uploader to log a retry against the stopped server")
    except TimeoutError as err:
        raise AssertionError(f"{err}\n{e2e.diagnostics(NAME)}") from None
    assert not e2e.lft(NAME).get("status", {}).get("artifact", {}).get("sha256")
    t_down = time.monotonic()
    srv.start()
    obj = _wait_succeeded(e2e, timeout=120)
    recovered = time.monotonic() - t_down

    assert obj["status"].get("restarts", 0) == 0, obj["status"]  # ridden out inside the attempt
    ps = pods(e2e.cp, e2e.ns, NAME)
    assert {p["metadata"]["labels"]["kubelora.dev/attempt"] for p in ps} == {"0"}
    log = _log(e2e, WORKER0)
    assert "retry 1/" in log and "artifact complete" in log, log[-3000:]
    adapter, summary = _check_artifact(e2e, srv.client(), bucket, obj, tmp_path)
    assert summary["adapter"]["sha256"] == obj["status"]["artifact"]["sha256"]
    _load_with_peft(tiny_model_dir, adapter)
    print(f"S3 stopped mid-upload, restarted after the first retry: Succeeded {recovered:.1f}s after the restart")


@pytest.mark.timeout(360)
def test_s3_outage_longer_than_retries_restarts_and_redelivers_without_training(
    e2e: E2E, fresh_s3_server: S3Server, tiny_model_dir: Path, tmp_path: Path
):
    """The server stays down through every retry: worker 0 exits 1 with "S3 unreachable" (no manifest),
    the operator restarts the job (restarts 1, not Failed: it is not bad input), and the next attempt,
    finding the finished run in its run dir (output.s3.workdirPvc), uploads it without training."""
    srv = fresh_s3_server
    bucket = srv.create_bucket()
    add_hostpath_claim(e2e, "e2e-models", tiny_model_dir.parent, read_only=True)
    run_dir, hold = _apply_held(e2e, srv, bucket, tmp_path / "workdir")

    _hold_then_stop(e2e, srv, bucket, hold)
    finished_summary = (run_dir / "summary.json").read_text()  # the run is finished before delivery
    t0 = time.monotonic()
    try:
        restarted = e2e.cp.wait_for(
            lambda: (o := e2e.lft(NAME)).get("status", {}).get("restarts") == 1 and o, timeout=150, interval=0.2,
            what="the operator to restart the job after the upload gave up")
    except TimeoutError as err:
        raise AssertionError(f"{err}\n{e2e.diagnostics(NAME)}") from None
    gave_up = time.monotonic() - t0
    failed = condition(restarted, "Failed")
    assert failed is None or failed["status"] != "True", restarted["status"]  # not InvalidSpec: retried
    running = condition(restarted, "Running")
    assert running is not None and running["reason"] == "Restarting", restarted["status"]
    said = [ev["message"] for ev in wait_events(e2e.cp, e2e.ns, NAME, "WorkerFailed")]
    why = [m for m in said if "worker 0" in m and "exited with code 1" in m]
    assert why and "S3 unreachable" in why[0] and MANIFEST_FILE in why[0] and "restart 1/" in why[0], said
    srv.start()  # attempt 1 finds it up, or rides the rest of the outage out with its own retries
    obj = _wait_succeeded(e2e, timeout=150)

    assert obj["status"]["restarts"] == 1, obj["status"]
    ps = pods(e2e.cp, e2e.ns, NAME)
    assert {p["metadata"]["labels"]["kubelora.dev/attempt"] for p in ps} == {"1"}
    log = _log(e2e, WORKER0)  # attempt 1's worker 0
    assert "run already finished" in log and "artifact complete" in log, log[-3000:]
    assert "resumed from" not in log and "LoRA:" not in log, "attempt 1 loaded the model: it trained again"
    adapter, summary = _check_artifact(e2e, srv.client(), bucket, obj, tmp_path)
    assert summary == json.loads(finished_summary)  # attempt 0's summary, delivered as it was
    _load_with_peft(tiny_model_dir, adapter)
    print(f"S3 down through all retries: attempt 0 gave up {gave_up:.1f}s after the outage began; "
          "attempt 1 re-delivered without training")
