"""The LoRAFineTune API: pydantic models of the custom resource (types only; the checks beyond the
schema live in `validation`).

Why pydantic here: these models are the single source of truth for the CRD schema (`crd.py`
generates it), for validating what the API server stored, and for rendering the trainer's config.
The trainer's own config models are embedded, never re-declared: a field added to the trainer shows
up in the CRD by regenerating it. Where a spec field mirrors a trainer field one-to-one (output
overwrite/merge/plot) its definition is reused from the trainer model, description and bounds
included.

Over 400 lines on purpose: the field descriptions are the CRD's documentation (and docs/reference.md)
and sit with the types they describe; the checks beyond the schema are in `validation`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from kubelora_trainer.config import (
    DataConfig,
    DistributedConfig,
    EvaluationConfig,
    LoraSettings,
    ModelConfig,
    OutputConfig,
    S3Source,
    S3Target,
    StrictModel,
    TrackingConfig,
    TrainerConfig,
    TrainingConfig,
)
from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from .conditions import ConditionReason, ConditionType
from .k8s_types import DNS_SUBDOMAIN as _DNS_SUBDOMAIN
from .k8s_types import Quantity, SecretName
from .names import OUTPUT_DIR
from .pod_overrides import PodOverrides

GROUP = "kubelora.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LoRAFineTune"
PLURAL = "lorafinetunes"
SINGULAR = "lorafinetune"
SHORT_NAMES = ("lft",)
CATEGORIES = ("kubelora",)

_SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
#: Bound on list fields that end up in every pod (a pod spec has a size limit; lists this long are typos).
MAX_PULL_SECRETS = 16
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"




def _reuse(model: type[StrictModel], name: str) -> Any:
    """A copy of a trainer field's definition (type bounds, default, description) for a spec field."""
    info: FieldInfo = model.model_fields[name]
    return copy.deepcopy(info)


def _relative_sub_path(value: str | None) -> str | None:
    if value is None:
        return None
    parts = value.split("/")
    if value.startswith("/") or ".." in parts or "" in parts:
        raise ValueError(f"{value!r} must be a relative path without '..' or empty parts, e.g. team/run-1")
    return value


# --------------------------------------------------------------------------- spec: building blocks


class WorkerResources(StrictModel):
    """What each worker pod requests."""

    gpus: int = Field(
        1,
        ge=0,
        le=64,
        description="Intel GPUs per worker (device xpu; ignored on cpu). Each local process drives one GPU.",
    )
    cpu: Quantity = Field(
        "4",
        description=(
            "CPU cores per worker (a Kubernetes quantity). On cpu the limit equals the request and "
            "OMP_NUM_THREADS = cores / processes per worker."
        ),
    )
    memory: Quantity = Field("16Gi", description="Memory per worker (request and limit), e.g. 16Gi.")


