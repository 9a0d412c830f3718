"""The checks a schema cannot express: cross-field rules, reachability of paths in the pod, references.

Why apart from `api`: `api` holds the types (and generates the CRD); these checks also need the
operator's settings (default images) and grow with every feature, so they live here and `api`
depends on nothing of the operator's runtime.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from kubelora_trainer import contract
from kubelora_trainer.config import SAMPLE_SCHEME
from kubelora_trainer.sources import PVC_SCHEME, S3_SCHEME
from pydantic import ValidationError

from .api import ENV_NAME_PATTERN, LoRAFineTuneSpec, S3CredentialsSecret, SpecError, format_errors, parse_spec
from .conditions import ConditionReason
from .fetch import parse_pvc_uri, source_values
from .names import RESERVED_MOUNT_PATHS
from .settings import OperatorSettings

#: Environment the operator sets on workers; `distributed.env` may not override it.
OPERATOR_ENV = frozenset(
    {
        "MASTER_ADDR",
        "MASTER_PORT",
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "NODE_RANK",
        "NNODES",
        "NPROC_PER_NODE",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "HF_TOKEN",
        "HOME",
        "KUBELORA_CACHE",
        contract.METRICS_PORT_ENV,
        contract.RUN_ID_ENV,
        contract.EXIT_DIR_ENV,
        contract.TERMINATION_LOG_ENV,
    }
)


#: Module names that exist in the bundled models, to reject typos in `lora.targetModules` early.
KNOWN_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "smollm2-135m": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}

_DNS_LABEL_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_SAMPLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")


@dataclass(frozen=True)
class Reference:
    """An object in the resource's namespace that must exist before pods are created."""

    kind: Literal["Secret", "PersistentVolumeClaim", "ConfigMap"]
    name: str
    field: str
    key: str | None = None

    @property
    def reason(self) -> ConditionReason:
        """The Validated=False reason when it is missing."""
        return {
            "Secret": ConditionReason.SECRET_NOT_FOUND,
            "PersistentVolumeClaim": ConditionReason.PVC_NOT_FOUND,
            "ConfigMap": ConditionReason.CONFIG_MAP_NOT_FOUND,
        }[self.kind]

    def missing_message(self) -> str:
        """The message for a missing object (or key)."""
        what = f"{self.kind} {self.name!r}"
        if self.key is not None:
            return f"spec.{self.field}: {what} (key {self.key!r}) not found in the namespace"
        return f"spec.{self.field}: {what} not found in the namespace"


def references(spec: LoRAFineTuneSpec) -> list[Reference]:
    """Secrets, PVCs and ConfigMaps the spec points at (the handler checks they exist, keys included)."""
    refs: list[Reference] = []
    out = spec.output
    if out.pvc is not None:
        refs.append(Reference("PersistentVolumeClaim", out.pvc.claim_name, "output.pvc.claimName"))
    if out.s3 is not None:
        if out.s3.workdir_pvc is not None:
            refs.append(
                Reference("PersistentVolumeClaim", out.s3.workdir_pvc.claim_name, "output.s3.workdirPvc.claimName")
            )
        refs += _s3_secret_references(out.s3.credentials_secret, "output.s3.credentialsSecret")
    if spec.data_volume is not None:
        if spec.data_volume.pvc is not None:
            refs.append(Reference("PersistentVolumeClaim", spec.data_volume.pvc.claim_name, "dataVolume.pvc.claimName"))
        if spec.data_volume.config_map is not None:
            refs.append(Reference("ConfigMap", spec.data_volume.config_map.name, "dataVolume.configMap.name"))
    for i, pull in enumerate(spec.image_pull_secrets):
        refs.append(Reference("Secret", pull, f"imagePullSecrets[{i}]"))
    for i, vol in enumerate(spec.pod.volumes):
        field = f"pod.volumes[{i}]"
        if vol.config_map is not None and not vol.config_map.optional:
            refs.append(Reference("ConfigMap", vol.config_map.name, f"{field}.configMap.name"))
        if vol.secret is not None and not vol.secret.optional:
            refs.append(Reference("Secret", vol.secret.secret_name, f"{field}.secret.secretName"))
        if vol.persistent_volume_claim is not None:
            claim = vol.persistent_volume_claim.claim_name
            refs.append(Reference("PersistentVolumeClaim", claim, f"{field}.persistentVolumeClaim.claimName"))
    for i, source in enumerate(spec.pod.env_from):
        if not source.config_map_ref.optional:
            refs.append(Reference("ConfigMap", source.config_map_ref.name, f"pod.envFrom[{i}].configMapRef.name"))
    hub = spec.secrets.hub_token_secret
    if hub is not None:
        refs.append(Reference("Secret", hub.name, "secrets.hubTokenSecret", hub.key))
    refs += _source_references(spec)
    if spec.distributed.launcher == "mpirun" and spec.distributed.ssh_secret:
        refs.append(Reference("Secret", spec.distributed.ssh_secret, "distributed.sshSecret", "ssh-privatekey"))
        refs.append(Reference("Secret", spec.distributed.ssh_secret, "distributed.sshSecret", "ssh-publickey"))
    return refs


