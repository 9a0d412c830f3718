"""Prompt templates: one record -> (prompt text, response text).

The prompt and the response are kept apart (never one string) because the loss masks the prompt
and because exact-match evaluation must generate from *exactly* the prompt seen in training:
:func:`prompt_only` returns the same prompt :func:`render` does, without needing an answer.

``field_map`` renames template fields to dataset columns (``{output: answer}``). ``input`` is
optional everywhere: absent, null or blank means "no input", which selects the no-input variant
of the Alpaca templates (no ``### Input:`` section at all, never an empty one).
"""

from __future__ import annotations

import string
from typing import Any

from ..config import DataConfig
from .errors import DataError

TEMPLATE_FIELDS = ("instruction", "input", "output")

# `alpaca`: tloen/alpaca-lora templates/alpaca.json (Stanford Alpaca's wording, newline after the header).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# `alpaca_legacy`: tloen/alpaca-lora templates/alpaca_legacy.json, which is the original Stanford
# Alpaca PROMPT_DICT: the same two preambles as `alpaca` (the long one only with an input) but no
# newline after "### Response:", so the response follows the colon directly. Adapters trained with
# that prompt expect exactly this text at generation time.
ALPACA_LEGACY_WITH_INPUT = ALPACA_WITH_INPUT.removesuffix("\n")
ALPACA_LEGACY_NO_INPUT = ALPACA_NO_INPUT.removesuffix("\n")


def column_for(field: str, cfg: DataConfig) -> str:
    """The dataset column that holds template field ``field`` (``field_map`` or the field's own name)."""
    return cfg.field_map.get(field, field)


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and value != value)  # None or NaN = missing


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def custom_fields(cfg: DataConfig) -> list[str]:
    """Field names referenced by ``custom_template`` (``{name}`` or ``{name:fmt}``), in order."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(cfg.custom_template or ""))
    except ValueError as err:
        raise DataError(f"data.customTemplate is not a valid format string: {err}") from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        base = name.split(".")[0].split("[")[0]
        if not base or base.isdigit():
            raise DataError(
                f"data.customTemplate uses a positional field {{{name}}}; name the fields, e.g. {{instruction}}"
            )
        if base not in names:
            names.append(base)
    return names


def required_fields(cfg: DataConfig, with_output: bool = True) -> list[str]:
    """Template fields a record must have (``input`` is always optional)."""
    fields = [f for f in custom_fields(cfg) if f != "input"] if cfg.template == "custom" else ["instruction"]
    if with_output and "output" not in fields:
        fields.append("output")
    return fields


def _missing_error(record: dict[str, Any], cfg: DataConfig, missing: list[str]) -> DataError:
    described = []
    for f in missing:
        col = column_for(f, cfg)
        described.append(f"'{f}'" if col == f else f"'{f}' (column '{col}')")
    columns = ", ".join(str(k) for k in record) or "none"
    return DataError(f"record is missing template field(s) {', '.join(described)}; its columns: {columns}")


def _fields(record: dict[str, Any], cfg: DataConfig, with_output: bool) -> dict[str, str]:
    """Mapped field values as text; raises DataError naming every missing field at once."""
    needed = required_fields(cfg, with_output)
    missing = [f for f in needed if not _present(record.get(column_for(f, cfg)))]
    if missing:
        raise _missing_error(record, cfg, missing)
    values: dict[str, str] = {}
    if cfg.template == "custom":
        # Unmapped columns are usable too ({question}), mapped names win over raw column names.
        values.update({str(k): _text(v) for k, v in record.items() if _present(v)})
    for f in [*TEMPLATE_FIELDS, *needed]:
        value = record.get(column_for(f, cfg))
        values[f] = _text(value) if _present(value) else ""
    return values


def _prompt(values: dict[str, str], cfg: DataConfig, tokenizer: Any) -> str:
    instruction, inp = values["instruction"], values["input"]
    has_input = bool(inp.strip())
    if cfg.template == "alpaca":
        tpl = ALPACA_WITH_INPUT if has_input else ALPACA_NO_INPUT
        return tpl.format(instruction=instruction, input=inp)
    if cfg.template == "alpaca_legacy":
        tpl = ALPACA_LEGACY_WITH_INPUT if has_input else ALPACA_LEGACY_NO_INPUT
        return tpl.format(instruction=instruction, input=inp)
    if cfg.template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("data.template 'chat' needs a tokenizer with a chat template; this one has none")
        content = f"{instruction}\n\n{inp}" if has_input else instruction
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return str(text)
    if cfg.template == "custom":
        if not cfg.custom_template:
            raise DataError("data.template is 'custom' but data.customTemplate is not set")
        try:
            return cfg.custom_template.format(**values)
        except (KeyError, IndexError, ValueError, AttributeError) as err:
            raise DataError(f"data.customTemplate cannot be filled: {type(err).__name__}: {err}") from None
    raise DataError(f"unknown data.template {cfg.template!r}")  # pragma: no cover - config forbids it


def render(record: dict[str, Any], cfg: DataConfig, tokenizer: Any = None) -> tuple[str, str]:
    """Return ``(prompt, response)`` for a training record; the response is the mapped ``output``."""
    values = _fields(record, cfg, with_output=True)
    return _prompt(values, cfg, tokenizer), values["output"]


def prompt_only(record: dict[str, Any], cfg: DataConfig, tokenizer: Any = None) -> str:
    """The generation prompt for a record: identical to :func:`render`'s prompt, no answer needed."""
    return _prompt(_fields(record, cfg, with_output=False), cfg, tokenizer)


def answer_of(record: dict[str, Any], cfg: DataConfig) -> str | None:
    """The reference answer (mapped ``output``) for exact-match scoring, or None when the record has none."""
    value = record.get(column_for("output", cfg))
    return _text(value) if _present(value) else None