class PlacementSpec(StrictModel):
    """Extra scheduling constraints, added to what the operator derives from the device."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Labels a node must carry (ANDed with the device's own requirement)."
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Pod tolerations (core/v1 Toleration objects), e.g. for tainted GPU pools."
    )
    affinity: dict[str, Any] | None = Field(
        None,
        description=(
            "Pod affinity (core/v1 Affinity). Required node-affinity terms are merged with the device's "
            "requirement (AMX label on cpu)."
        ),
    )
    priority_class_name: str | None = Field(None, description="PriorityClass of the worker pods.")
    when_no_node_matches: Literal["Fail", "Wait"] | None = Field(
        None,
        description=(
            "When no node can take the workers now. `Fail`: create no pod, report Scheduled=False/"
            "NoMatchingNodes and re-check on every resync (static clusters). `Wait`: create the pods anyway "
            "(same nodeSelector, affinity, resources, tolerations) so that a cluster-autoscaler or Karpenter "
            "adds the node; Scheduled=False/WaitingForNodes while they are unbound, Failed/NodesNotAvailable "
            "after waitTimeoutSeconds; `device: auto` then takes the operator's first preferred device. "
            "Unset: the operator's setting `whenNoNodeMatches` (chart default Fail)."
        ),
    )
    wait_timeout_seconds: int | None = Field(
        None,
        ge=1,
        description=(
            "`Wait` mode: how long worker pods may stay unbound (since they were created or the run resumed) "
            "before the run fails with NodesNotAvailable. Unset: the operator's `placementWaitSeconds` (1800)."
        ),
    )


class EnvVar(StrictModel):
    """An extra environment variable for every worker."""

    name: str = Field(..., pattern=ENV_NAME_PATTERN, description="Variable name.")
    value: str | None = Field(None, description="Literal value.")
    value_from: dict[str, Any] | None = Field(
        None, description="A core/v1 EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError(f"env {self.name}: set value or valueFrom, not both")
        return self


class DistributedSpec(DistributedConfig):
    """How workers and their processes form one job: the trainer's distributed settings plus pod wiring."""

    launcher: Literal["torchrun", "mpirun"] = Field(
        "torchrun",
        description=(
            "`torchrun` (default): every worker runs torchrun with static rendezvous on worker 0, no SSH. "
            "`mpirun` (opt-in): worker 0 runs mpirun over SSH to sshd in the other workers, as MPI Operator "
            "does; the image must contain MPI and sshd."
        ),
    )
    procs_per_worker: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Training processes per worker pod. Default: `resources.gpus` on xpu, 1 on cpu.",
    )
    env: list[EnvVar] = Field(
        default_factory=list, description="Extra environment for every worker (cannot override the wiring variables)."
    )
    ccl_env: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "oneCCL/libfabric variables overriding the operator's defaults (CCL_ATL_TRANSPORT=ofi, "
            "FI_PROVIDER=tcp, CCL_WORKER_COUNT=1, CCL_ZE_IPC_EXCHANGE=sockets, ...)."
        ),
    )
    ssh_secret: str | None = Field(
        None,
        pattern=_DNS_SUBDOMAIN,
        description=(
            "mpirun only: Secret of type kubernetes.io/ssh-auth (keys ssh-privatekey, ssh-publickey). "
            "Default `<name>-ssh`, which the operator creates."
        ),
    )


class SecretKeySelector(StrictModel):
    """A key inside a Secret of the resource's namespace."""

    name: str = Field(..., pattern=_DNS_SUBDOMAIN, max_length=253, description="Secret name.")
    key: str = Field(..., pattern=_SECRET_KEY, description="Key inside the Secret.")


class S3CredentialsSecret(StrictModel):
    """The Secret holding S3 credentials; its values reach pods only as secretKeyRef env."""

    name: str = Field(..., pattern=_DNS_SUBDOMAIN, max_length=253, description="Secret name.")
    access_key_id_key: str = Field(
        "AWS_ACCESS_KEY_ID", pattern=_SECRET_KEY, description="Key holding the access key id."
    )
    secret_access_key_key: str = Field(
        "AWS_SECRET_ACCESS_KEY", pattern=_SECRET_KEY, description="Key holding the secret access key."
    )
    session_token_key: str | None = Field(
        None, pattern=_SECRET_KEY, description="Optional key holding a session token."
    )


class ClaimRef(StrictModel):
    """A PersistentVolumeClaim of the resource's namespace and a directory inside it."""

    claim_name: str = Field(..., pattern=_DNS_SUBDOMAIN, max_length=253, description="PVC name.")
    sub_path: str | None = Field(
        None,
        description="Directory inside the claim (relative). Default for outputs: `<namespace>/<name>`.",
    )

    @field_validator("sub_path")
    @classmethod
    def _check_sub_path(cls, value: str | None) -> str | None:
        return _relative_sub_path(value)


class S3Output(S3Target):
    """Upload the finished adapter to S3 (rank 0, manifest last); credentials from a Secret."""

    credentials_secret: S3CredentialsSecret | None = Field(
        None,
        description="Secret with the access key pair. Absent: the pod's ambient credentials (e.g. workload identity).",
    )
    workdir_pvc: ClaimRef | None = Field(
        None,
        description=(
            "PVC for the run dir (checkpoints) while training, so that restarts and suspend/resume continue "
            "from checkpoints. Absent: an emptyDir, and a restart starts over."
        ),
    )


