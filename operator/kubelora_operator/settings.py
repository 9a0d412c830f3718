"""Operator settings: cluster-specific knobs that do not belong in each LoRAFineTune.

Why separate from the CR: the Intel GPU resource name, NFD labels, default images and oneCCL
transport depend on how a cluster was set up (device plugin version, NFD rules, network), not on one
fine-tuning run. The Helm chart mounts them as a YAML file (camelCase keys, like chart values) and
single values can be overridden with `KUBELORA_<UPPER_SNAKE_NAME>` environment variables (dicts and
lists as JSON; read by pydantic-settings), env winning over the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError
from pydantic_settings.sources.utils import parse_env_vars

ENV_PREFIX = "KUBELORA_"
SETTINGS_FILE_ENV = "KUBELORA_SETTINGS_FILE"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

DEFAULT_CCL_ENV: dict[str, str] = {
    # Multi-node oneCCL over plain pod networking: OFI with the TCP provider works on every CNI.
    "CCL_ATL_TRANSPORT": "ofi",
    "FI_PROVIDER": "tcp",
    # One progress thread per process; more only steals cores from the trainer.
    "CCL_WORKER_COUNT": "1",
    # GPU IPC handles exchanged over sockets: pidfd needs ptrace rights a restricted pod lacks.
    "CCL_ZE_IPC_EXCHANGE": "sockets",
    "CCL_LOG_LEVEL": "warn",
}


#: `device: auto` tries a GPU before an AMX CPU: a GPU step is many times faster.
DEFAULT_AUTO_DEVICE_PREFERENCE: tuple[Literal["xpu", "cpu"], ...] = ("xpu", "cpu")


class SettingsError(ValueError):
    """Invalid operator settings (file or environment), with a one-line message."""


class OperatorSettings(BaseModel):
    """Cluster-level configuration of the operator (Helm values `operator.settings`)."""

    model_config = ConfigDict(
        alias_generator=to_camel, validate_by_name=True, validate_by_alias=True, extra="forbid", frozen=True
    )

    gpu_resource: str = Field(
        "gpu.intel.com/i915",
        min_length=1,
        description="Extended resource of the Intel GPU device plugin (`gpu.intel.com/xe` for the Xe driver).",
    )
    gpu_node_label: str | None = Field(
        None,
        description=(
            "Optional `key=value` (or bare `key`) label that xpu workers additionally require, e.g. the NFD "
            "label `intel.feature.node.kubernetes.io/gpu=true`. The resource request alone already restricts "
            "pods to nodes with the device plugin."
        ),
    )
    gpu_supplemental_groups: list[int] = Field(
        default_factory=list,
        description=(
            "Extra group ids for xpu pods, e.g. the host's `render` group, needed where the container runtime "
            "does not hand /dev/dri devices to non-root users (containerd device_ownership_from_security_context)."
        ),
    )
    amx_node_label: str = Field(
        "feature.node.kubernetes.io/cpu-cpuid.AMXBF16=true",
        min_length=1,
        description="`key=value` (or bare `key`) NFD label of AMX-capable Xeon nodes; cpu workers require it.",
    )
    when_no_node_matches: Literal["Fail", "Wait"] = Field(
        "Fail",
        description=(
            "Default of `spec.placement.whenNoNodeMatches`. `Fail`: no worker pod is created while no node can "
            "take the workers (NoMatchingNodes, re-checked every resync): right for static clusters, where a "
            "typo in a nodeSelector should be loud at once. `Wait`: create the pods anyway so that a "
            "cluster-autoscaler or Karpenter, which react to Pending pods, can add the node; Failed/"
            "NodesNotAvailable after `placementWaitSeconds`."
        ),
    )
    placement_wait_seconds: int = Field(
        1800,
        ge=1,
        description=(
            "Default of `spec.placement.waitTimeoutSeconds`: how long worker pods may stay unbound in `Wait` "
            "mode before the run fails (NodesNotAvailable). Long enough for a GPU node to boot and join."
        ),
    )
    auto_device_preference: list[Literal["xpu", "cpu"]] = Field(
        default_factory=lambda: list(DEFAULT_AUTO_DEVICE_PREFERENCE),
        min_length=1,
        max_length=2,
        description=(
            "Order in which `device: auto` considers devices (xpu only with `resources.gpus` >= 1). `Fail` mode: "
            "the first with room for every worker now. `Wait` mode: the first, even when its node pool is at "
            "zero, so an autoscaled pool is never silently replaced by what happens to be up."
        ),
    )
    cpu_image: str = Field("kubelora/trainer-cpu:0.1.0", min_length=1, description="Default trainer image for cpu.")
    xpu_image: str = Field("kubelora/trainer-xpu:0.1.0", min_length=1, description="Default trainer image for xpu.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Default imagePullPolicy of trainer pods."
    )
    image_pull_secrets: list[Annotated[str, Field(pattern=_DNS_SUBDOMAIN, max_length=253)]] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "Secrets (by name, in each resource's namespace) every trainer pod pulls its image with, e.g. the "
            "platform's registry credentials; `spec.imagePullSecrets` adds to them. Not checked for existence: "
            "a missing one surfaces as the kubelet's ErrImagePull."
        ),
    )
    ccl_env: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_CCL_ENV),
        description="oneCCL/libfabric environment for every worker; `spec.distributed.cclEnv` overrides keys.",
    )
    cpu_env: dict[str, str] = Field(
        default_factory=lambda: {"KMP_BLOCKTIME": "1"},
        description="Extra thread environment for cpu workers (OMP_NUM_THREADS is derived from the CPU request).",
    )
    master_port: int = Field(29500, ge=1024, le=65535, description="torch.distributed rendezvous port of worker 0.")
    metrics_port: int = Field(9400, ge=1024, le=65535, description="Port of the trainer's Prometheus metrics.")
    ssh_port: int = Field(2222, ge=1024, le=65535, description="Port of the workers' sshd (launcher mpirun only).")
    service_account: str | None = Field(
        None, description="ServiceAccount of trainer pods (their API token is never mounted)."
    )
    run_as_user: int = Field(1000, ge=1, description="Non-root uid (and gid, fsGroup) of trainer pods.")
    dns_wait_seconds: int = Field(
        300, ge=0, description="How long a worker waits for peers' DNS names before starting anyway."
    )
    shm_size_limit: str | None = Field(None, description="sizeLimit of the memory-backed /dev/shm volume.")
    cache_size_limit: str | None = Field(None, description="sizeLimit of the /cache emptyDir (converted models).")
    resync_seconds: float = Field(
        30,
        gt=0,
        description=(
            "Interval of the periodic reconcile of every LoRAFineTune: re-evaluates NoMatchingNodes and missing "
            "references, checks activeDeadlineSeconds and ttlSecondsAfterFinished, catches missed pod events."
        ),
    )
    progress_seconds: float = Field(
        10, gt=0, description="How often rank 0's metrics are scraped into status.progress while Running."
    )
    scrape_timeout_seconds: float = Field(3, gt=0, description="Timeout of one metrics scrape.")
    peering_name: str | None = Field(
        None,
        description=(
            "kopf peering object for several operator replicas (one active, the others standby); needs the "
            "kopf peering CRDs. Unset: standalone (one replica)."
        ),
    )

    @field_validator("auto_device_preference")
    @classmethod
    def _each_device_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each device at most once, got {value}")
        return value

    def image_for(self, device: str) -> str:
        """Default trainer image for a placed device (`xpu` or `cpu`)."""
        return self.xpu_image if device == "xpu" else self.cpu_image


def parse_label(label: str) -> tuple[str, str | None]:
    """Split `key=value` into (key, value); a bare `key` gives (key, None), meaning "label exists"."""
    key, sep, value = label.partition("=")
    return key.strip(), (value.strip() if sep else None)


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of `os.environ` (tests)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(_EnvSettings, env_prefix=ENV_PREFIX, env_parse_none_str="")

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


class _EnvSettings(BaseSettings, OperatorSettings):
    """The same fields with their snake-case names: `KUBELORA_<UPPER_SNAKE_NAME>` (the camelCase aliases of
    the file and the chart would otherwise be taken as unprefixed variable names)."""

    model_config = SettingsConfigDict(alias_generator=None, extra="ignore")


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """`KUBELORA_<UPPER_SNAKE_NAME>` variables, dicts and lists as JSON, parsed by pydantic-settings."""
    try:
        return dict(_EnvSource(environ)())
    except PydanticSettingsError as err:  # a dict or list that is not JSON
        field = re.search(r'field "(\w+)"', str(err))
        var = ENV_PREFIX + field.group(1).upper() if field else "an environment variable"
        raise SettingsError(f"{var} must be JSON: {err.__cause__ or err}") from None


def load_settings(environ: Mapping[str, str] | None = None, path: str | Path | None = None) -> OperatorSettings:
    """Settings from an optional YAML file (`path` or $KUBELORA_SETTINGS_FILE), then env overrides."""
    env = os.environ if environ is None else environ
    path = path or env.get(SETTINGS_FILE_ENV)
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise SettingsError(f"cannot read operator settings file {path}: {err}") from None
        if not isinstance(loaded, dict):
            raise SettingsError(f"operator settings file {path} must hold a mapping")
        # Normalise camelCase file keys to field names so env (snake) overrides the same key.
        by_alias = {str(to_camel(n)): n for n in OperatorSettings.model_fields}
        data = {str(by_alias.get(k, k)): v for k, v in loaded.items()}
    data.update(_env_overrides(env))
    try:
        return OperatorSettings.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise SettingsError(f"invalid operator settings: {problems}") from None
