"""Planning: resource + placement -> manifests, for each mode."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from kubelora_operator.api import LoRAFineTuneResource
from kubelora_operator.placement import decide_placement
from kubelora_operator.plan import Plan, artifact_uri, plan, ssh_secret
from kubelora_operator.settings import OperatorSettings
from kubelora_trainer.config import parse_config

from . import SETTINGS, amx_node, env_of, gpu_node, plain_node, resource

GPU_NODES = [gpu_node("g1", gpus=2), gpu_node("g2", gpus=2), amx_node("c1")]
AMX_NODES = [amx_node("c1"), amx_node("c2"), plain_node("p1")]


def make(
    res: LoRAFineTuneResource, nodes: list[Any] = GPU_NODES, settings: OperatorSettings = SETTINGS, attempt: int = 0
) -> Plan:
    decision = decide_placement(res.spec, nodes, settings)
    assert decision.ok, decision.reason
    return plan(res, decision, settings, attempt=attempt)


def container(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["spec"]["containers"][0]


def mounts(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container(pod)["volumeMounts"]}


def volumes(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod["spec"]["volumes"]}


def test_xpu_single_worker() -> None:
    p = make(resource(device="xpu"))
    assert [c["kind"] for c in p.children] == ["ConfigMap", "Service", "Pod"]
    (pod,) = p.pods
    c = container(pod)
    assert pod["metadata"]["name"] == "demo-worker-0" and pod["metadata"]["namespace"] == "team-a"
    assert c["image"] == "kubelora/trainer-xpu:0.1.0" and c["imagePullPolicy"] == "IfNotPresent"
    assert c["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi", "gpu.intel.com/i915": "1"},
        "limits": {"gpu.intel.com/i915": "1", "memory": "16Gi"},
    }
    env = env_of(pod)
    assert (env["MASTER_ADDR"], env["WORLD_SIZE"], env["RANK"], env["NPROC_PER_NODE"]) == ("127.0.0.1", "1", "0", "1")
    assert c["command"][2].startswith(
        "exec python -m kubelora_trainer.launch -- torchrun --nnodes 1 --nproc-per-node 1 --node-rank 0 --master-addr 127.0.0.1"
    )
    cfg = yaml.safe_load(p.config_map["data"]["config.yaml"])
    assert cfg["device"] == "xpu" and cfg["output"]["dir"] == "/output"


def test_xpu_multi_worker_wiring_and_service() -> None:
    p = make(resource(name="ft", device="xpu", workers=2, resources={"gpus": 2}))
    assert [pod["metadata"]["name"] for pod in p.pods] == ["ft-worker-0", "ft-worker-1"]
    for i, pod in enumerate(p.pods):
        env = env_of(pod)
        assert env["MASTER_ADDR"] == "ft-worker-0.ft-workers.team-a.svc"
        assert (env["WORLD_SIZE"], env["NNODES"], env["NODE_RANK"], env["NPROC_PER_NODE"]) == ("4", "2", str(i), "2")
        assert "RANK" not in env  # torchrun sets it per process
        assert pod["spec"]["hostname"] == f"ft-worker-{i}" and pod["spec"]["subdomain"] == "ft-workers"
        assert f"--node-rank {i} --master-addr ft-worker-0.ft-workers.team-a.svc" in container(pod)["command"][2]
        assert pod["metadata"]["labels"]["kubelora.dev/worker-index"] == str(i)
        assert container(pod)["resources"]["limits"]["gpu.intel.com/i915"] == "2"
    svc = p.service
    assert svc["metadata"]["name"] == "ft-workers"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert all(p.pods[0]["metadata"]["labels"][k] == v for k, v in svc["spec"]["selector"].items())
    assert {port["name"]: port["port"] for port in svc["spec"]["ports"]} == {"master": 29500, "metrics": 9400}


def test_cpu_amx_workers() -> None:
    p = make(
        resource(device="cpu", workers=2, resources={"cpu": "16", "memory": "32Gi"}, distributed={"procsPerWorker": 2}),
        AMX_NODES,
    )
    pod = p.pods[1]
    c = container(pod)
    assert c["image"] == "kubelora/trainer-cpu:0.1.0"
    assert c["resources"] == {"requests": {"cpu": "16", "memory": "32Gi"}, "limits": {"cpu": "16", "memory": "32Gi"}}
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert terms == [
        {
            "matchExpressions": [
                {"key": "feature.node.kubernetes.io/cpu-cpuid.AMXBF16", "operator": "In", "values": ["true"]}
            ]
        }
    ]
    env = env_of(pod)
    assert env["OMP_NUM_THREADS"] == "8" and env["KMP_BLOCKTIME"] == "1" and env["WORLD_SIZE"] == "4"
    assert yaml.safe_load(p.config_map["data"]["config.yaml"])["device"] == "cpu"


def test_auto_with_gpu_nodes_and_with_only_amx_nodes() -> None:
    res = resource(workers=2)
    assert make(res, GPU_NODES).placement.device == "xpu"
    p = make(res, AMX_NODES)
    assert p.placement.device == "cpu" and container(p.pods[0])["image"].endswith("trainer-cpu:0.1.0")
    assert "gpu.intel.com/i915" not in container(p.pods[0])["resources"]["requests"]


def test_auto_without_matching_nodes_plans_nothing() -> None:
    res = resource(workers=2)
    decision = decide_placement(res.spec, [plain_node("p")], SETTINGS)
    assert not decision.ok and decision.condition_reason.value == "NoMatchingNodes"
    with pytest.raises(ValueError, match="no matching nodes"):
        plan(res, decision, SETTINGS)


def test_wait_mode_plans_the_pods_of_the_missing_pool() -> None:
    """Wait mode: pods for a pool at zero are the pods a grown pool would get (what an autoscaler reads)."""
    res = resource(workers=2, placement={"whenNoNodeMatches": "Wait"})
    waiting = plan(res, decide_placement(res.spec, [plain_node("p")], SETTINGS), SETTINGS)
    grown = plan(res, decide_placement(res.spec, GPU_NODES, SETTINGS), SETTINGS)
    assert waiting.placement.waiting and not grown.placement.waiting
    assert len(waiting.pods) == 2
    assert [p["spec"] for p in waiting.pods] == [p["spec"] for p in grown.pods]
    assert container(waiting.pods[0])["resources"]["limits"]["gpu.intel.com/i915"] == "1"


def test_mpirun_plan() -> None:
    p = make(resource(name="mp", device="xpu", workers=2, resources={"gpus": 2}, distributed={"launcher": "mpirun"}))
    data = p.config_map["data"]
    assert data["hostfile"] == "mp-worker-0.mp-workers.team-a.svc:2\nmp-worker-1.mp-workers.team-a.svc:2\n"
    assert "Port 2222" in data["sshd_config"]
    assert p.ssh_secret_name == "mp-ssh" and p.ssh_secret_to_create
    for pod in p.pods:
        assert volumes(pod)["ssh"]["secret"] == {"secretName": "mp-ssh", "defaultMode": 0o440}
        assert mounts(pod)["/etc/kubelora-ssh"]["readOnly"] is True
        assert {"name": "ssh", "containerPort": 2222, "protocol": "TCP"} in container(pod)["ports"]
    assert "exec python -m kubelora_trainer.launch -- mpirun -n 4 -ppn 2" in container(p.pods[0])["command"][2]
    assert container(p.pods[1])["command"][2].endswith("sshd -f /etc/kubelora/sshd_config -e -D")
    assert any(port["name"] == "ssh" for port in p.service["spec"]["ports"])
    own = make(resource(name="mp", workers=2, distributed={"launcher": "mpirun", "sshSecret": "my-keys"}))
    assert own.ssh_secret_name == "my-keys" and not own.ssh_secret_to_create
    secret = ssh_secret(resource(name="mp"), "PRIVATE", "ssh-ed25519 AAAA")
    assert secret["type"] == "kubernetes.io/ssh-auth" and secret["metadata"]["name"] == "mp-ssh"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1234"


def test_torchrun_plan_has_no_ssh() -> None:
    p = make(resource(workers=2))
    assert p.ssh_secret_name is None and "hostfile" not in p.config_map["data"]
    assert "ssh" not in volumes(p.pods[0])


def test_pvc_output() -> None:
    p = make(resource(name="ft"))
    pod = p.pods[0]
    assert volumes(pod)["output"] == {"name": "output", "persistentVolumeClaim": {"claimName": "runs"}}
    assert mounts(pod)["/output"] == {"name": "output", "mountPath": "/output", "subPath": "team-a/ft"}
    assert artifact_uri(resource(name="ft")) == "pvc://runs/team-a/ft/adapter"
    p2 = make(resource(output={"pvc": {"claimName": "runs", "subPath": "exp/1"}}))
    assert mounts(p2.pods[0])["/output"]["subPath"] == "exp/1"
    assert yaml.safe_load(p2.config_map["data"]["config.yaml"])["output"] == {
        "dir": "/output",
        "overwrite": False,
        "merge": False,
        "plot": True,
    }


def test_s3_output_credentials_never_in_config() -> None:
    s3 = {
        "uri": "s3://bucket/runs/ft",
        "endpoint": "http://minio:9000",
        "region": "eu-1",
        "credentialsSecret": {"name": "s3-creds"},
    }
    res = resource(
        name="ft",
        output={"pvc": None, "s3": s3, "merge": True},
        secrets={"hubTokenSecret": {"name": "hf-token", "key": "token"}},
    )
    p = make(res)
    cfg = yaml.safe_load(p.config_map["data"]["config.yaml"])
    assert cfg["output"]["s3"] == {
        "uri": "s3://bucket/runs/ft",
        "endpoint": "http://minio:9000",
        "region": "eu-1",
        "verifyTls": True,
    }
    assert cfg["output"]["merge"] is True
    config_map_text = json.dumps(p.config_map)
    for needle in ("s3-creds", "hf-token", "AWS_", "HF_TOKEN", "credentialsSecret", "secretAccessKey"):
        assert needle not in config_map_text
    pod = p.pods[0]
    assert volumes(pod)["output"]["emptyDir"] == {}
    env = env_of(pod)
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert all(
        "value" not in e for e in container(pod)["env"] if e["name"].startswith("AWS_") or e["name"] == "HF_TOKEN"
    )
    assert artifact_uri(res) == "s3://bucket/runs/ft"
    # A workdir PVC keeps checkpoints across restarts.
    res2 = resource(name="ft", output={"pvc": None, "s3": {**s3, "workdirPvc": {"claimName": "scratch"}}})
    pod2 = make(res2).pods[0]
    assert volumes(pod2)["output"]["persistentVolumeClaim"] == {"claimName": "scratch"}
    assert mounts(pod2)["/output"]["subPath"] == "team-a/ft"


def test_config_map_is_what_the_trainer_parses() -> None:
    res = resource(
        lora={"r": 16, "targetModules": ["q_proj", "v_proj"]},
        distributed={"deepspeedStage": 2, "timeoutS": 120},
        workers=2,
    )
    p = make(res)
    cfg = parse_config(yaml.safe_load(p.config_map["data"]["config.yaml"]))
    assert cfg == p.trainer_config
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.lora.r == 16
    assert (cfg.distributed.deepspeed_stage, cfg.distributed.timeout_s) == (2, 120)
    assert cfg.data.path == "sample://train.jsonl" and cfg.training.max_steps == 20


def test_security_context_restricted() -> None:
    for res, nodes in ((resource(device="xpu"), GPU_NODES), (resource(device="cpu"), AMX_NODES)):
        pod = make(res, nodes).pods[0]
        spec = pod["spec"]
        assert spec["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        assert container(pod)["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        }
        assert spec["automountServiceAccountToken"] is False and spec["restartPolicy"] == "Never"
        assert "activeDeadlineSeconds" not in spec
        assert {"/tmp", "/cache", "/dev/shm", "/etc/kubelora", "/output"} <= set(mounts(pod))
        assert volumes(pod)["dshm"]["emptyDir"] == {"medium": "Memory"}
    settings = OperatorSettings(gpu_supplemental_groups=[110], service_account="trainer")
    pod = make(resource(device="xpu"), settings=settings).pods[0]
    assert pod["spec"]["securityContext"]["supplementalGroups"] == [110]
    assert pod["spec"]["serviceAccountName"] == "trainer"


def test_owner_references_and_labels_on_every_child() -> None:
    p = make(resource(name="ft", workers=3))
    for child in p.children:
        meta = child["metadata"]
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "kubelora.dev/v1alpha1",
                "kind": "LoRAFineTune",
                "name": "ft",
                "uid": "uid-1234",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["namespace"] == "team-a" and meta["labels"]["kubelora.dev/name"] == "ft"
    assert [c["metadata"]["name"] for c in p.children] == [
        "ft-config",
        "ft-workers",
        "ft-worker-0",
        "ft-worker-1",
        "ft-worker-2",
    ]


def test_attempts_keep_names_and_bump_the_label() -> None:
    res = resource(name="ft", workers=2)
    first, second = make(res, attempt=0), make(res, attempt=1)
    assert [p["metadata"]["name"] for p in first.pods] == [p["metadata"]["name"] for p in second.pods]
    assert {p["metadata"]["labels"]["kubelora.dev/attempt"] for p in second.pods} == {"1"}
    assert first.config_map == second.config_map and first.config_hash == second.config_hash
    assert first.pods[0]["metadata"]["annotations"] == {
        "kubelora.dev/config-sha256": first.config_hash,
        "kubelora.dev/generation": "3",
    }
    changed = make(resource(name="ft", workers=2, training={"maxSteps": 30}))
    assert changed.config_hash != first.config_hash


def test_placement_extras_and_data_volumes() -> None:
    tol = [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    res = resource(
        device="xpu",
        image="registry.local/trainer:dev",
        imagePullPolicy="Always",
        placement={"nodeSelector": {"pool": "a"}, "tolerations": tol, "priorityClassName": "training"},
        data={"path": "/data/train.jsonl"},
        dataVolume={"pvc": {"claimName": "datasets", "subPath": "alpaca", "mountPath": "/data"}},
    )
    pod = make(res, [gpu_node("g", labels={"pool": "a"})]).pods[0]
    spec = pod["spec"]
    assert (
        spec["nodeSelector"] == {"pool": "a"} and spec["tolerations"] == tol and spec["priorityClassName"] == "training"
    )
    assert (container(pod)["image"], container(pod)["imagePullPolicy"]) == ("registry.local/trainer:dev", "Always")
    assert volumes(pod)["data"]["persistentVolumeClaim"] == {"claimName": "datasets", "readOnly": True}
    assert mounts(pod)["/data"] == {"name": "data", "mountPath": "/data", "readOnly": True, "subPath": "alpaca"}
    cm = resource(dataVolume={"configMap": {"name": "tiny-data", "mountPath": "/data"}}, data={"path": "/data/t.jsonl"})
    pod = make(cm).pods[0]
    assert volumes(pod)["data"]["configMap"] == {"name": "tiny-data"}


def test_workers_carry_the_resource_uid_as_run_identity() -> None:
    """The trainer refuses an S3 prefix finished by another resource: it needs this resource's uid."""
    res = resource(device="xpu", workers=2)
    for pod in make(res).pods:
        assert env_of(pod)["KUBELORA_RUN_ID"] == res.uid


def test_image_pull_secrets_from_settings_and_spec() -> None:
    """The platform's registry Secrets (operator setting) come first, the resource's are added, each once."""
    assert "imagePullSecrets" not in make(resource()).pods[0]["spec"]
    settings = OperatorSettings(image_pull_secrets=["platform-registry"])
    p = make(resource(workers=2, imagePullSecrets=["team-registry", "platform-registry"]), settings=settings)
    for pod in p.pods:
        assert pod["spec"]["imagePullSecrets"] == [{"name": "platform-registry"}, {"name": "team-registry"}]
    only_spec = make(resource(device="cpu", imagePullSecrets=["team-registry"]), AMX_NODES)
    assert only_spec.pods[0]["spec"]["imagePullSecrets"] == [{"name": "team-registry"}]
