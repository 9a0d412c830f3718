"""The data pipeline: records -> prompt/response text -> token ids with labels -> (packed) rows.

The training recipe calls :func:`build_datasets` once and :func:`collate` per batch; everything
else is exposed for the evaluator (``prompt_only``, ``encode_prompt``, ``answer_of``) and tests.
Every user-facing failure is a one-line :class:`DataError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..config import DataConfig
from .collate import PACKED_FORWARD_KWARGS, collate, collate_flat
from .errors import DataError
from .guard import RecordGuard
from .loading import SAMPLE_DATA_DIR, load_records, read_records, split_records
from .packing import PackedRow, no_pack, pack, packing_stats
from .templates import TEMPLATE_FIELDS, answer_of, custom_fields, prompt_only, render
from .tokenize import (
    IGNORE_INDEX,
    TokenizedExample,
    TokenizeResult,
    encode_prompt,
    tokenize_example,
    tokenize_examples,
)

log = logging.getLogger("kubelora")

__all__ = [
    "IGNORE_INDEX",
    "PACKED_FORWARD_KWARGS",
    "SAMPLE_DATA_DIR",
    "DataError",
    "PackedRow",
    "PreparedData",
    "RecordGuard",
    "TokenizeResult",
    "TokenizedExample",
    "answer_of",
    "build_datasets",
    "collate",
    "collate_flat",
    "encode_prompt",
    "load_records",
    "no_pack",
    "pack",
    "prompt_only",
    "read_records",
    "render",
    "split_records",
    "tokenize_example",
    "tokenize_examples",
]


@dataclass
class PreparedData:
    """What training needs: rows to batch, held-out rows for eval loss, raw held-out records, stats."""

    train_rows: list[PackedRow]
    eval_rows: list[PackedRow]
    eval_records: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)


def _check_field_map(cfg: DataConfig) -> None:
    allowed = set(TEMPLATE_FIELDS)
    if cfg.template == "custom":
        if not cfg.custom_template:
            raise DataError("data.template is 'custom' but data.customTemplate is not set")
        allowed |= set(custom_fields(cfg))
    unknown = sorted(set(cfg.field_map) - allowed)
    if unknown:
        raise DataError(
            f"data.fieldMap key(s) {', '.join(unknown)} are not template fields; use {', '.join(sorted(allowed))}"
        )


def _render_all(records: list[dict[str, Any]], cfg: DataConfig, tokenizer: Any, what: str) -> list[tuple[str, str]]:
    """Render every record; on bad records raise once, saying how many fail and why (first one)."""
    pairs: list[tuple[str, str]] = []
    first: DataError | None = None
    failures = 0
    for rec in records:
        try:
            pairs.append(render(rec, cfg, tokenizer))
        except DataError as err:
            failures += 1
            first = first or err
    if first is not None:
        raise DataError(f"{failures} of {len(records)} {what} records cannot be rendered; first: {first}")
    return pairs


def build_datasets(cfg: DataConfig, tokenizer: Any, seed: int) -> PreparedData:
    """Load, split, render, tokenize and (if ``cfg.packing``) pack; the recipe's single data call.

    Training rows are packed into rows of ``cutoff_len`` tokens (order shuffled with ``seed``) or
    one sample per row in the shuffled record order. Eval rows are never packed: eval loss per
    sample is then simple and batch composition cannot matter. ``eval_records`` are the raw
    held-out records (after ``max_eval_samples``) for exact match via ``prompt_only``/``answer_of``.
    """
    _check_field_map(cfg)
    guard = RecordGuard(cfg.max_record_bytes)
    train_records, eval_records = load_records(cfg, seed, guard)
    if guard.dropped:
        log.warning("data: %s", guard.message())
    train_tok = tokenize_examples(_render_all(train_records, cfg, tokenizer, "train"), tokenizer, cfg)
    eval_tok = TokenizeResult()
    if eval_records:
        eval_tok = tokenize_examples(_render_all(eval_records, cfg, tokenizer, "eval"), tokenizer, cfg, what="eval")
    train_rows = pack(train_tok.examples, cfg.cutoff_len, seed=seed) if cfg.packing else no_pack(train_tok.examples)
    eval_rows = no_pack(eval_tok.examples)
    for what, tok in (("training", train_tok), ("eval", eval_tok)):
        if tok.dropped or tok.truncated:
            log.warning("data: %s", tok.describe_cutoff(what, cfg.cutoff_len))
    lengths = [len(ex) for ex in train_tok.examples]
    stats: dict[str, Any] = {
        "train_records": len(train_records),
        "eval_records": len(eval_records),
        "train_samples": train_tok.counts(),
        "eval_samples": eval_tok.counts(),
        "dropped_records": guard.stats(),
        "train_rows": packing_stats(train_rows, cfg.cutoff_len),
        "eval_rows": packing_stats(eval_rows, cfg.cutoff_len),
        "sample_tokens_mean": sum(lengths) / len(lengths),
        "sample_tokens_max": max(lengths),
        "packing": cfg.packing,
        "template": cfg.template,
    }
    return PreparedData(train_rows=train_rows, eval_rows=eval_rows, eval_records=eval_records, stats=stats)
