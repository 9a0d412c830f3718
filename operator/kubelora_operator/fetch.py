"""Model and data sources in pods: the `<name>-fetch` pod, its volumes, and the config paths workers read.

Why a pod of its own before the workers: an `s3://` model is fetched ONCE per run into a shared
place (the model-cache PVC `spec.sources.cachePvc`, reused across runs and restarts, or else a
per-run directory on the run dir's claim) instead of by every worker on every restart, and a missing
or unreadable source fails that small pod (exit 2, its termination message names the source) before
any worker pod, and so any accelerator, is requested. `pvc://CLAIM/PATH` sources are not copied:
the claim is mounted read-only and the fetch pod only checks that the path is there and readable.
What the trainer does is kubelora_trainer/sources.py (`kubelora-train fetch`); this module only
decides names, paths and manifests, as pure functions (no API calls).

A hub model (`model.nameOrPath` an id such as `org/name`) is fetched into the same cache when the
run has one (`hub_model_source`): the fetch pod downloads it once with the hub token, and the workers
keep the id, get no token, and load it from the read-only cache with HF_HUB_CACHE pointing there and
HF_HUB_OFFLINE=1 (`worker_hub_env`). Without a claim for the cache, workers download it as before.

Workers see plain paths: the rendered trainer config names `/sources/<key>/<basename>` for an
`s3://` source (`sources.cached_path`, computable before anything is fetched) and
`/source-pvcs/<claim>/<path>` for a `pvc://` one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kubelora_trainer.config import SourcesConfig, TrainerConfig
from kubelora_trainer.contract import TRAINER_MODULE
from kubelora_trainer.hub_fetch import hub_cache_dir, hub_uri, is_hub_id
from kubelora_trainer.sources import PVC_SCHEME, S3_SCHEME, cached_path

from .api import ClaimRef, LoRAFineTuneResource, LoRAFineTuneSpec
from .k8s_types import DNS_SUBDOMAIN
from .names import CACHE_DIR, SOURCE_PVCS_DIR, SOURCES_DIR, TMP_DIR
from .settings import OperatorSettings
from .wiring import hub_token_env, runtime_env, s3_secret_env

FETCH_ROLE = "fetch"
FETCH_CONTAINER = "fetch"
SOURCES_VOLUME = "sources"
#: Directory on the run dir's claim that holds a run's fetched sources when there is no cache PVC.
PER_RUN_SOURCES = ".kubelora-sources"
#: The fetch pod streams objects to disk: a little CPU, memory for boto3 and one chunk at a time.
FETCH_RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
_CLAIM = re.compile(DNS_SUBDOMAIN)


def fetch_pod_name(name: str) -> str:
    return f"{name}-fetch"


def source_values(spec: LoRAFineTuneSpec) -> list[tuple[str, str]]:
    """(field, value) of every model/data source the spec names."""
    fields = (("model.nameOrPath", spec.model.name_or_path), ("data.path", spec.data.path),
              ("data.evalPath", spec.data.eval_path))
    return [(f, v) for f, v in fields if v]


def parse_pvc_uri(value: str) -> tuple[str, str]:
    """`pvc://CLAIM/PATH` -> (claim, path); ValueError with the expected shape otherwise."""
    claim, _, path = value[len(PVC_SCHEME) :].partition("/")
    parts = path.split("/")
    if not _CLAIM.match(claim) or not path or ".." in parts or "" in parts:
        raise ValueError(f"{value!r}: expected pvc://CLAIM/PATH with a PVC name and a relative path without '..'")
    return claim, path


def needs_fetch(spec: LoRAFineTuneSpec) -> bool:
    """True when a source must be fetched or checked by the fetch pod before the workers start."""
    return any(v.startswith((S3_SCHEME, PVC_SCHEME)) for _, v in source_values(spec)) or bool(hub_model_source(spec))


def _has_s3(spec: LoRAFineTuneSpec) -> bool:
    return any(v.startswith(S3_SCHEME) for _, v in source_values(spec))


def _cache_claim_ref(spec: LoRAFineTuneSpec) -> ClaimRef | None:
    if spec.sources.cache_pvc is not None:
        return spec.sources.cache_pvc
    out = spec.output
    return out.pvc if out.pvc is not None else (out.s3.workdir_pvc if out.s3 is not None else None)


def cache_claim(resource: LoRAFineTuneResource) -> tuple[str, str | None] | None:
    """(claim, subPath) that holds the fetched `s3://` sources and hub model, or None when there is no claim for it."""
    spec = resource.spec
    claim = _cache_claim_ref(spec)
    if claim is None:
        return None
    if spec.sources.cache_pvc is not None:
        return claim.claim_name, claim.sub_path
    return claim.claim_name, f"{PER_RUN_SOURCES}/{resource.namespace}/{resource.name}"


def hub_model_source(spec: LoRAFineTuneSpec) -> str | None:
    """`hf://org/name[@revision][#file.gguf]` when the model is a hub id and the run has a claim to cache it."""
    model = spec.model
    if not is_hub_id(model.name_or_path) or _cache_claim_ref(spec) is None:
        return None
    return hub_uri(model.name_or_path, model.revision, model.gguf_file)


def worker_hub_env(spec: LoRAFineTuneSpec) -> dict[str, str]:
    """The workers' hub settings when the fetch pod cached the hub model: that cache, read-only, hub off."""
    uri = hub_model_source(spec)
    if uri is None:
        return {}
    return {"HF_HUB_CACHE": hub_cache_dir(uri, SOURCES_DIR), "HF_HUB_OFFLINE": "1"}


