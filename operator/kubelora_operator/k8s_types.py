"""Kubernetes value types shared by the API models: quantities, object names, label and annotation keys.

Why a module of its own: the spec models (api.py) and the pod overrides (pod_overrides.py) both
validate these the way the API server would, so that a bad value is one specific spec message
instead of a pod the API server refuses after the run was admitted.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, WithJsonSchema

#: DNS-1123 subdomain: names of Secrets, ConfigMaps, PVCs, ServiceAccounts, RuntimeClasses.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
#: DNS-1123 label: names of volumes inside a pod.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


_QUANTITY = re.compile(
    r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
)
_SUFFIX = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}


def parse_quantity(value: str | int | float) -> Decimal:
    """Parse a Kubernetes resource quantity ("4", "500m", "16Gi", "1e3") into a Decimal of base units."""
    text = str(value).strip()
    match = _QUANTITY.match(text)
    if not match:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
    number, suffix = match.group(1), match.group(2) or ""
    try:
        base = Decimal(number)
    except InvalidOperation:  # pragma: no cover - the regex already guarantees a number
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from None
    if suffix[:1] in ("e", "E"):
        return base * (Decimal(10) ** int(suffix[1:]))
    return base * _SUFFIX[suffix]


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