class OutputSpec(StrictModel):
    """Where the run dir lives and where the adapter is delivered: exactly one of `pvc` or `s3`."""

    pvc: ClaimRef | None = Field(
        None, description="Write the run dir into this claim under `subPath` (default `<namespace>/<name>`)."
    )
    s3: S3Output | None = Field(None, description="Upload the finished adapter to this S3 prefix.")
    overwrite: bool = _reuse(OutputConfig, "overwrite")
    merge: bool = _reuse(OutputConfig, "merge")
    plot: bool = _reuse(OutputConfig, "plot")

    @model_validator(mode="after")
    def _exactly_one(self) -> OutputSpec:
        if (self.pvc is None) == (self.s3 is None):
            raise ValueError("output: set exactly one of pvc or s3")
        return self


class PvcDataVolume(ClaimRef):
    """A PVC with the dataset, mounted read-only."""

    sub_path: str | None = Field(
        None, description="Directory inside the claim to mount (relative). Default: the claim's root."
    )

    mount_path: str = Field("/data", pattern=r"^/", description="Absolute mount path in the pod.")


class ConfigMapDataVolume(StrictModel):
    """A ConfigMap with (small) data files, mounted read-only; each key becomes a file."""

    name: str = Field(..., pattern=_DNS_SUBDOMAIN, max_length=253, description="ConfigMap name.")
    mount_path: str = Field("/data", pattern=r"^/", description="Absolute mount path in the pod.")


class DataVolumeSpec(StrictModel):
    """A volume with the training data; `data.path` then points inside `mountPath`."""

    pvc: PvcDataVolume | None = Field(None, description="Mount a PVC (read-only).")
    config_map: ConfigMapDataVolume | None = Field(None, description="Mount a ConfigMap (read-only).")

    @model_validator(mode="after")
    def _exactly_one(self) -> DataVolumeSpec:
        if (self.pvc is None) == (self.config_map is None):
            raise ValueError("dataVolume: set exactly one of pvc or configMap")
        return self

    @property
    def mount_path(self) -> str:
        """Where the volume appears in the pod."""
        src = self.pvc or self.config_map
        assert src is not None
        return src.mount_path


class SecretsSpec(StrictModel):
    """Secrets the trainer may need (only ever passed as secretKeyRef env)."""

    hub_token_secret: SecretKeySelector | None = Field(
        None, description="Hugging Face hub token, exposed to the trainer as HF_TOKEN."
    )


class S3SourceSpec(S3Source):
    """The S3-compatible server of the `s3://` model and data sources; credentials from a Secret."""

    credentials_secret: S3CredentialsSecret | None = _reuse(S3Output, "credentials_secret")


class SourcesSpec(StrictModel):
    """Where `s3://` and `pvc://` model and data sources come from and are fetched to (docs/sources.md)."""

    s3: S3SourceSpec | None = Field(None, description="Server of the `s3://` sources. Absent: AWS S3 itself.")
    cache_pvc: ClaimRef | None = Field(
        None,
        description=(
            "A model-cache PVC: `s3://` sources are fetched into it once (by the `<name>-fetch` pod) and reused "
            "by later runs and restarts while the source is unchanged. Absent: a per-run directory on the run "
            "dir's claim (output.pvc or output.s3.workdirPvc). Several workers need ReadWriteMany."
        ),
    )


# --------------------------------------------------------------------------- spec


