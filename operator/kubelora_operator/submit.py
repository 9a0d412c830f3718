"""A laptop's trainer config (plus a `cluster:` section) as a LoRAFineTune resource: `kubelora submit`.

Why a pure function: the same YAML a laptop run uses (`kubelora-train run CONFIG.yaml`) becomes the
resource without anything declared twice. The trainer sections (model, data, lora, training,
evaluation, distributed, tracking, device, output's overwrite/merge/plot/s3, sources.s3) are copied as they are; the
`cluster:` section holds the LoRAFineTune spec fields a laptop has no use for (workers, resources,
output.pvc, output.s3.credentialsSecret, dataVolume, ...) plus `name` and `namespace`, and is merged
over them. The result is validated with the operator's own spec models (`api.parse_spec`).
"""

from __future__ import annotations

import copy
import re
from typing import Any

from .api import API_VERSION, KIND, SpecError, parse_spec

#: Trainer config sections that are LoRAFineTune spec fields of the same name and shape.
SPEC_SECTIONS = ("model", "data", "lora", "training", "evaluation", "distributed", "tracking")
#: Trainer `output` fields that the spec's `output` carries as well (the run dir is the operator's).
OUTPUT_FIELDS = ("overwrite", "merge", "plot", "s3")


class SubmitError(ValueError):
    """The config cannot become a resource: one line for the CLI (exit 2)."""


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into a copy of `base`, mappings recursively, anything else replaced (`over` wins)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def default_name(stem: str) -> str:
    """A DNS-1123 name from a config file's stem (`My_Run.v2` -> `my-run-v2`)."""
    name = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")[:50].strip("-")
    return name or "lora-finetune"


def resource_from_config(raw: dict[str, Any], *, name: str, namespace: str | None = None) -> dict[str, Any]:
    """The LoRAFineTune manifest of a raw trainer config; raises SubmitError with one line."""
    if (raw.get("device") or "auto") == "cuda":
        raise SubmitError("device: cuda is for laptop runs; a LoRAFineTune runs on auto, xpu or cpu")
    if raw.get("ipex"):
        raise SubmitError("ipex: true is not offered through the operator (IPEX is retired upstream)")
    cluster = dict(raw.get("cluster") or {})
    if not isinstance(raw.get("cluster") or {}, dict):
        raise SubmitError("cluster: must be a mapping of LoRAFineTune spec fields")
    cluster.pop("name", None)
    namespace = namespace or cluster.pop("namespace", None)
    cluster.pop("namespace", None)
    spec: dict[str, Any] = {k: copy.deepcopy(raw[k]) for k in SPEC_SECTIONS if k in raw}
    if raw.get("device"):
        spec["device"] = raw["device"]
    if isinstance(raw.get("sources"), dict):  # the server of s3:// sources; the cache is the cluster's
        sources = {k: copy.deepcopy(v) for k, v in raw["sources"].items() if k not in ("cacheDir", "cache_dir")}
        spec["sources"] = sources
    output = raw.get("output") or {}
    spec["output"] = {k: copy.deepcopy(output[k]) for k in OUTPUT_FIELDS if k in output}
    spec = deep_merge(spec, cluster)  # the cluster section wins
    try:
        parse_spec(spec)
    except SpecError as err:
        raise SubmitError(f"{name}: {err}") from None
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": spec}
