"""Which kind of record a dataset holds (``data.kind``), and the per-record checks of each kind.

Why checks at read time: the reader still knows the file and line of every record, so a bad record
is reported as ``train.jsonl line 17: ...`` (one line, the place to fix), before any tokenizing.
After the split and the shuffle that place is gone. Instruction records keep their historical check
in rendering (``templates``), which also knows ``fieldMap`` and custom templates.

Detection (``data.kind`` unset) looks at the first record of ``data.path``: ``messages`` -> chat,
``input_ids`` -> pre-tokenized, ``text`` without ``instruction`` -> plain text, anything else ->
instruction. A ``fieldMap`` or a custom template only makes sense for instruction records, so either
one means instruction whatever the columns are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import DataConfig
from .errors import DataError
from .tokenize import IGNORE_INDEX

KINDS = ("instruction", "messages", "text", "tokens")
#: The roles a chat record may use (OpenAI-style).
ROLES = ("system", "user", "assistant")
#: Kinds whose records carry a reference answer, so exact match can be scored.
KINDS_WITH_ANSWERS = ("instruction", "messages")


def detect_kind(record: dict[str, Any], cfg: DataConfig) -> str:
    """The kind of ``record`` by its columns (see module docstring)."""
    if cfg.field_map or cfg.template == "custom":
        return "instruction"
    if "messages" in record:
        return "messages"
    if "input_ids" in record:
        return "tokens"
    if "text" in record and "instruction" not in record:
        return "text"
    return "instruction"


def _columns(record: dict[str, Any]) -> str:
    return ", ".join(str(k) for k in record) or "none"


def check_messages(record: dict[str, Any]) -> None:
    """A chat record: a list of {role, content} turns with text content and at least one assistant turn.

    The first turn may not be the assistant's: its prompt would be an empty conversation, which chat
    templates refuse to render.
    """
    turns = record.get("messages")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"'messages' must be a non-empty list of {{role, content}} objects; its columns: "
                        f"{_columns(record)}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"messages[{i}] is a {type(turn).__name__}, expected an object with role and content")
        role = turn.get("role")
        if role not in ROLES:
            raise DataError(f"messages[{i}].role is {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(turn.get("content"), str):
            raise DataError(f"messages[{i}].content must be a string, got {type(turn.get('content')).__name__}")
    if not any(t["role"] == "assistant" for t in turns):
        raise DataError("messages has no assistant turn: nothing to learn")
    if turns[0]["role"] == "assistant":
        raise DataError("messages[0] is an assistant turn; a conversation starts with a system or user turn")


def check_text(record: dict[str, Any]) -> None:
    """A plain-text record: a string ``text``."""
    if "text" not in record:
        raise DataError(f"record has no 'text' field; its columns: {_columns(record)}")
    if not isinstance(record["text"], str):
        raise DataError(f"'text' must be a string, got {type(record['text']).__name__}")


def _ids(value: Any, name: str, vocab_size: int, allow_ignore: bool) -> list[int]:
    if not isinstance(value, list) or not value:
        raise DataError(f"'{name}' must be a non-empty list of token ids, got {type(value).__name__}")
    for i, t in enumerate(value):
        if not isinstance(t, int) or isinstance(t, bool):
            raise DataError(f"{name}[{i}] is {t!r}, not an integer token id")
        if not (0 <= t < vocab_size or (allow_ignore and t == IGNORE_INDEX)):
            raise DataError(f"{name}[{i}] is {t}, outside the tokenizer's vocabulary of {vocab_size} tokens"
                            + (f" (use {IGNORE_INDEX} for no loss)" if allow_ignore else ""))
    return value


def check_tokens(record: dict[str, Any], vocab_size: int) -> None:
    """A pre-tokenized record: ``input_ids`` in the vocabulary; ``labels`` (optional) of the same length."""
    if "input_ids" not in record:
        raise DataError(f"record has no 'input_ids' field; its columns: {_columns(record)}")
    ids = _ids(record["input_ids"], "input_ids", vocab_size, allow_ignore=False)
    if record.get("labels") is not None:
        labels = _ids(record["labels"], "labels", vocab_size, allow_ignore=True)
        if len(labels) != len(ids):
            raise DataError(f"'labels' has {len(labels)} ids, 'input_ids' has {len(ids)}; they must be equally long")


@dataclass
class RecordChecker:
    """Called on every record as it is read: fixes the kind on the first record, then checks each one.

    The reader prefixes a failure with the file and line, so the message here names only the field.
    """

    cfg: DataConfig
    vocab_size: int
    kind: str | None = None
    detected: bool = False

    def __post_init__(self) -> None:
        if self.kind is None and self.cfg.kind is not None:
            self.kind = self.cfg.kind

    def __call__(self, record: dict[str, Any]) -> None:
        if self.kind is None:
            self.kind, self.detected = detect_kind(record, self.cfg), True
        if self.kind == "messages":
            check_messages(record)
        elif self.kind == "text":
            check_text(record)
        elif self.kind == "tokens":
            check_tokens(record, self.vocab_size)