class LoRAFineTuneSpec(StrictModel):
    """Desired state: the trainer's recipe plus how many pods, on which hardware, writing where."""

    model: ModelConfig = _reuse(TrainerConfig, "model")
    data: DataConfig = Field(
        ...,
        description=(
            "Instruction data and its prompt template. `path` is a path inside the pod (on `dataVolume`), "
            "a hub dataset id, `s3://bucket/key`, `pvc://CLAIM/PATH`, or `sample://NAME` for a file bundled "
            "with the trainer image."
        ),
    )
    lora: LoraSettings = _reuse(TrainerConfig, "lora")
    training: TrainingConfig = _reuse(TrainerConfig, "training")
    evaluation: EvaluationConfig = _reuse(TrainerConfig, "evaluation")
    data_volume: DataVolumeSpec | None = Field(None, description="Volume holding the training data.")
    sources: SourcesSpec = Field(
        default_factory=lambda: SourcesSpec.model_validate({}),
        description="`s3://` and `pvc://` model/data sources: server, credentials, model cache.",
    )
    tracking: TrackingConfig = _reuse(TrainerConfig, "tracking")
    device: Literal["auto", "xpu", "cpu"] = Field(
        "auto",
        description=(
            "`xpu`: Intel GPUs via the device plugin; `cpu`: AMX-capable Xeon nodes; `auto`: xpu when nodes "
            "offer enough GPUs, else cpu on AMX nodes (decision and reason in status.placement)."
        ),
    )
    workers: int = Field(1, ge=1, le=256, description="Number of worker pods.")
    resources: WorkerResources = Field(
        default_factory=lambda: WorkerResources.model_validate({}), description="Per-worker resources."
    )
    image: str | None = Field(
        None, min_length=1, description="Trainer image. Default: the operator's image for the placed device."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Image pull policy. Default: the operator's setting (IfNotPresent)."
    )
    image_pull_secrets: list[SecretName] = Field(
        default_factory=list,
        max_length=MAX_PULL_SECRETS,
        description=(
            "Names of docker-registry Secrets (namespace of the resource) for pulling the trainer image from a "
            "private registry; added to the operator's `imagePullSecrets` setting. Each must exist."
        ),
    )
    placement: PlacementSpec = Field(
        default_factory=lambda: PlacementSpec.model_validate({}), description="Extra scheduling constraints."
    )
    distributed: DistributedSpec = Field(
        default_factory=lambda: DistributedSpec.model_validate({}), description="Multi-process wiring."
    )
    output: OutputSpec = Field(..., description="Run dir and artifact delivery (a PVC or S3).")
    secrets: SecretsSpec = Field(
        default_factory=lambda: SecretsSpec.model_validate({}), description="Secrets for the trainer."
    )
    pod: PodOverrides = Field(
        default_factory=lambda: PodOverrides.model_validate({}),
        description=(
            "What the platform may shape in every worker pod: labels, annotations, runtimeClassName, "
            "serviceAccountName, shmSize, extra volumes and mounts, env from ConfigMaps. The restricted "
            "security context is not negotiable."
        ),
    )
    backoff_limit: int = Field(
        3, ge=0, le=100, description="Restarts (from the newest checkpoint) after a worker fails, before Failed."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Wall-clock limit from start; when exceeded, pods are removed and the run Failed."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the resource (and its children) this long after it Succeeded or Failed."
    )
    suspend: bool = Field(
        False, description="true: remove worker pods, keep checkpoints; false again: resume from the newest one."
    )

    def procs_per_worker(self, device: str) -> int:
        """Processes per worker on the placed device: explicit, else one per GPU on xpu, one on cpu."""
        if self.distributed.procs_per_worker is not None:
            return self.distributed.procs_per_worker
        return max(1, self.resources.gpus) if device == "xpu" else 1

    def to_trainer_config(self, *, device: str, run_dir: str = OUTPUT_DIR) -> TrainerConfig:
        """The trainer's config for the pods: the embedded sections plus operator-decided fields.

        S3 credentials never enter it (they are env from a Secret); `output.dir` is the pod path of the
        run dir. Raises pydantic's ValidationError when the trainer's cross-field rules reject it.
        """
        s3 = None
        if self.output.s3 is not None:
            s3 = S3Target.model_validate(self.output.s3.model_dump(include=set(S3Target.model_fields)))
        return TrainerConfig(
            model=self.model.model_copy(deep=True),
            data=self.data.model_copy(deep=True),
            lora=self.lora.model_copy(deep=True),
            training=self.training.model_copy(deep=True),
            evaluation=self.evaluation.model_copy(deep=True),
            distributed=DistributedConfig.model_validate(
                self.distributed.model_dump(include=set(DistributedConfig.model_fields))
            ),
            tracking=self.tracking.model_copy(deep=True),
            output=OutputConfig(
                dir=run_dir,
                overwrite=self.output.overwrite,
                merge=self.output.merge,
                plot=self.output.plot,
                s3=s3,
            ),
            device=device,
            ipex=False,  # IPEX is retired upstream; not offered through the CRD
        )


# --------------------------------------------------------------------------- status


class _StatusModel(StrictModel):
    """Status parts read back leniently: unknown keys (older/newer operators) are ignored."""

    model_config = ConfigDict(extra="ignore")


