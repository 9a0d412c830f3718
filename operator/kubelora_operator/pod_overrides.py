"""`spec.pod`: what a platform may shape in every worker pod, as a closed, validated subset of core/v1.

Why closed and not a free-form pod template (Kubeflow Trainer v2's podTemplateOverrides): each field
here is one a platform needs (cost and Kueue labels, `sidecar.istio.io/inject`, a RuntimeClass, a
workload-identity ServiceAccount, a bigger /dev/shm for multi-worker CCL, a ConfigMap of proxy
settings, an extra PVC or Secret volume) and none of them can loosen the restricted security
context: no hostPath, hostIPC, privileged or capability field exists, and volume types are the four
that PodSecurity `restricted` allows. The operator's own labels, annotations, volumes and paths
cannot be overridden; each clash is one specific spec message.
"""

from __future__ import annotations

import re
from typing import Literal

from kubelora_trainer.config import StrictModel
from pydantic import Field, field_validator, model_validator

from .k8s_types import DNS_LABEL, DNS_SUBDOMAIN, Quantity, SecretName

#: Label/annotation key prefix the operator owns (kubelora.dev/name, /attempt, /config-sha256, ...).
OPERATOR_KEY_DOMAIN = "kubelora.dev"
#: Well-known labels the operator sets on every worker (selectors and tooling rely on them).
OPERATOR_LABEL_KEYS = frozenset(
    {
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/managed-by",
        "app.kubernetes.io/component",
    }
)
#: Volume names the operator uses in worker pods.
OPERATOR_VOLUMES = frozenset({"config", "tmp", "cache", "dshm", "output", "data", "ssh"})
MAX_ITEMS = 16
MAX_METADATA = 64

_NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_SUBDOMAIN = re.compile(DNS_SUBDOMAIN)
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_ENV_PREFIX = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"


