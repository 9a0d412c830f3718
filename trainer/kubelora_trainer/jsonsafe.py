"""JSON that every parser reads: non-finite floats become null.

Why: Python's json writes NaN and Infinity as bare words, which are not JSON; an eval loss over no
rows (NaN) would make summary.json unreadable for jq, Go and JavaScript, and a diverged run's NaN
train loss would do the same to metrics.jsonl. A value that is not a number is written as
null ("no figure"), and `allow_nan=False` makes any path that skips this helper fail loudly in
tests instead of writing invalid JSON.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """`value` with every NaN/Infinity float inside dicts, lists and tuples replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` of `finite_or_none(value)`, refusing any non-finite float that is left."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
