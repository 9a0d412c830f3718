"""Pre-tokenized records (``data.kind: tokens``) -> samples, taken as they are.

For data prepared elsewhere (a custom template, a tokenizer-side pipeline): ``input_ids`` are used
unchanged (no BOS, no EOS added), ``labels`` default to ``input_ids`` and ``-100`` means no loss.
The ids were checked against the tokenizer's vocabulary when the file was read (``kinds``); the
cutoff, first-label and packing rules are the instruction ones, so packed rows stay independent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import DataConfig
from .tokenize import TokenizeResult, finish_example


def tokenized_samples(records: Sequence[dict[str, Any]], cfg: DataConfig, what: str = "training") -> TokenizeResult:
    """One sample per record, with the cutoff rules applied."""
    res = TokenizeResult()
    for i, rec in enumerate(records):
        ids = list(rec["input_ids"])
        labels = rec.get("labels")
        ex, status = finish_example(ids, list(labels) if labels is not None else list(ids), cfg)
        res.add(i, ex, status, len(ids))
    res.raise_if_empty(len(records), cfg.cutoff_len, what)
    return res
