"""Chat records (``data.kind: messages``) -> token ids with loss on the assistant turns.

How the assistant spans are found: by rendering prefixes of the conversation with the tokenizer's
own chat template. For assistant turn ``i``, ``render(turns[:i], add_generation_prompt=True)`` is
everything the model sees before it answers and ``render(turns[:i+1])`` ends with the answer; the
difference is the answer as the template writes it (content plus end-of-turn marker, so the model
learns to stop). transformers' ``return_assistant_tokens_mask`` would be shorter, but it needs
``{% generation %}`` markers in the template, which SmolLM2's (and most) templates lack: it then
returns an all-zero mask. Prefix rendering works with any template whose renderings of a prefix
are a prefix of the whole, and that is checked per record.

The pieces are tokenized separately and concatenated as ids (as the instruction pipeline does), so
the prompt ids of the last assistant turn equal what :func:`eval_prompt` gives at generation time.
Turns after the last assistant turn carry no loss and are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import DataConfig
from .errors import DataError
from .tokenize import IGNORE_INDEX, TokenizeResult, encode_texts, finish_example

Turns = list[dict[str, str]]


def require_chat_template(tokenizer: Any) -> None:
    """A clear error up front when the tokenizer cannot render conversations."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
        raise DataError(
            f"data.kind 'messages' needs a tokenizer with a chat template; {name} has none (use an instruct/chat "
            "model's tokenizer, or write the records as instruction/input/output)"
        )


def _render(turns: Turns, tokenizer: Any, generation_prompt: bool = False) -> str:
    return str(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt))


def _last_assistant(turns: Turns) -> int:
    return max(i for i, t in enumerate(turns) if t["role"] == "assistant")


def pieces(turns: Turns, tokenizer: Any) -> list[tuple[str, bool]]:
    """``(text, is_assistant)`` pieces whose concatenation is the rendered conversation up to its last answer."""
    out: list[tuple[str, bool]] = []
    done = ""
    for i, turn in enumerate(turns[: _last_assistant(turns) + 1]):
        if turn["role"] != "assistant":
            continue
        prompt = _render(turns[:i], tokenizer, generation_prompt=True)
        full = _render(turns[: i + 1], tokenizer)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError(
                "the tokenizer's chat template does not render a conversation's beginning as a prefix of the "
                f"whole (at messages[{i}]), so the assistant turns cannot be located"
            )
        out += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return out


def tokenize_conversations(
    records: Sequence[dict[str, Any]], tokenizer: Any, cfg: DataConfig, what: str = "training"
) -> TokenizeResult:
    """Tokenize chat records: assistant pieces labelled, the rest ``-100`` (unless ``train_on_inputs``).

    The cutoff rules are the instruction ones (``tokenize.finish_example``); no EOS is appended, the
    template's end-of-turn marker ends each answer.
    """
    split = [pieces(rec["messages"], tokenizer) for rec in records]
    flat = [text for rec_pieces in split for text, _ in rec_pieces]
    encoded = iter(encode_texts(flat, tokenizer))
    res = TokenizeResult()
    for i, rec_pieces in enumerate(split):
        ids: list[int] = []
        labels: list[int] = []
        for _, is_answer in rec_pieces:
            piece = next(encoded)
            ids += piece
            labels += piece if is_answer or cfg.train_on_inputs else [IGNORE_INDEX] * len(piece)
        ex, status = finish_example(ids, labels, cfg)
        res.add(i, ex, status, len(ids))
    res.raise_if_empty(len(records), cfg.cutoff_len, what)
    return res


def eval_prompt(record: dict[str, Any], tokenizer: Any) -> tuple[str, str]:
    """``(prompt, answer)`` for exact match: the conversation before its last answer, and that answer."""
    turns = record["messages"]
    last = _last_assistant(turns)
    return _render(turns[:last], tokenizer, generation_prompt=True), turns[last]["content"]