def qualified_name_problem(key: str) -> str | None:
    """Why `key` is not a Kubernetes qualified name (`[prefix/]name`, as label and annotation keys), or None."""
    prefix, sep, name = key.rpartition("/")
    if sep and (not prefix or len(prefix) > 253 or not _SUBDOMAIN.match(prefix)):
        return f"{key!r}: the prefix before '/' must be a DNS subdomain such as example.com"
    if not name or len(name) > 63 or not _NAME_PART.match(name):
        return (
            f"{key!r}: the name must be 1-63 characters of letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


def is_operator_key(key: str) -> bool:
    """A label/annotation key the operator sets itself (its domain, or a well-known label it relies on)."""
    prefix = key.rpartition("/")[0]
    return key in OPERATOR_LABEL_KEYS or prefix == OPERATOR_KEY_DOMAIN or prefix.endswith("." + OPERATOR_KEY_DOMAIN)


def _metadata_problems(kind: str, items: dict[str, str]) -> list[str]:
    problems = []
    for key, value in items.items():
        problem = qualified_name_problem(key)
        if problem:
            problems.append(f"{kind} {problem}")
        elif is_operator_key(key):
            problems.append(f"{kind} {key!r} is set by the operator and cannot be overridden")
        elif kind == "label" and (len(value) > 63 or not _LABEL_VALUE.match(value)):
            problems.append(
                f"label {key!r}: value {value!r} must be at most 63 letters, digits, '-', '_' or '.', "
                "starting and ending with a letter or digit"
            )
    return problems


class ConfigMapVolume(StrictModel):
    """A ConfigMap as files."""

    name: SecretName = Field(..., description="ConfigMap name.")
    optional: bool = Field(False, description="Start even when the ConfigMap does not exist.")


class SecretVolume(StrictModel):
    """A Secret as files."""

    secret_name: SecretName = Field(..., description="Secret name.")
    optional: bool = Field(False, description="Start even when the Secret does not exist.")


class ClaimVolume(StrictModel):
    """A PersistentVolumeClaim."""

    claim_name: SecretName = Field(..., description="PVC name.")
    read_only: bool = Field(False, description="Mount read-only.")


class EmptyDirVolume(StrictModel):
    """Scratch space that lives as long as the pod."""

    medium: Literal["", "Memory"] = Field("", description="`Memory`: tmpfs (counts against the memory limit).")
    size_limit: Quantity | None = Field(None, description="Size limit, e.g. 10Gi.")


class PodVolume(StrictModel):
    """An extra volume: exactly one of configMap, secret, persistentVolumeClaim or emptyDir."""

    name: str = Field(..., pattern=DNS_LABEL, max_length=63, description="Volume name (not one of the operator's).")
    config_map: ConfigMapVolume | None = Field(None, description="A ConfigMap.")
    secret: SecretVolume | None = Field(None, description="A Secret.")
    persistent_volume_claim: ClaimVolume | None = Field(None, description="A PVC.")
    empty_dir: EmptyDirVolume | None = Field(None, description="An emptyDir.")

    @model_validator(mode="after")
    def _exactly_one(self) -> PodVolume:
        sources = [self.config_map, self.secret, self.persistent_volume_claim, self.empty_dir]
        if sum(s is not None for s in sources) != 1:
            raise ValueError(
                f"volume {self.name}: set exactly one of configMap, secret, persistentVolumeClaim or emptyDir"
            )
        if self.name in OPERATOR_VOLUMES:
            raise ValueError(f"volume name {self.name!r} is used by the operator ({', '.join(sorted(OPERATOR_VOLUMES))})")
        return self


class PodVolumeMount(StrictModel):
    """Where an extra volume appears in the trainer container."""

    name: str = Field(..., pattern=DNS_LABEL, max_length=63, description="Name of a volume in `pod.volumes`.")
    mount_path: str = Field(..., pattern=r"^/", description="Absolute path (not under the operator's paths).")
    sub_path: str | None = Field(None, description="Directory inside the volume (relative).")
    read_only: bool = Field(False, description="Mount read-only.")

    @field_validator("sub_path")
    @classmethod
    def _relative(cls, value: str | None) -> str | None:
        if value is not None and (value.startswith("/") or ".." in value.split("/") or "" in value.split("/")):
            raise ValueError(f"{value!r} must be a relative path without '..' or empty parts")
        return value


class ConfigMapEnvSource(StrictModel):
    """A ConfigMap whose keys become environment variables."""

    name: SecretName = Field(..., description="ConfigMap name.")
    optional: bool = Field(False, description="Start even when the ConfigMap does not exist.")


class EnvFromConfigMap(StrictModel):
    """Environment from a ConfigMap (core/v1 EnvFromSource, configMapRef only: Secrets go through `distributed.env`
    secretKeyRef, one key at a time)."""

    config_map_ref: ConfigMapEnvSource = Field(..., description="The ConfigMap.")
    prefix: str | None = Field(None, pattern=_ENV_PREFIX, description="Prefix added to every variable name.")


class PodOverrides(StrictModel):
    """What the platform may shape in every worker pod; the restricted security context stays as it is."""

    labels: dict[str, str] = Field(
        default_factory=dict,
        max_length=MAX_METADATA,
        description=(
            "Extra pod labels (cost centre, `kueue.x-k8s.io/queue-name`, ...). Keys of the kubelora.dev domain and "
            "app.kubernetes.io/{name,instance,managed-by,component} are the operator's."
        ),
    )
    annotations: dict[str, str] = Field(
        default_factory=dict,
        max_length=MAX_METADATA,
        description="Extra pod annotations (e.g. `sidecar.istio.io/inject: \"false\"`); kubelora.dev keys are the operator's.",
    )
    runtime_class_name: SecretName | None = Field(None, description="RuntimeClass of the worker pods.")
    service_account_name: SecretName | None = Field(
        None,
        description=(
            "ServiceAccount of the worker pods (e.g. for workload identity). Default: the operator's "
            "`serviceAccount` setting. Its API token is never mounted."
        ),
    )
    shm_size: Quantity | None = Field(
        None,
        description=(
            "sizeLimit of the memory-backed /dev/shm (multi-process CCL needs shared memory; it counts against "
            "the memory limit). Default: the operator's `shmSizeLimit` setting."
        ),
    )
    volumes: list[PodVolume] = Field(
        default_factory=list, max_length=MAX_ITEMS, description="Extra volumes (configMap, secret, PVC, emptyDir)."
    )
    volume_mounts: list[PodVolumeMount] = Field(
        default_factory=list, max_length=MAX_ITEMS, description="Mounts of `volumes` in the trainer container."
    )
    env_from: list[EnvFromConfigMap] = Field(
        default_factory=list,
        max_length=MAX_ITEMS,
        description="Environment from ConfigMaps; variables the operator sets win over them.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> PodOverrides:
        problems = _metadata_problems("label", self.labels) + _metadata_problems("annotation", self.annotations)
        names = [v.name for v in self.volumes]
        problems += [f"volume {n!r} is listed twice" for n in sorted({n for n in names if names.count(n) > 1})]
        paths = [m.mount_path.rstrip("/") or "/" for m in self.volume_mounts]
        problems += [f"mountPath {p!r} is used twice" for p in sorted({p for p in paths if paths.count(p) > 1})]
        problems += [
            f"volumeMounts: {m.name!r} is not in pod.volumes" for m in self.volume_mounts if m.name not in names
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self
