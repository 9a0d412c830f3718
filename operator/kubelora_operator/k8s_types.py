"""Kubernetes value types shared by the API models: quantities, object names, label and annotation keys.

Why a module of its own: the spec models (api.py) and the pod overrides (pod_overrides.py) both
validate these the way the API server would, so that a bad value is one specific spec message
instead of a pod the API server refuses after the run was admitted.
"""

from __future__ import annotations

import functools
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, WithJsonSchema

#: DNS-1123 subdomain: names of Secrets, ConfigMaps, PVCs, ServiceAccounts, RuntimeClasses.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
#: DNS-1123 label: names of volumes inside a pod.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


@functools.lru_cache(maxsize=4096)
def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes resource quantity ("4", "500m", "16Gi", "1e3") as a Decimal of base units.

    The Kubernetes client's own parser, so the operator reads quantities exactly as the client library
    does; imported on first use because the API models otherwise need only pydantic. Remembered (a
    Decimal is immutable): placement reads every node's allocatable amounts for every start, the same
    few strings over and over (3.5% of the operator's CPU in a burst of 1,000 starts on 34 nodes).
    """
    from kubernetes.utils.quantity import parse_quantity as client_parse_quantity

    try:
        return Decimal(client_parse_quantity(value))
    except (ValueError, ArithmeticError):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)") from None


def _quantity_in(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("expected a quantity such as 4, 500m or 16Gi")
    text = str(value)
    if parse_quantity(text) <= 0:
        raise ValueError(f"{text!r} must be greater than zero")
    return text


#: A positive Kubernetes quantity; YAML numbers are accepted (int-or-string in the CRD).
Quantity = Annotated[
    str,
    BeforeValidator(_quantity_in),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}]}),
]


#: The name of an object in the resource's namespace (DNS-1123 subdomain), e.g. a Secret.
SecretName = Annotated[str, Field(pattern=DNS_SUBDOMAIN, min_length=1, max_length=253)]
