"""The real operator process against the local control plane: create, place, observe, restart, suspend, delete.

One operator (`python -m kubelora_operator run --standalone --namespace NS`) serves this module's
namespace; every test uses its own resource names and its own fake node pool. The test plays the
kubelet (pod status patches) and FakeKubelet confirms deletions.

Why one module over 400 lines: the scenarios of one resource's life share that one module-scoped
operator, so the suite starts it once; other integration modules (restart, metrics, rbac, schema)
hold what needs an operator of its own.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster.controlplane import ApiError, ControlPlane

from .cluster_helpers import (
    LFT_API,
    Env,
    add_amx_node,
    add_gpu_node,
    condition,
    create_lft,
    free_port,
    get_lft,
    lft_spec,
    live_pods,
    operator_env_in_namespace,
    patch_spec,
    pods,
    run_pod,
    show_operator_log,
    terminate_pod,
    uid,
    wait_condition,
    wait_events,
    wait_pods,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def env(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    log_dir = tmp_path_factory.mktemp("operator-logs")
    with operator_env_in_namespace(control_plane, log_dir, KUBELORA_METRICS_PORT=str(METRICS_PORT)) as env:
        yield env


@pytest.fixture(autouse=True)
def _operator_log(env: Env) -> Iterator[None]:
    yield
    show_operator_log(env)


def _gpu_pool(cp: ControlPlane, n: int = 2, gpus: int = 2) -> tuple[str, list[str]]:
    pool = uid()
    names = [f"gpu-{pool}-{i}" for i in range(n)]
    for name in names:
        add_gpu_node(cp, name, pool, gpus=gpus)
    return pool, names


def _two_bound_workers(env: Env, prefix: str, **spec: Any) -> tuple[str, list[dict[str, Any]]]:
    """A 2-worker xpu resource `<prefix>-<pool>` in a fresh 2-node pool; (name, pods) once both are bound."""
    pool, _ = _gpu_pool(env.cp)
    name = f"{prefix}-{pool}"
    create_lft(env.cp, env.ns, name, lft_spec(pool, device="xpu", workers=2, **spec))
    return name, wait_pods(env.cp, env.ns, name, 2, _bound)


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def _bound(p: dict[str, Any]) -> bool:
    return bool(p["spec"].get("nodeName"))


# --------------------------------------------------------------------------- 1, 2: create and place


def test_xpu_two_workers_children_and_scheduling(env: Env) -> None:
    cp, ns = env.cp, env.ns
    pool, gpu_nodes = _gpu_pool(cp)
    add_amx_node(cp, f"amx-{pool}", pool)  # in the pool, but no GPUs: the scheduler must not use it
    name = f"xpu-{pool}"
    created = create_lft(cp, ns, name, lft_spec(pool, device="xpu", workers=2))
    owner_uid = created["metadata"]["uid"]

    obj = wait_condition(cp, ns, name, "Scheduled", "True", "PodsScheduled")
    assert condition(obj, "Validated")["status"] == "True"
    st = obj["status"]
    assert st["placement"]["device"] == "xpu" and "gpu.intel.com/i915" in st["placement"]["nodePool"]
    assert st["startTime"] and st["observedGeneration"] == obj["metadata"]["generation"]
    assert st["phase"] in ("Starting", "Pending")
    # The start record is on the run's ConfigMap (the commit point), not written to the resource.
    cm = cp.get(f"/api/v1/namespaces/{ns}/configmaps/{name}-config")
    assert json.loads(cm["metadata"]["annotations"]["kubelora.dev/started-spec"])["workers"] == 2
    assert cm["metadata"]["annotations"]["kubelora.dev/device"] == "xpu"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == owner_uid
    assert not any(k.startswith("kubelora.dev/") for k in obj["metadata"].get("annotations", {}))
    assert not any(k.startswith("kopf.zalando.org") for k in obj["metadata"].get("annotations", {}))
    assert set(st) <= {
        "conditions",
        "observedGeneration",
        "phase",
        "startTime",
        "placement",
        "restarts",
        "workers",
        "progress",
    }, st

    ps = wait_pods(cp, ns, name, 2, _bound)
    assert [p["metadata"]["name"] for p in ps] == [f"{name}-worker-0", f"{name}-worker-1"]
    assert {p["spec"]["nodeName"] for p in ps} <= set(gpu_nodes)
    for i, pod in enumerate(ps):
        refs = pod["metadata"]["ownerReferences"]
        assert refs == [
            {
                "apiVersion": "kubelora.dev/v1alpha1",
                "kind": "LoRAFineTune",
                "name": name,
                "uid": owner_uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        e = _env(pod)
        assert (e["RANK"], e["WORLD_SIZE"], e["NODE_RANK"]) == (str(i), "2", str(i))
        assert e["MASTER_ADDR"] == f"{name}-worker-0.{name}-workers.{ns}.svc"
        assert pod["metadata"]["labels"]["kubelora.dev/attempt"] == "0"
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False and spec["restartPolicy"] == "Never"
        assert spec["securityContext"]["runAsNonRoot"] is True
        c = spec["containers"][0]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert c["resources"]["limits"]["gpu.intel.com/i915"] == "1"
    cm = cp.get(f"/api/v1/namespaces/{ns}/configmaps/{name}-config")
    assert "config.yaml" in cm["data"] and cm["metadata"]["ownerReferences"][0]["uid"] == owner_uid
    svc = cp.get(f"/api/v1/namespaces/{ns}/services/{name}-workers")
    assert svc["spec"]["clusterIP"] == "None" and svc["metadata"]["ownerReferences"][0]["uid"] == owner_uid
    reasons = {e["reason"] for e in wait_events(cp, ns, name, "PodsCreated", "PodsScheduled")}
    assert {"PodsCreated", "PodsScheduled"} <= reasons, reasons


def test_cpu_amx_bound_to_amx_nodes_only(env: Env) -> None:
    cp, ns = env.cp, env.ns
    pool, gpu_nodes = _gpu_pool(cp, n=1)
    amx = [f"amx-{pool}-{i}" for i in range(2)]
    for n in amx:
        add_amx_node(cp, n, pool)
    name = f"cpu-{pool}"
    create_lft(cp, ns, name, lft_spec(pool, device="cpu", workers=3, resources={"gpus": 0, "cpu": "4"}))
    obj = wait_condition(cp, ns, name, "Scheduled", "True", "PodsScheduled")
    assert obj["status"]["placement"]["device"] == "cpu"
    ps = wait_pods(cp, ns, name, 3, _bound)
    assert {p["spec"]["nodeName"] for p in ps} <= set(amx)
    terms = ps[0]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert {"key": "feature.node.kubernetes.io/cpu-cpuid.AMXBF16", "operator": "In", "values": ["true"]} in terms[
        "nodeSelectorTerms"
    ][0]["matchExpressions"]
    assert _env(ps[0])["OMP_NUM_THREADS"] == "4"


# --------------------------------------------------------------------------- 3, 4: no nodes, invalid


def test_no_matching_nodes_then_node_added(env: Env) -> None:
    cp, ns = env.cp, env.ns
    pool = uid()
    add_amx_node(cp, f"amx-{pool}", pool)
    name = f"nomatch-{pool}"
    create_lft(cp, ns, name, lft_spec(pool, device="xpu", workers=1, resources={"gpus": 4}))
    obj = wait_condition(cp, ns, name, "Scheduled", "False", "NoMatchingNodes")
    msg = condition(obj, "Scheduled")["message"]
    # "no node of N offers ...", or, when other tests' GPU nodes exist, "... but all are excluded: N not in
    # spec.placement.nodeSelector": either way no node can take the worker, and the message says why.
    assert "4 gpu.intel.com/i915" in msg and ("no node" in msg or "but all are excluded" in msg), msg
    assert obj["status"]["phase"] == "Unschedulable"
    assert pods(cp, ns, name) == []
    assert any(
        e["reason"] == "NoMatchingNodes" and e["type"] == "Warning"
        for e in wait_events(cp, ns, name, "NoMatchingNodes")
    )
    # A node with enough GPUs appears: the resync timer places the job.
    add_gpu_node(cp, f"gpu-{pool}", pool, gpus=4)
    wait_condition(cp, ns, name, "Scheduled", "True", "PodsScheduled")
    (pod,) = wait_pods(cp, ns, name, 1, _bound)
    assert pod["spec"]["nodeName"] == f"gpu-{pool}"


def test_invalid_resources_get_validated_false_and_nothing_else(env: Env) -> None:
    cp, ns = env.cp, env.ns
    pool, _ = _gpu_pool(cp, n=1)
    missing_secret = f"secret-{pool}"
    s3 = {"s3": {"uri": "s3://bucket/x", "credentialsSecret": {"name": missing_secret}}}
    cases = {
        f"nosecret-{pool}": (lft_spec(pool, output=s3), "SecretNotFound", f"Secret '{missing_secret}'"),
        f"nopvc-{pool}": (
            lft_spec(pool, output={"pvc": {"claimName": "nope"}}),
            "PVCNotFound",
            "PersistentVolumeClaim 'nope'",
        ),
        f"badmod-{pool}": (
            lft_spec(pool, model={"nameOrPath": "smollm2-135m"}, lora={"targetModules": ["q_proj", "qkv"]}),
            "InvalidSpec",
            "qkv",
        ),
    }
    for name, (spec, _, _) in cases.items():
        create_lft(cp, ns, name, spec)
    for name, (_, reason, text) in cases.items():
        obj = wait_condition(cp, ns, name, "Validated", "False", reason)
        assert text in condition(obj, "Validated")["message"]
        assert obj["status"]["phase"] == "Invalid"
        evs = [e for e in wait_events(cp, ns, name, reason) if e["reason"] == reason]
        assert evs and evs[0]["type"] == "Warning" and text in evs[0]["message"]
    # Nothing was created for any of them, and stays so across a few resyncs.
    time.sleep(2.5)
    for name in cases:
        assert pods(cp, ns, name) == []
        with pytest.raises(ApiError):
            cp.get(f"/api/v1/namespaces/{ns}/configmaps/{name}-config")
    # Creating the Secret unblocks the first one (re-checked without any change to the resource).
    cp.create(
        f"/api/v1/namespaces/{ns}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": missing_secret},
            "stringData": {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"},
        },
    )
    obj = wait_condition(cp, ns, f"nosecret-{pool}", "Validated", "True")
    wait_pods(cp, ns, f"nosecret-{pool}", 1)
    env_vars = _env(live_pods(cp, ns, f"nosecret-{pool}")[0])
    assert env_vars["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": missing_secret, "key": "AWS_SECRET_ACCESS_KEY"}
    }


# --------------------------------------------------------------------------- 5: running, progress, success


def test_running_progress_and_success(env: Env) -> None:
    from kubelora_trainer.metrics import ProgressState, serve_metrics

    cp, ns = env.cp, env.ns
    name, ps = _two_bound_workers(env, "run")
    state = ProgressState()
    server = serve_metrics(state, METRICS_PORT, host="127.0.0.1")
    try:
        run_pod(cp, ns, ps[0]["metadata"]["name"])
        wait_condition(cp, ns, name, "Running", "False", "WorkersStarting", contains="1/2 workers running")
        run_pod(cp, ns, ps[1]["metadata"]["name"], ip="127.0.0.2")
        obj = wait_condition(cp, ns, name, "Running", "True", "WorkersRunning")
        assert obj["status"]["phase"] == "Running" and obj["status"]["workers"] == {"ready": 2, "total": 2}

        state.update(
            step=5, total_steps=20, epoch=0.25, train_loss=1.5, tokens_per_second=321.5, eta_seconds=30.0, phase=1
        )

        def progressed(step: int) -> dict | None:
            p = get_lft(cp, ns, name)["status"].get("progress") or {}
            return p if p.get("step") == step else None

        p = cp.wait_for(lambda: progressed(5), timeout=20, what="progress step 5")
        assert p == {
            "step": 5,
            "totalSteps": 20,
            "epoch": 0.25,
            "trainLoss": 1.5,
            "tokensPerSecond": 321.5,
            "etaSeconds": 30,
            "percent": 25,
        }, p
        assert math.isnan(state.snapshot()["eval_loss"])  # NaN gauges are simply left out
        state.update(step=15, eval_loss=1.25, train_loss=1.1)
        p = cp.wait_for(lambda: progressed(15), timeout=20, what="progress step 15")
        assert p["percent"] == 75 and p["evalLoss"] == 1.25 and p["trainLoss"] == 1.1

        # Training ends: every torchrun worker exits 0; worker 0 reports the artifact.
        art = {"artifact": {"uri": "s3://bucket/runs/test/adapter", "sha256": "ab" * 32, "sizeBytes": 1234567}}
        terminate_pod(cp, ns, ps[1]["metadata"]["name"], 0)
        terminate_pod(cp, ns, ps[0]["metadata"]["name"], 0, json.dumps(art))
        obj = wait_condition(cp, ns, name, "Succeeded", "True", "TrainingComplete")
    finally:
        server.shutdown()
        server.server_close()
    st = obj["status"]
    assert st["artifact"] == {"uri": "s3://bucket/runs/test/adapter", "sha256": "ab" * 32, "sizeBytes": 1234567}
    assert st["phase"] == "Succeeded" and st["completionTime"]
    assert st["progress"]["percent"] == 100 and st["progress"]["step"] == 20
    assert condition(obj, "Running")["status"] == "False"
    assert any(e["reason"] == "TrainingComplete" for e in wait_events(cp, ns, name, "TrainingComplete"))
    # Finished pods stay (logs), nothing is recreated.
    assert [p["status"]["phase"] for p in pods(cp, ns, name)] == ["Succeeded", "Succeeded"]


def test_bad_input_exit_2_fails_without_retry(env: Env) -> None:
    cp, ns = env.cp, env.ns
    pool, _ = _gpu_pool(cp, n=1)
    name = f"bad-{pool}"
    create_lft(cp, ns, name, lft_spec(pool, device="xpu", workers=1))
    (pod,) = wait_pods(cp, ns, name, 1, _bound)
    run_pod(cp, ns, pod["metadata"]["name"])
    terminate_pod(cp, ns, pod["metadata"]["name"], 2, "data.path: no such file /data/x.jsonl")
    obj = wait_condition(cp, ns, name, "Failed", "True", "InvalidSpec")
    assert "no such file /data/x.jsonl" in condition(obj, "Failed")["message"]
    assert obj["status"].get("restarts", 0) == 0
    assert [p["metadata"]["labels"]["kubelora.dev/attempt"] for p in pods(cp, ns, name)] == ["0"]


# --------------------------------------------------------------------------- 6: restarts and backoffLimit


def test_worker_failure_restarts_then_backoff_limit(env: Env) -> None:
    cp, ns = env.cp, env.ns
    name, ps = _two_bound_workers(env, "fail", backoffLimit=1)
    for p in ps:
        run_pod(cp, ns, p["metadata"]["name"])
    wait_condition(cp, ns, name, "Running", "True")
    terminate_pod(cp, ns, ps[1]["metadata"]["name"], 1, "RuntimeError: oneCCL: connection reset")
    # Attempt 1: both pods deleted (the running one gracefully: FakeKubelet confirms), then recreated.
    ps2 = wait_pods(cp, ns, name, 2, lambda p: p["metadata"]["labels"]["kubelora.dev/attempt"] == "1" and _bound(p))
    obj = get_lft(cp, ns, name)
    assert obj["status"]["restarts"] == 1
    assert {p["metadata"]["uid"] for p in ps2}.isdisjoint({p["metadata"]["uid"] for p in ps})
    warn = [e for e in wait_events(cp, ns, name, "WorkerFailed") if e["reason"] == "WorkerFailed"]
    assert warn and "connection reset" in warn[0]["message"] and warn[0]["type"] == "Warning"
    for p in ps2:
        run_pod(cp, ns, p["metadata"]["name"])
    wait_condition(cp, ns, name, "Running", "True")
    terminate_pod(cp, ns, ps2[0]["metadata"]["name"], 137, "OOMKilled")
    obj = wait_condition(cp, ns, name, "Failed", "True", "BackoffLimitExceeded")
    assert obj["status"]["restarts"] == 1 and obj["status"]["phase"] == "Failed"
    assert "backoffLimit 1" in condition(obj, "Failed")["message"]
    # The still-running worker of the failed attempt is stopped; the failed one stays for its logs.
    cp.wait_for(lambda: [p["metadata"]["name"] for p in pods(cp, ns, name)] == [f"{name}-worker-0"], timeout=20)


# --------------------------------------------------------------------------- 7: suspend / resume, spec changes


def test_suspend_and_resume(env: Env) -> None:
    cp, ns = env.cp, env.ns
    name, ps = _two_bound_workers(env, "susp")
    for p in ps:
        run_pod(cp, ns, p["metadata"]["name"])
    wait_condition(cp, ns, name, "Running", "True")
    gen_before = get_lft(cp, ns, name)["metadata"]["generation"]
    patch_spec(cp, ns, name, {"suspend": True})
    obj = wait_condition(cp, ns, name, "Suspended", "True", "SuspendedByUser")
    cp.wait_for(lambda: pods(cp, ns, name) == [], timeout=20, what="pods gone")
    obj = get_lft(cp, ns, name)
    assert obj["status"]["phase"] == "Suspended"
    assert obj["status"]["observedGeneration"] == gen_before + 1  # suspend is applied, not refused
    assert condition(obj, "SpecChangeRefused") is None
    patch_spec(cp, ns, name, {"suspend": False})
    wait_condition(cp, ns, name, "Suspended", "False", "Resumed")
    ps2 = wait_pods(cp, ns, name, 2, _bound)
    assert {p["metadata"]["labels"]["kubelora.dev/attempt"] for p in ps2} == {"1"}
    assert get_lft(cp, ns, name)["status"].get("restarts", 0) == 0  # a resume is not a failure


def test_spec_change_after_start_is_refused(env: Env) -> None:
    cp, ns = env.cp, env.ns
    pool, _ = _gpu_pool(cp)
    name = f"chg-{pool}"
    r0 = 8
    create_lft(cp, ns, name, lft_spec(pool, device="xpu", workers=2, lora={"r": r0}))
    wait_pods(cp, ns, name, 2, _bound)
    started = get_lft(cp, ns, name)
    started_gen = started["metadata"]["generation"]
    # The snapshot is the stored spec, server-side CRD defaults included (alpha 16 ... beside r).
    cm = cp.get(f"/api/v1/namespaces/{ns}/configmaps/{name}-config")
    started_lora = json.loads(cm["metadata"]["annotations"]["kubelora.dev/started-spec"])["lora"]
    assert started_lora["r"] == r0 and started_lora["alpha"] == 16
    patch_spec(cp, ns, name, {"workers": 3, "lora": {"r": r0 * 2}})
    obj = wait_condition(cp, ns, name, "SpecChangeRefused", "True", "SpecChangedAfterStart")
    msg = condition(obj, "SpecChangeRefused")["message"]
    assert "spec.workers" in msg and "spec.lora.r" in msg, msg
    assert obj["status"]["observedGeneration"] == started_gen
    assert len(live_pods(cp, ns, name)) == 2
    # Reverting clears the refusal.
    patch_spec(cp, ns, name, {"workers": 2, "lora": {"r": r0}})
    cp.wait_for(lambda: condition(get_lft(cp, ns, name), "SpecChangeRefused") is None, timeout=20)


def test_active_deadline_and_ttl(env: Env) -> None:
    cp, ns = env.cp, env.ns
    pool, _ = _gpu_pool(cp, n=1)
    name = f"dl-{pool}"
    create_lft(
        cp, ns, name, lft_spec(pool, device="xpu", workers=1, activeDeadlineSeconds=3, ttlSecondsAfterFinished=6)
    )
    (pod,) = wait_pods(cp, ns, name, 1, _bound)
    run_pod(cp, ns, pod["metadata"]["name"])
    obj = wait_condition(cp, ns, name, "Failed", "True", "DeadlineExceeded", timeout=20)
    assert obj["status"]["completionTime"]
    cp.wait_for(lambda: pods(cp, ns, name) == [], timeout=20, what="pods deleted at the deadline")

    def gone() -> bool:
        try:
            get_lft(cp, ns, name)
        except Exception as err:  # 404 is what we wait for
            return "404" in str(err) or getattr(err, "status", 0) == 404
        return False

    cp.wait_for(gone, timeout=20, what="resource deleted after ttlSecondsAfterFinished")


# --------------------------------------------------------------------------- 8: deletion


def test_deletion_garbage_collects_children(env: Env) -> None:
    cp, ns = env.cp, env.ns
    name, ps = _two_bound_workers(env, "del")
    run_pod(cp, ns, ps[0]["metadata"]["name"])
    cp.delete(f"{LFT_API}/namespaces/{ns}/lorafinetunes/{name}")

    def all_gone() -> bool:
        left = pods(cp, ns, name)
        cms = cp.get(f"/api/v1/namespaces/{ns}/configmaps", params={"labelSelector": f"kubelora.dev/name={name}"})
        svcs = cp.get(f"/api/v1/namespaces/{ns}/services", params={"labelSelector": f"kubelora.dev/name={name}"})
        lfts = [o for o in cp.get(f"{LFT_API}/namespaces/{ns}/lorafinetunes")["items"] if o["metadata"]["name"] == name]
        return not (left or cms["items"] or svcs["items"] or lfts)

    cp.wait_for(all_gone, timeout=60, what="resource and children gone")


# --------------------------------------------------------------------------- launchers and outputs


def test_mpirun_ssh_secret_and_sshd_workers_stopped_on_success(env: Env) -> None:
    cp, ns = env.cp, env.ns
    name, ps = _two_bound_workers(env, "mpi", distributed={"launcher": "mpirun", "backend": "ccl"})
    secret = cp.get(f"/api/v1/namespaces/{ns}/secrets/{name}-ssh")
    assert secret["type"] == "kubernetes.io/ssh-auth" and {"ssh-privatekey", "ssh-publickey"} <= set(secret["data"])
    assert secret["metadata"]["ownerReferences"][0]["uid"] == get_lft(cp, ns, name)["metadata"]["uid"]
    vols = {v["name"]: v for v in ps[0]["spec"]["volumes"]}
    assert vols["ssh"]["secret"]["secretName"] == f"{name}-ssh"
    for p in ps:
        run_pod(cp, ns, p["metadata"]["name"])
    wait_condition(cp, ns, name, "Running", "True")
    # mpirun: the job is done when worker 0 (the launcher) exits; worker 1 only runs sshd and is stopped.
    terminate_pod(cp, ns, ps[0]["metadata"]["name"], 0)
    obj = wait_condition(cp, ns, name, "Succeeded", "True", "TrainingComplete")
    assert obj["status"]["artifact"] == {"uri": "s3://bucket/runs/test"}  # no JSON message: the spec's URI
    cp.wait_for(lambda: [p["metadata"]["name"] for p in pods(cp, ns, name)] == [f"{name}-worker-0"], timeout=20)


def test_pvc_output_mounted_and_artifact_uri(env: Env) -> None:
    cp, ns = env.cp, env.ns
    pool, _ = _gpu_pool(cp)
    claim, pv = f"runs-{pool}", f"pv-{pool}"
    cp.create(
        "/api/v1/persistentvolumes",
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "hostPath": {"path": f"/tmp/{pv}"},
                "storageClassName": "manual",
                "claimRef": {"namespace": ns, "name": claim},
            },
        },
    )
    try:
        cp.create(
            f"/api/v1/namespaces/{ns}/persistentvolumeclaims",
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "resources": {"requests": {"storage": "1Gi"}},
                    "storageClassName": "manual",
                    "volumeName": pv,
                },
            },
        )
        name = f"pvc-{pool}"
        create_lft(cp, ns, name, lft_spec(pool, device="xpu", workers=2, output={"pvc": {"claimName": claim}}))
        ps = wait_pods(cp, ns, name, 2, _bound, timeout=45)
        mounts = {m["mountPath"]: m for m in ps[0]["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["/output"]["subPath"] == f"{ns}/{name}"
        for p in ps:
            run_pod(cp, ns, p["metadata"]["name"])
        art = {"artifact": {"sha256": "cd" * 32, "sizeBytes": 42}}
        terminate_pod(cp, ns, ps[1]["metadata"]["name"], 0)
        terminate_pod(cp, ns, ps[0]["metadata"]["name"], 0, json.dumps(art))
        obj = wait_condition(cp, ns, name, "Succeeded", "True")
        assert obj["status"]["artifact"] == {
            "uri": f"pvc://{claim}/{ns}/{name}/adapter",
            "sha256": "cd" * 32,
            "sizeBytes": 42,
        }
    finally:
        cp.delete(f"/api/v1/persistentvolumes/{pv}")


def test_permanent_api_error_ends_in_failed_not_a_retry_loop(env: Env) -> None:
    cp, ns = env.cp, env.ns
    pool, _ = _gpu_pool(cp, n=1)
    name = f"prio-{pool}"
    # The Priority admission plugin refuses pods naming a PriorityClass that does not exist (403).
    create_lft(cp, ns, name, lft_spec(pool, device="xpu", placement={"priorityClassName": f"nope-{pool}"}))
    obj = wait_condition(cp, ns, name, "Failed", "True", "ApiError")
    msg = condition(obj, "Failed")["message"]
    assert f"nope-{pool}" in msg and "POST" in msg, msg
    assert obj["status"]["phase"] == "Failed" and obj["status"]["completionTime"]
    time.sleep(2.5)  # resyncs leave a terminal resource alone
    assert pods(cp, ns, name) == []
    assert len([e for e in wait_events(cp, ns, name, "ApiError") if e["reason"] == "ApiError"]) == 1


def test_disruptions_restart_without_counting(env: Env) -> None:
    cp, ns = env.cp, env.ns
    pool, _ = _gpu_pool(cp)
    name = f"drain-{pool}"
    create_lft(cp, ns, name, lft_spec(pool, device="xpu", workers=2, backoffLimit=0))

    def attempt(n: int) -> list[dict]:
        return wait_pods(
            cp, ns, name, 2, lambda p: p["metadata"]["labels"]["kubelora.dev/attempt"] == str(n) and _bound(p)
        )

    for p in attempt(0):
        run_pod(cp, ns, p["metadata"]["name"])
    wait_condition(cp, ns, name, "Running", "True")
    # A node drain evicts worker 1 (graceful delete; FakeKubelet confirms it).
    cp.delete(f"/api/v1/namespaces/{ns}/pods/{name}-worker-1")
    ps = attempt(1)
    for p in ps:
        run_pod(cp, ns, p["metadata"]["name"])
    wait_condition(cp, ns, name, "Running", "True", contains="attempt 1")
    # The trainer was SIGTERMed and checkpointed (exit 143): again not a failure of the job.
    terminate_pod(cp, ns, ps[0]["metadata"]["name"], 143, "preempted: checkpoint written at step 7")
    attempt(2)
    obj = get_lft(cp, ns, name)
    assert obj["status"]["restarts"] == 0 and condition(obj, "Failed") is None
    evs = wait_events(cp, ns, name, pred=lambda es: sum(e["reason"] == "WorkerFailed" for e in es) >= 2)
    msgs = [e["message"] for e in evs if e["reason"] == "WorkerFailed"]
    assert any("disruption" in m for m in msgs) and any("checkpoint written at step 7" in m for m in msgs), msgs