def _endpoint(spec: LoRAFineTuneSpec) -> str | None:
    return spec.sources.s3.endpoint if spec.sources.s3 is not None else None


def pod_path(spec: LoRAFineTuneSpec, value: str) -> str:
    """Where a source is in the pods (the value itself for anything that is not s3:// or pvc://)."""
    if value.startswith(S3_SCHEME):
        return cached_path(value, SOURCES_DIR, _endpoint(spec))
    if value.startswith(PVC_SCHEME):
        claim, path = parse_pvc_uri(value)
        return f"{SOURCE_PVCS_DIR}/{claim}/{path}"
    return value


def localize_config(cfg: TrainerConfig, spec: LoRAFineTuneSpec) -> TrainerConfig:
    """The workers' config: sources replaced by their pod paths, no `sources` section (nothing to fetch)."""
    cfg.model.name_or_path = pod_path(spec, cfg.model.name_or_path)
    cfg.data.path = pod_path(spec, cfg.data.path)
    if cfg.data.eval_path:
        cfg.data.eval_path = pod_path(spec, cfg.data.eval_path)
    cfg.sources = SourcesConfig()
    return cfg


@dataclass(frozen=True)
class SourceVolumes:
    """Volumes of the sources, with the workers' (read-only) and the fetch pod's mounts."""

    volumes: list[dict[str, Any]] = field(default_factory=list)
    worker_mounts: list[dict[str, Any]] = field(default_factory=list)
    fetch_mounts: list[dict[str, Any]] = field(default_factory=list)


def source_volumes(resource: LoRAFineTuneResource) -> SourceVolumes:
    """The cache claim at /sources (s3:// sources) and each pvc:// claim at /source-pvcs/CLAIM."""
    out = SourceVolumes()
    spec = resource.spec
    cache = cache_claim(resource) if _has_s3(spec) or hub_model_source(spec) else None
    if cache is not None:
        claim, sub_path = cache
        out.volumes.append({"name": SOURCES_VOLUME, "persistentVolumeClaim": {"claimName": claim}})
        mount: dict[str, Any] = {"name": SOURCES_VOLUME, "mountPath": SOURCES_DIR}
        if sub_path:
            mount["subPath"] = sub_path
        out.worker_mounts.append({**mount, "readOnly": True})
        out.fetch_mounts.append(mount)
    claims = [parse_pvc_uri(v)[0] for _, v in source_values(spec) if v.startswith(PVC_SCHEME)]
    for i, claim in enumerate(dict.fromkeys(claims)):
        name = f"source-pvc-{i}"
        out.volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mount = {"name": name, "mountPath": f"{SOURCE_PVCS_DIR}/{claim}", "readOnly": True}
        out.worker_mounts.append(mount)
        out.fetch_mounts.append(dict(mount))
    return out


