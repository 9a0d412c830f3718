"""Plan: a validated LoRAFineTune + a placement decision + settings -> the child manifests, as plain dicts.

Why pure: everything the operator creates is decided here and unit-tested without an API server;
handlers only create/patch what the plan says (and treat AlreadyExists as done, which makes creation
idempotent across operator restarts because every name is deterministic).

Children: ConfigMap `<name>-config` (the trainer config, plus hostfile/sshd_config for mpirun),
headless Service `<name>-workers`, and one Pod per worker `<name>-worker-<i>`.

Why plain Pods and not a Job: worker i needs a stable identity (rank, DNS name). Indexed Jobs give
that only from Kubernetes 1.21 (1.24 GA) and we must run on 1.20, and a non-indexed Job of N pods
cannot tell its pods apart. The operator therefore owns restarts, backoffLimit and
activeDeadlineSeconds itself (none of them is set on the pods).

Pod names on restart: names are stable (`<name>-worker-<i>`); a restart deletes every worker pod of
the failed attempt, waits until they are gone, and creates the next attempt under the same names with
the `kubelora.dev/attempt` label incremented. Stable names mean stable DNS (hostname == pod name),
predictable `kubectl logs <name>-worker-0`, no pile-up of dead pods, and an unambiguous idempotency
rule (an existing pod with a lower attempt label is stale). The failed attempt's exit reason is
recorded in the condition/Event before its pods are deleted. The trainer resumes from the newest
checkpoint in the run dir (`training.resume: auto`).

Over 400 lines on purpose: everything the operator creates for a resource is decided in this one
pure module, so that one place (unit-tested without a server) says what lands in the cluster.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubelora_trainer.config import TrainerConfig, dump_config
from kubelora_trainer.contract import RUN_ID_ENV

from .api import API_VERSION, KIND, ClaimRef, LoRAFineTuneResource
from .fetch import localize_config, source_volumes
from .names import CACHE_DIR, CONFIG_DIR, OUTPUT_DIR, SHM_DIR, SSH_DIR, TMP_DIR
from .placement import PlacementDecision
from .pod_overrides import PodVolume
from .settings import OperatorSettings
from .wiring import (
    WAIT_FOR_PEERS_PY,
    hostfile,
    service_name,
    sshd_config,
    topology,
    worker_command,
    worker_env,
    worker_name,
)

LABEL_NAME = "kubelora.dev/name"
LABEL_ROLE = "kubelora.dev/role"
#: LABEL_ROLE of the worker pods (fetch.py has the fetch pod's).
WORKER_ROLE = "worker"
LABEL_WORKER_INDEX = "kubelora.dev/worker-index"
LABEL_ATTEMPT = "kubelora.dev/attempt"
ANNOTATION_CONFIG_HASH = "kubelora.dev/config-sha256"
ANNOTATION_GENERATION = "kubelora.dev/generation"
CONTAINER_NAME = "trainer"
CONFIG_KEY = "config.yaml"
SSH_SECRET_TYPE = "kubernetes.io/ssh-auth"


def config_map_name(name: str) -> str:
    """ConfigMap holding the trainer config."""
    return f"{name}-config"


def ssh_secret_name(resource: LoRAFineTuneResource) -> str:
    """Secret with the SSH key pair for mpirun (the user's, or `<name>-ssh` made by the operator)."""
    return resource.spec.distributed.ssh_secret or f"{resource.name}-ssh"


def owner_reference(resource: LoRAFineTuneResource) -> dict[str, Any]:
    """Controller owner reference: deleting the LoRAFineTune garbage-collects every child."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": resource.name,
        "uid": resource.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def common_labels(name: str) -> dict[str, str]:
    """Labels on every child (`kubelora.dev/name` selects them all)."""
    return {
        "app.kubernetes.io/name": "kubelora-trainer",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "kubelora-operator",
        LABEL_NAME: name,
    }


def worker_selector(name: str) -> dict[str, str]:
    """Selects the worker pods of one resource (any attempt)."""
    return {LABEL_NAME: name, LABEL_ROLE: WORKER_ROLE}


def _metadata(resource: LoRAFineTuneResource, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": resource.namespace,
        "labels": {**common_labels(resource.name), **(labels or {})},
        "ownerReferences": [owner_reference(resource)],
    }


def run_sub_path(resource: LoRAFineTuneResource, claim: ClaimRef) -> str:
    """Directory inside a claim for this run: the spec's subPath, else `<namespace>/<name>`, so that
    runs of different resources never share (and never overwrite) a run dir by default."""
    return claim.sub_path or f"{resource.namespace}/{resource.name}"


def artifact_uri(resource: LoRAFineTuneResource) -> str:
    """Where the finished adapter will be, for status.artifact.uri."""
    out = resource.spec.output
    if out.s3 is not None:
        return out.s3.uri
    assert out.pvc is not None
    return f"pvc://{out.pvc.claim_name}/{run_sub_path(resource, out.pvc)}/adapter"


@dataclass(frozen=True)
class Plan:
    """Everything to create for one attempt, in creation order (`children`)."""

    placement: PlacementDecision
    trainer_config: TrainerConfig
    config_map: dict[str, Any]
    service: dict[str, Any]
    pods: list[dict[str, Any]]
    config_hash: str
    attempt: int
    ssh_secret_name: str | None = None
    """mpirun: the Secret the pods mount."""
    ssh_secret_to_create: bool = False
    """mpirun without spec.distributed.sshSecret: the handler creates it with `ssh_secret()` first."""

    @property
    def children(self) -> list[dict[str, Any]]:
        """ConfigMap, Service, then the pods (pods need the other two)."""
        return [self.config_map, self.service, *self.pods]


def render_config(resource: LoRAFineTuneResource, device: str) -> TrainerConfig:
    """The trainer config for the pods (run dir /output; S3 target without credentials; s3:// and pvc://
    sources replaced by their paths in the pods, fetch.py)."""
    return localize_config(resource.spec.to_trainer_config(device=device, run_dir=OUTPUT_DIR), resource.spec)


def _volumes(
    resource: LoRAFineTuneResource, settings: OperatorSettings, ssh_secret: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    spec = resource.spec
    empty: dict[str, Any] = {}
    cache: dict[str, Any] = {"sizeLimit": settings.cache_size_limit} if settings.cache_size_limit else {}
    shm: dict[str, Any] = {"medium": "Memory"}
    shm_size = spec.pod.shm_size or settings.shm_size_limit
    if shm_size:
        shm["sizeLimit"] = shm_size
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map_name(resource.name)}},
        {"name": "tmp", "emptyDir": dict(empty)},
        {"name": "cache", "emptyDir": cache},
        {"name": "dshm", "emptyDir": shm},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": TMP_DIR},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "dshm", "mountPath": SHM_DIR},
    ]
    out = spec.output
    claim = out.pvc if out.pvc is not None else (out.s3.workdir_pvc if out.s3 is not None else None)
    if claim is not None:
        volumes.append({"name": "output", "persistentVolumeClaim": {"claimName": claim.claim_name}})
        mounts.append({"name": "output", "mountPath": OUTPUT_DIR, "subPath": run_sub_path(resource, claim)})
    else:
        volumes.append({"name": "output", "emptyDir": {}})
        mounts.append({"name": "output", "mountPath": OUTPUT_DIR})
    dv = spec.data_volume
    if dv is not None:
        if dv.pvc is not None:
            volumes.append(
                {"name": "data", "persistentVolumeClaim": {"claimName": dv.pvc.claim_name, "readOnly": True}}
            )
            mount = {"name": "data", "mountPath": dv.pvc.mount_path, "readOnly": True}
            if dv.pvc.sub_path:
                mount["subPath"] = dv.pvc.sub_path
            mounts.append(mount)
        elif dv.config_map is not None:
            volumes.append({"name": "data", "configMap": {"name": dv.config_map.name}})
            mounts.append({"name": "data", "mountPath": dv.config_map.mount_path, "readOnly": True})
    sources = source_volumes(resource)
    volumes += sources.volumes
    mounts += sources.worker_mounts
    if ssh_secret is not None:
        # 0440 root:fsGroup: readable by the trainer user; ssh/sshd accept keys not owned by the caller.
        volumes.append({"name": "ssh", "secret": {"secretName": ssh_secret, "defaultMode": 0o440}})
        mounts.append({"name": "ssh", "mountPath": SSH_DIR, "readOnly": True})
    volumes += [extra_volume(v) for v in spec.pod.volumes]
    for m in spec.pod.volume_mounts:
        mount = {"name": m.name, "mountPath": m.mount_path, "readOnly": m.read_only}
        if m.sub_path:
            mount["subPath"] = m.sub_path
        mounts.append(mount)
    return volumes, mounts


def extra_volume(volume: PodVolume) -> dict[str, Any]:
    """A `spec.pod.volumes` entry as a core/v1 Volume (exactly one source is set; validated in the model)."""
    out: dict[str, Any] = {"name": volume.name}
    if volume.config_map is not None:
        out["configMap"] = {"name": volume.config_map.name, "optional": volume.config_map.optional}
    elif volume.secret is not None:
        out["secret"] = {"secretName": volume.secret.secret_name, "optional": volume.secret.optional}
    elif volume.persistent_volume_claim is not None:
        pvc = volume.persistent_volume_claim
        out["persistentVolumeClaim"] = {"claimName": pvc.claim_name, "readOnly": pvc.read_only}
    elif volume.empty_dir is not None:
        empty: dict[str, Any] = {"medium": volume.empty_dir.medium} if volume.empty_dir.medium else {}
        if volume.empty_dir.size_limit:
            empty["sizeLimit"] = volume.empty_dir.size_limit
        out["emptyDir"] = empty
    return out


def image_pull_secrets(names: list[str], settings: OperatorSettings) -> list[dict[str, str]]:
    """The pod's imagePullSecrets: the operator's (platform registry) first, then the resource's, once each."""
    return [{"name": n} for n in dict.fromkeys([*settings.image_pull_secrets, *names])]


def pod_security_context(settings: OperatorSettings) -> dict[str, Any]:
    """The restricted pod security context of every pod the operator creates (non-root, RuntimeDefault)."""
    uid = settings.run_as_user
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """The restricted container security context: no privileges, no capabilities, read-only root."""
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod(
    resource: LoRAFineTuneResource,
    index: int,
    placement: PlacementDecision,
    settings: OperatorSettings,
    attempt: int,
    config_hash: str,
    volumes: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
) -> dict[str, Any]:
    spec = resource.spec
    device = placement.device
    assert device is not None
    name = worker_name(resource.name, index)
    labels = {
        **worker_selector(resource.name),
        LABEL_WORKER_INDEX: str(index),
        LABEL_ATTEMPT: str(attempt),
        "app.kubernetes.io/component": WORKER_ROLE,
    }
    # The resource's labels/annotations first, the operator's on top: validation already refuses
    # operator keys in spec.pod, and this order keeps selectors intact even if that check were bypassed.
    metadata = _metadata(resource, name, labels)
    metadata["labels"] = {**spec.pod.labels, **metadata["labels"]}
    metadata["annotations"] = {
        **spec.pod.annotations,
        ANNOTATION_CONFIG_HASH: config_hash,
        ANNOTATION_GENERATION: str(resource.generation),
    }
    ports = [
        {"name": "master", "containerPort": settings.master_port, "protocol": "TCP"},
        {"name": "metrics", "containerPort": settings.metrics_port, "protocol": "TCP"},
    ]
    if spec.distributed.launcher == "mpirun":
        ports.append({"name": "ssh", "containerPort": settings.ssh_port, "protocol": "TCP"})
    pod_security = pod_security_context(settings)
    if device == "xpu" and settings.gpu_supplemental_groups:
        pod_security["supplementalGroups"] = list(settings.gpu_supplemental_groups)
    container = {
        "name": CONTAINER_NAME,
        "image": spec.image or settings.image_for(device),
        "imagePullPolicy": spec.image_pull_policy or settings.image_pull_policy,
        "command": worker_command(resource.name, resource.namespace, index, spec, device, settings),
        # RUN_ID_ENV (the resource's uid) is the trainer's artifact identity: an S3 prefix that
        # holds another resource's finished adapter is refused, a restart of this one may finish it.
        "env": [*worker_env(resource.name, resource.namespace, index, spec, device, settings),
                {"name": RUN_ID_ENV, "value": resource.uid}],
        "ports": ports,
        "resources": {"requests": dict(placement.requests), "limits": dict(placement.limits)},
        "volumeMounts": [dict(m) for m in mounts],
        "workingDir": TMP_DIR,
        "securityContext": container_security_context(),
    }
    pod_spec: dict[str, Any] = {
        "hostname": name,
        "subdomain": service_name(resource.name),
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "securityContext": pod_security,
        "containers": [container],
        "volumes": [dict(v) for v in volumes],
    }
    pull_secrets = image_pull_secrets(spec.image_pull_secrets, settings)
    if pull_secrets:
        pod_spec["imagePullSecrets"] = pull_secrets
    service_account = spec.pod.service_account_name or settings.service_account
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    if spec.pod.runtime_class_name:
        pod_spec["runtimeClassName"] = spec.pod.runtime_class_name
    if spec.pod.env_from:
        # Kubernetes gives `env` precedence over `envFrom`: the operator's wiring variables always win.
        container["envFrom"] = [
            {"configMapRef": {"name": e.config_map_ref.name, "optional": e.config_map_ref.optional}}
            | ({"prefix": e.prefix} if e.prefix else {})
            for e in spec.pod.env_from
        ]
    if spec.placement.priority_class_name:
        pod_spec["priorityClassName"] = spec.placement.priority_class_name
    if placement.node_selector:
        pod_spec["nodeSelector"] = dict(placement.node_selector)
    if placement.affinity:
        pod_spec["affinity"] = placement.affinity
    if placement.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in placement.tolerations]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def _config_map(
    resource: LoRAFineTuneResource,
    cfg: TrainerConfig,
    device: str,
    settings: OperatorSettings,
    annotations: Mapping[str, str] | None,
) -> dict[str, Any]:
    """The run's ConfigMap: the trainer config and the launcher's files, the same for every attempt.

    `annotations`: the start record (controller/started.py), which the ConfigMap carries so that
    re-creating it (someone deleted it) keeps the record."""
    spec = resource.spec
    data = {CONFIG_KEY: dump_config(cfg), "wait-for-peers.py": WAIT_FOR_PEERS_PY}
    if spec.distributed.launcher == "mpirun":
        data["hostfile"] = hostfile(resource.name, resource.namespace, topology(spec, device))
        data["sshd_config"] = sshd_config(settings)
    metadata = _metadata(resource, config_map_name(resource.name))
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def config_hash(cm: Mapping[str, Any]) -> str:
    """sha256 of a ConfigMap's data (on the pods: a changed config is a changed pod)."""
    data = cm["data"]
    return hashlib.sha256("".join(f"{k}\0{v}\0" for k, v in sorted(data.items())).encode()).hexdigest()


