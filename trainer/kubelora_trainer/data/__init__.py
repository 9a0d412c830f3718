"""The data pipeline: records -> token ids with labels -> (packed) rows, for every ``data.kind``.

``instruction`` records go through a prompt template (``templates``, ``tokenize``), ``messages``
through the tokenizer's chat template (``chat``), ``text`` is cut into full blocks (``blocks``) and
``tokens`` are taken as given (``pretokenized``); ``kinds`` detects the kind and checks each record
as it is read. The training recipe calls :func:`build_datasets` once and :func:`collate` per batch;
the rest is exposed for the evaluator (``encode_prompt``) and tests. Every user-facing failure is a
one-line :class:`DataError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..config import DataConfig
from .blocks import text_blocks
from .chat import eval_prompt, require_chat_template, tokenize_conversations
from .collate import PACKED_FORWARD_KWARGS, collate, collate_flat
from .errors import DataError
from .guard import RecordGuard
from .kinds import KINDS, KINDS_WITH_ANSWERS, RecordChecker, detect_kind
from .loading import SAMPLE_DATA_DIR, load_records, read_records, split_records
from .packing import PackedRow, no_pack, pack, packing_stats
from .pretokenized import tokenized_samples
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
    "KINDS",
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
    "detect_kind",
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
    """What training needs: rows to batch, held-out rows for eval loss, raw held-out records, stats.

    ``eval_prompts`` are ``(prompt, answer)`` pairs for exact match, one per held-out record, empty
    for kinds without answers (text, tokens: eval loss only). ``cfg`` is the data config with
    ``kind`` filled in (detected when unset): pass it to :func:`encode_prompt`.
    """

    train_rows: list[PackedRow]
    eval_rows: list[PackedRow]
    eval_records: list[dict[str, Any]]
    cfg: DataConfig
    eval_prompts: list[tuple[str, str | None]] = field(default_factory=list)
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


def _samples(kind: str, records: list[dict[str, Any]], cfg: DataConfig, tokenizer: Any, what: str) -> TokenizeResult:
    """Records of a sample-per-record kind (instruction, messages, tokens) -> tokenized samples."""
    label = "training" if what == "train" else what
    if kind == "messages":
        return tokenize_conversations(records, tokenizer, cfg, what=label)
    if kind == "tokens":
        return tokenized_samples(records, cfg, what=label)
    return tokenize_examples(_render_all(records, cfg, tokenizer, what), tokenizer, cfg, what=label)


def _eval_prompts(kind: str, records: list[dict[str, Any]], cfg: DataConfig, tokenizer: Any) -> list[tuple[str, str | None]]:
    if kind == "messages":
        return [eval_prompt(r, tokenizer) for r in records]
    if kind == "instruction":
        return [(prompt_only(r, cfg, tokenizer), answer_of(r, cfg)) for r in records]
    return []


def build_datasets(cfg: DataConfig, tokenizer: Any, seed: int) -> PreparedData:
    """Load, check, tokenize and (if ``cfg.packing``) pack; the recipe's single data call.

    The kind is ``cfg.kind`` or detected from the first training record (logged). Training rows of
    sample kinds are packed into rows of ``cutoff_len`` tokens (order shuffled with ``seed``) or
    one sample per row in the shuffled record order; ``text`` rows are full blocks. Eval rows are
    never packed: eval loss per sample is then simple and batch composition cannot matter.
    ``eval_records`` are the raw held-out records (after ``max_eval_samples``).
    """
    _check_field_map(cfg)
    if cfg.kind == "messages":
        require_chat_template(tokenizer)
    guard = RecordGuard(cfg.max_record_bytes)
    checker = RecordChecker(cfg, len(tokenizer))
    train_records, eval_records = load_records(cfg, seed, guard, checker)
    kind = checker.kind or "instruction"
    if checker.detected:
        log.info("data: data.kind not set; detected %r from the first record of %s", kind, cfg.path)
        if kind == "messages":
            require_chat_template(tokenizer)
    if kind not in KINDS_WITH_ANSWERS:
        log.info("data: %s records have no reference answers: exact match is off, evaluation is eval loss only",
                 kind)
    cfg = cfg.model_copy(update={"kind": kind})
    if guard.dropped:
        log.warning("data: %s", guard.message())
    stats: dict[str, Any] = {
        "kind": kind,
        "train_records": len(train_records),
        "eval_records": len(eval_records),
        "dropped_records": guard.stats(),
    }
    if kind == "text":
        train_blocks = text_blocks([r["text"] for r in train_records], tokenizer, cfg, keep_tail=False, what="training")
        eval_blocks = text_blocks([r["text"] for r in eval_records], tokenizer, cfg, keep_tail=True, what="eval")
        train_rows, eval_rows = no_pack(train_blocks.examples), no_pack(eval_blocks.examples)
        if train_blocks.tail_dropped:
            log.info("data: text cut into %d blocks of %d tokens; the last %d tokens (less than a block) are unused",
                     len(train_rows), cfg.cutoff_len, train_blocks.tail_dropped)
        stats |= {"train_samples": train_blocks.counts(), "eval_samples": eval_blocks.counts()}
        lengths = [len(ex) for ex in train_blocks.examples]
    else:
        train_tok = _samples(kind, train_records, cfg, tokenizer, "train")
        eval_tok = _samples(kind, eval_records, cfg, tokenizer, "eval") if eval_records else TokenizeResult()
        packed = pack(train_tok.examples, cfg.cutoff_len, seed=seed) if cfg.packing else no_pack(train_tok.examples)
        train_rows, eval_rows = packed, no_pack(eval_tok.examples)
        for what, tok in (("training", train_tok), ("eval", eval_tok)):
            if tok.dropped or tok.truncated:
                log.warning("data: %s", tok.describe_cutoff(what, cfg.cutoff_len))
        stats |= {"train_samples": train_tok.counts(), "eval_samples": eval_tok.counts()}
        lengths = [len(ex) for ex in train_tok.examples]
    stats |= {
        "train_rows": packing_stats(train_rows, cfg.cutoff_len),
        "eval_rows": packing_stats(eval_rows, cfg.cutoff_len),
        "sample_tokens_mean": sum(lengths) / len(lengths),
        "sample_tokens_max": max(lengths),
        "packing": cfg.packing and kind != "text",
        "template": cfg.template if kind == "instruction" else ("chat" if kind == "messages" else None),
    }
    return PreparedData(
        train_rows=train_rows,
        eval_rows=eval_rows,
        eval_records=eval_records,
        cfg=cfg,
        eval_prompts=_eval_prompts(kind, eval_records, cfg, tokenizer),
        stats=stats,
    )