def _s3_secret_references(cred: S3CredentialsSecret | None, field: str) -> list[Reference]:
    if cred is None:
        return []
    keys = [cred.access_key_id_key, cred.secret_access_key_key] + ([cred.session_token_key] if cred.session_token_key else [])
    return [Reference("Secret", cred.name, field, key) for key in keys]


def _source_references(spec: LoRAFineTuneSpec) -> list[Reference]:
    """The sources' credentials Secret, the model-cache PVC and each pvc:// claim."""
    cred = spec.sources.s3.credentials_secret if spec.sources.s3 is not None else None
    refs = _s3_secret_references(cred, "sources.s3.credentialsSecret")
    if spec.sources.cache_pvc is not None:
        refs.append(Reference("PersistentVolumeClaim", spec.sources.cache_pvc.claim_name, "sources.cachePvc.claimName"))
    for field, value in source_values(spec):
        if value.startswith(PVC_SCHEME):
            with contextlib.suppress(ValueError):  # a malformed one is reported by source_problems
                refs.append(Reference("PersistentVolumeClaim", parse_pvc_uri(value)[0], field))
    return refs


def validate_name(name: str, workers: int) -> list[str]:
    """The resource name must yield valid child names: `<name>-workers` (a Service, DNS-1035 label)
    and `<name>-worker-<i>` hostnames, both at most 63 characters."""
    problems = []
    if not _DNS_LABEL_1035.match(name):
        problems.append(
            f"metadata.name {name!r}: must start with a letter and hold only lowercase letters, digits and '-' "
            "(it names a Service and pod hostnames)"
        )
    longest = f"{name}-worker-{max(workers - 1, 0)}"
    if len(longest) > 63 or len(f"{name}-workers") > 63:
        problems.append(
            f"metadata.name {name!r} is too long: child hostname {longest!r} would exceed 63 characters "
            f"(keep the name at most {63 - len(longest) + len(name)} characters)"
        )
    return problems


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root + "/")


def _user_mounts(spec: LoRAFineTuneSpec) -> list[str]:
    """Mount paths the resource adds to the pod: the dataVolume and `pod.volumeMounts`."""
    paths = [m.mount_path for m in spec.pod.volume_mounts]
    return ([spec.data_volume.mount_path] if spec.data_volume else []) + paths


def _check_pod_path(field: str, value: str | None, spec: LoRAFineTuneSpec, *, allow_sample: bool) -> list[str]:
    """A path the trainer opens in the pod must be reachable there."""
    if not value or value.startswith((S3_SCHEME, PVC_SCHEME)):
        return []  # checked by source_problems, fetched or checked by the fetch pod
    if value.startswith(SAMPLE_SCHEME):
        name = value[len(SAMPLE_SCHEME) :]
        if not allow_sample:
            return [f"spec.{field}: {SAMPLE_SCHEME} names bundled data files and cannot be used here"]
        if not _SAMPLE_NAME.match(name):
            return [
                f"spec.{field}: {value!r} is not a bundled sample; use {SAMPLE_SCHEME}FILE with a plain file name "
                "such as sample://train.jsonl"
            ]
        return []
    if value.startswith("/"):
        mounted = spec.data_volume.mount_path if spec.data_volume else None
        if any(_under(value, path) for path in _user_mounts(spec)):
            return []
        if spec.image is not None:
            return []  # a custom image may ship the file; nothing to check
        where = f"the dataVolume is mounted at {mounted}" if mounted else "no dataVolume is mounted"
        bundled = f"use {SAMPLE_SCHEME}NAME for bundled data, " if allow_sample else ""
        return [
            f"spec.{field}: {value!r} is not on a mounted volume ({where}); mount it with spec.dataVolume, "
            f"{bundled}or bring an image that contains it"
        ]
    if value.lower().endswith(_FILE_SUFFIXES):
        bundled = f" or {SAMPLE_SCHEME}NAME for bundled data" if allow_sample else ""
        return [
            f"spec.{field}: relative file path {value!r} does not exist in the pod; give an absolute path on "
            f"spec.dataVolume{bundled}"
        ]
    return []  # a hub id