def fetch_command(spec: LoRAFineTuneSpec) -> list[str]:
    """`kubelora-train fetch` of every s3:// source and the hub model into /sources, a check of every pvc:// path."""
    argv = ["python", "-m", TRAINER_MODULE, "fetch", "--cache", SOURCES_DIR]
    s3 = spec.sources.s3
    if s3 is not None:
        argv += ["--endpoint", s3.endpoint] if s3.endpoint else []
        argv += ["--region", s3.region] if s3.region else []
        argv += [] if s3.verify_tls else ["--no-verify-tls"]
    values = [v for _, v in source_values(spec) if v.startswith((S3_SCHEME, PVC_SCHEME))]
    hub = hub_model_source(spec)
    paths = [v if v.startswith(S3_SCHEME) else pod_path(spec, v) for v in dict.fromkeys(values)]
    return [*argv, "--", *([hub] if hub else []), *paths]


def fetch_pod(resource: LoRAFineTuneResource, settings: OperatorSettings, device: str) -> dict[str, Any]:
    """The `<name>-fetch` pod: trainer image, restricted, credentials from sources.s3's Secret, no accelerator."""
    from .plan import (  # plan imports this module for the workers' volumes
        LABEL_ROLE,
        common_labels,
        container_security_context,
        image_pull_secrets,
        owner_reference,
        pod_security_context,
    )

    spec = resource.spec
    vols = source_volumes(resource)
    s3 = spec.sources.s3
    env = [{"name": k, "value": v} for k, v in runtime_env(settings).items()]
    container = {
        "name": FETCH_CONTAINER,
        "image": spec.image or settings.image_for(device),
        "imagePullPolicy": spec.image_pull_policy or settings.image_pull_policy,
        "command": fetch_command(spec),
        "env": env + s3_secret_env(s3.credentials_secret if s3 is not None else None)
        + (hub_token_env(spec) if hub_model_source(spec) else []),
        "resources": {k: dict(v) for k, v in FETCH_RESOURCES.items()},
        # /cache: huggingface_hub's own files (HF_HOME, the xet chunk cache) under the read-only root.
        "volumeMounts": [{"name": "tmp", "mountPath": TMP_DIR}, {"name": "cache", "mountPath": CACHE_DIR},
                         *vols.fetch_mounts],
        "workingDir": TMP_DIR,
        "securityContext": container_security_context(),
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(settings),
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}, *vols.volumes],
    }
    pull_secrets = image_pull_secrets(spec.image_pull_secrets, settings)
    if pull_secrets:
        pod_spec["imagePullSecrets"] = pull_secrets
    # The workers' node pool, as far as the user pinned it (a ReadWriteOnce cache is then on one node).
    if spec.placement.node_selector:
        pod_spec["nodeSelector"] = dict(spec.placement.node_selector)
    if spec.placement.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.placement.tolerations]
    if spec.pod.service_account_name or settings.service_account:
        pod_spec["serviceAccountName"] = spec.pod.service_account_name or settings.service_account
    metadata = {
        "name": fetch_pod_name(resource.name),
        "namespace": resource.namespace,
        "labels": {**common_labels(resource.name), LABEL_ROLE: FETCH_ROLE, "app.kubernetes.io/component": FETCH_ROLE},
        "ownerReferences": [owner_reference(resource)],
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}