class Condition(_StatusModel):
    """A Kubernetes-style condition."""

    type: str = Field(..., description="Condition type: " + ", ".join(t.value for t in ConditionType) + ".")
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field(
        ..., description="CamelCase reason, one of: " + ", ".join(r.value for r in ConditionReason) + "."
    )
    message: str = Field("", description="Human-readable details.")
    last_transition_time: str | None = Field(None, description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation the condition is about.")


class PlacementStatus(_StatusModel):
    """The placement decision."""

    device: Literal["xpu", "cpu"] | None = Field(None, description="Device the workers were placed on.")
    node_pool: str | None = Field(
        None, description="What selects the nodes, e.g. `gpu.intel.com/i915>=1` or the AMX label."
    )
    reason: str | None = Field(None, description="Why this placement (what nodes offer, what was asked).")


class ProgressStatus(_StatusModel):
    """Training progress as reported by rank 0's metrics."""

    step: int | None = Field(None, ge=0, description="Optimiser steps done.")
    total_steps: int | None = Field(None, ge=0, description="Optimiser steps planned.")
    epoch: float | None = Field(None, ge=0, description="Epochs done (fractional).")
    train_loss: float | None = Field(None, description="Last logged training loss.")
    eval_loss: float | None = Field(None, description="Last held-out loss.")
    tokens_per_second: float | None = Field(None, ge=0, description="Training throughput over all ranks.")
    eta_seconds: int | None = Field(None, ge=0, description="Estimated seconds to the end of training.")
    percent: int | None = Field(None, ge=0, le=100, description="step / totalSteps in percent.")


class ArtifactStatus(_StatusModel):
    """The delivered adapter."""

    uri: str | None = Field(None, description="Where the adapter is: pvc://claim/subPath/adapter or s3://...")
    size_bytes: int | None = Field(None, ge=0, description="Size of adapter_model.safetensors in bytes.")
    sha256: str | None = Field(None, description="SHA-256 of adapter_model.safetensors (hex).")


class WorkersStatus(_StatusModel):
    """Worker pods of the current attempt."""

    ready: int = Field(0, ge=0, description="Worker pods running.")
    total: int = Field(0, ge=0, description="Worker pods wanted.")


class LoRAFineTuneStatus(_StatusModel):
    """Observed state, written by the operator only."""

    conditions: list[Condition] = Field(default_factory=list, description="Current conditions.")
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation last acted on.")
    phase: str | None = Field(
        None,
        description=(
            "Summary of the conditions: Pending, Invalid, Unschedulable, Starting, Running, Restarting, "
            "Suspended, Succeeded or Failed."
        ),
    )
    start_time: str | None = Field(None, description="When worker pods were first created (RFC 3339).")
    completion_time: str | None = Field(None, description="When the run Succeeded or Failed (RFC 3339).")
    placement: PlacementStatus | None = Field(None, description="Placement decision and its reason.")
    progress: ProgressStatus | None = Field(None, description="Training progress.")
    artifact: ArtifactStatus | None = Field(None, description="The delivered adapter.")
    restarts: int = Field(0, ge=0, description="Restarts after worker failures so far (attempt number).")
    workers: WorkersStatus | None = Field(None, description="Worker pods ready/total.")


# --------------------------------------------------------------------------- the resource


class SpecError(ValueError):
    """The spec is rejected; `problems` are specific one-line messages for a condition and an Event."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def format_errors(err: ValidationError, prefix: str = "spec") -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        msg = e["msg"].removeprefix("Value error, ")
        out.append(f"{loc}: {msg}")
    return out


def parse_spec(raw: Mapping[str, Any]) -> LoRAFineTuneSpec:
    """Validate a raw spec mapping (as stored by the API server); raises SpecError."""
    try:
        return LoRAFineTuneSpec.model_validate(dict(raw))
    except ValidationError as err:
        raise SpecError(format_errors(err)) from None


@dataclass(frozen=True)
class LoRAFineTuneResource:
    """The identity of one LoRAFineTune plus its parsed spec: everything `plan` needs from the object."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: LoRAFineTuneSpec

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> LoRAFineTuneResource:
        """Build from a kopf body / API object; raises SpecError when the spec is rejected."""
        meta = body.get("metadata", {})
        return cls(
            name=meta["name"],
            namespace=meta.get("namespace") or "default",
            uid=meta.get("uid", ""),
            generation=int(meta.get("generation") or 1),
            spec=parse_spec(body.get("spec") or {}),
        )