def plan(
    resource: LoRAFineTuneResource,
    placement: PlacementDecision,
    settings: OperatorSettings,
    attempt: int = 0,
    record: Mapping[str, str] | None = None,
) -> Plan:
    """The manifests for `attempt` (0 first, +1 per restart) of a validated resource; `record`: the start
    record's annotations for the ConfigMap (`config_map`).

    Raises ValueError when the placement found no nodes (the handler reports NoMatchingNodes instead).
    """
    if placement.device is None:
        raise ValueError(f"cannot plan pods without a placement: {placement.reason}")
    spec = resource.spec
    device = placement.device
    topo = topology(spec, device)
    cfg = render_config(resource, device)
    cm = _config_map(resource, cfg, device, settings, record)
    digest = config_hash(cm)
    mpirun = spec.distributed.launcher == "mpirun"
    ports = [
        {"name": "master", "port": settings.master_port, "targetPort": settings.master_port, "protocol": "TCP"},
        {"name": "metrics", "port": settings.metrics_port, "targetPort": settings.metrics_port, "protocol": "TCP"},
    ]
    if mpirun:
        ports.append({"name": "ssh", "port": settings.ssh_port, "targetPort": settings.ssh_port, "protocol": "TCP"})
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(resource, service_name(resource.name)),
        "spec": {
            "clusterIP": "None",
            # DNS names must resolve before readiness: workers rendezvous before anything is "ready".
            "publishNotReadyAddresses": True,
            "selector": worker_selector(resource.name),
            "ports": ports,
        },
    }
    ssh_secret = ssh_secret_name(resource) if mpirun else None
    volumes, mounts = _volumes(resource, settings, ssh_secret)
    pods = [_pod(resource, i, placement, settings, attempt, digest, volumes, mounts) for i in range(topo.workers)]
    return Plan(
        placement=placement,
        trainer_config=cfg,
        config_map=cm,
        service=service,
        pods=pods,
        config_hash=digest,
        attempt=attempt,
        ssh_secret_name=ssh_secret,
        ssh_secret_to_create=mpirun and not spec.distributed.ssh_secret,
    )


def ssh_secret(resource: LoRAFineTuneResource, private_key: str, public_key: str) -> dict[str, Any]:
    """The `<name>-ssh` Secret for mpirun from a key pair the handler generated (e.g. `ssh-keygen -t
    ed25519`): private key in OpenSSH/PEM format, public key as an authorized_keys line."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(resource, ssh_secret_name(resource)),
        "type": SSH_SECRET_TYPE,
        "stringData": {"ssh-privatekey": private_key, "ssh-publickey": public_key},
    }