def source_problems(spec: LoRAFineTuneSpec) -> list[str]:
    """`pvc://` sources must name a claim and a path; `s3://` sources need a claim to be fetched into once."""
    problems = []
    s3 = []
    for field, value in source_values(spec):
        if value.startswith(PVC_SCHEME):
            try:
                parse_pvc_uri(value)
            except ValueError as err:
                problems.append(f"spec.{field}: {err}")
        elif value.startswith(S3_SCHEME):
            if not value[len(S3_SCHEME) :].partition("/")[0]:
                problems.append(f"spec.{field}: {value!r} names no bucket; expected s3://bucket/key")
            s3.append(field)
    out = spec.output
    run_claim = out.pvc is not None or (out.s3 is not None and out.s3.workdir_pvc is not None)
    if s3 and spec.sources.cache_pvc is None and not run_claim:
        problems.append(
            f"spec.{s3[0]}: an s3:// source is fetched once for all workers into a claim: set "
            "spec.sources.cachePvc (a model cache reused across runs), or give the run dir a claim "
            "(output.pvc or output.s3.workdirPvc)"
        )
    return problems


def validate_spec(spec: LoRAFineTuneSpec, settings: OperatorSettings) -> list[str]:
    """Problems the schema cannot express, as specific messages (empty: valid).

    Covers device/GPU/process consistency, launcher/backend/DeepSpeed combinations, data reachability
    inside the pod, known LoRA target modules of bundled models, mount path collisions, env overrides
    of operator-managed variables, and the trainer's own cross-field rules.
    """
    problems: list[str] = []
    dist = spec.distributed
    gpus = spec.resources.gpus
    devices = ("xpu", "cpu") if spec.device == "auto" else (spec.device,)

    if spec.device == "xpu" and gpus < 1:
        problems.append("spec.resources.gpus is 0 but device is xpu: each xpu worker needs at least one GPU")
    if "xpu" in devices and gpus >= 1 and dist.procs_per_worker is not None and dist.procs_per_worker != gpus:
        hint = " (set device: cpu to run several processes per CPU worker)" if spec.device == "auto" else ""
        problems.append(
            f"spec.distributed.procsPerWorker ({dist.procs_per_worker}) must equal spec.resources.gpus ({gpus}) "
            f"on xpu: each process drives one GPU{hint}"
        )

    world = [spec.workers * spec.procs_per_worker(d) for d in devices]
    if spec.data.max_samples is not None:
        needed = max(world) * spec.training.micro_batch_size
        if spec.data.max_samples < needed:
            problems.append(
                f"spec.data.maxSamples ({spec.data.max_samples}) is smaller than one batch per process "
                f"({max(world)} processes x microBatchSize {spec.training.micro_batch_size} = {needed})"
            )

    if dist.backend == "nccl":
        problems.append(
            "spec.distributed.backend nccl needs CUDA GPUs; kubelora places on Intel GPUs (xccl) or CPUs (gloo, ccl)"
        )
    if dist.backend == "xccl" and spec.device == "cpu":
        problems.append("spec.distributed.backend xccl needs Intel GPUs but device is cpu; use gloo or auto")
    if dist.backend == "gloo" and spec.device == "xpu":
        problems.append("spec.distributed.backend gloo cannot reduce XPU tensors; use xccl or auto on xpu")
    if dist.backend == "mpi" and dist.launcher != "mpirun":
        problems.append("spec.distributed.backend mpi needs launcher mpirun (processes get their rank from MPI)")
    if dist.launcher == "mpirun" and dist.deepspeed_stage != 0:
        problems.append(
            f"spec.distributed.deepspeedStage {dist.deepspeed_stage} is supported with launcher torchrun only; "
            "use torchrun or deepspeedStage 0"
        )
    if dist.deepspeed_stage == 3 and max(world) == 1:
        problems.append("spec.distributed.deepspeedStage 3 shards weights across processes but there is only one")

    for i, env in enumerate(dist.env):
        if env.name in OPERATOR_ENV:
            problems.append(f"spec.distributed.env[{i}]: {env.name} is set by the operator and cannot be overridden")
    env_name = re.compile(ENV_NAME_PATTERN)
    for key in dist.ccl_env:
        if not env_name.match(key):
            problems.append(f"spec.distributed.cclEnv: {key!r} is not a valid environment variable name")

    problems += source_problems(spec)
    problems += _check_pod_path("data.path", spec.data.path, spec, allow_sample=True)
    problems += _check_pod_path("data.evalPath", spec.data.eval_path, spec, allow_sample=True)
    problems += _check_pod_path("distributed.deepspeedConfig", dist.deepspeed_config, spec, allow_sample=False)
    if spec.model.name_or_path.startswith("/"):
        problems += _check_pod_path("model.nameOrPath", spec.model.name_or_path, spec, allow_sample=False)

    if spec.data_volume is not None:
        mount = spec.data_volume.mount_path
        for reserved in RESERVED_MOUNT_PATHS:
            if _under(mount, reserved) or _under(reserved, mount):
                problems.append(
                    f"spec.dataVolume mountPath {mount!r} collides with {reserved}, which the operator uses"
                )
                break

    for i, extra in enumerate(spec.pod.volume_mounts):
        for taken in (*RESERVED_MOUNT_PATHS, *([spec.data_volume.mount_path] if spec.data_volume else [])):
            if _under(extra.mount_path, taken) or _under(taken, extra.mount_path):
                owner = "the dataVolume" if taken not in RESERVED_MOUNT_PATHS else "the operator"
                problems.append(
                    f"spec.pod.volumeMounts[{i}] mountPath {extra.mount_path!r} collides with {taken}, "
                    f"which {owner} uses"
                )
                break

    known = KNOWN_TARGET_MODULES.get(spec.model.name_or_path)
    if known is not None and isinstance(spec.lora.target_modules, list):
        unknown = [m for m in spec.lora.target_modules if m not in known]
        if unknown:
            problems.append(
                f"spec.lora.targetModules: {', '.join(unknown)} not in model {spec.model.name_or_path} "
                f"(known: {', '.join(known)}, or all-linear)"
            )

    for device in devices:
        image = spec.image or settings.image_for(device)
        if not image:
            problems.append(f"spec.image is not set and the operator has no default image for {device}")
    try:
        spec.to_trainer_config(device=devices[0])
    except ValidationError as err:
        problems += format_errors(err)
    return problems


def check_resource(
    name: str, raw_spec: Mapping[str, Any], settings: OperatorSettings
) -> tuple[LoRAFineTuneSpec | None, list[str]]:
    """Everything that can be checked without the API server: (parsed spec or None, problems)."""
    try:
        spec = parse_spec(raw_spec)
    except SpecError as err:
        return None, err.problems
    problems = validate_name(name, spec.workers) + validate_spec(spec, settings)
    return (spec if not problems else None), problems


def pvc_problems(spec: LoRAFineTuneSpec, claim_name: str, access_modes: list[str], *, read_only: bool) -> list[str]:
    """Several workers on different nodes can share a claim only with a *Many access mode.

    The handler calls this with the PVC's `spec.accessModes` (read_only for the data volume). A
    ReadWriteOnce claim still works when all workers land on one node, but that is not guaranteed, so
    it is reported instead of leaving pods Pending on a multi-attach error.
    """
    if spec.workers <= 1:
        return []
    ok = {"ReadWriteMany"} | ({"ReadOnlyMany"} if read_only else set())
    if ok & set(access_modes):
        return []
    need = " or ".join(sorted(ok))
    return [
        f"PVC {claim_name!r} has access modes {', '.join(access_modes) or 'none'}; {spec.workers} workers "
        f"on several nodes need {need}"
    ]
