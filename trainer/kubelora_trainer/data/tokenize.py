"""Prompt/response text -> token ids and loss labels, with the cutoff applied.

Why prompt and response are tokenized separately (and concatenated as ids, never as text): the
prompt ids are then exactly the ids :func:`encode_prompt` gives at generation time, so the model is
trained on the same prefix it is later asked to continue, and the prompt/response boundary in the
labels is exact (tokenizing the joined text can merge the last prompt character with the first
response character into one token and shift the mask by one).

Label conventions (``-100`` is ignored by the loss):

* prompt tokens are ``-100`` unless ``train_on_inputs``;
* response tokens and the appended EOS are labelled, so the model learns to answer and to stop;
* the FIRST token of every sample is always ``-100``. A causal LM predicts token ``i+1`` from
  position ``i``, so nothing inside a sample ever predicts its first token. Alone in a row, that
  label is dropped by the shift anyway; inside a packed row it would be "predicted" by the last
  token of the *previous* sample, a cross-sample loss term. Masking it makes a packed row's loss
  identical to the sum of its samples' losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import DataConfig
from .errors import DataError

IGNORE_INDEX = -100
_BATCH = 1024  # texts per tokenizer call: fast tokenizers parallelise inside a batch, memory stays bounded


@dataclass
class TokenizedExample:
    """One sample as ids and labels of equal length (labels ``-100`` where there is no loss)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        """Tokens that carry loss."""
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class TokenizeResult:
    """Kept examples plus the counts worth logging (``kept + dropped`` = samples in)."""

    examples: list[TokenizedExample] = field(default_factory=list)
    source_index: list[int] = field(default_factory=list)  # input position of each kept example
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_too_long: int = 0
    dropped_no_labels: int = 0
    shortest: int | None = None  # shortest untruncated sample, in tokens

    def counts(self) -> dict[str, int]:
        """The counts as a plain dict (for logs and summary.json), drops split by their reason."""
        return {
            "kept": self.kept,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "dropped_over_cutoff_len": self.dropped_too_long,
            "dropped_no_label_tokens": self.dropped_no_labels,
        }

    def add(self, index: int, example: TokenizedExample | None, status: str, full_len: int) -> None:
        """Count one sample of input position ``index`` (``full_len`` tokens before the cutoff)."""
        self.shortest = full_len if self.shortest is None else min(self.shortest, full_len)
        if example is None:
            self.dropped += 1
            if status == "too_long":
                self.dropped_too_long += 1
            else:
                self.dropped_no_labels += 1
            return
        self.examples.append(example)
        self.source_index.append(index)
        self.kept += 1
        self.truncated += example.truncated

    def raise_if_empty(self, n_in: int, cutoff_len: int, what: str) -> None:
        """A DataError when nothing was kept, saying whether the cutoff is the cause."""
        if self.examples:
            return
        if not n_in:
            raise DataError(f"empty dataset after filtering: no {what} samples")
        if self.dropped_too_long and self.shortest is not None and self.shortest > cutoff_len:
            raise DataError(
                f"cutoff_len {cutoff_len} is too small for any sample (shortest sample has {self.shortest} tokens)"
            )
        if self.dropped_too_long:
            raise DataError(
                f"cutoff_len {cutoff_len} leaves no response token in any {what} sample (shortest sample has "
                f"{self.shortest} tokens); raise data.cutoffLen"
            )
        raise DataError(
            f"empty dataset after filtering: none of the {n_in} {what} samples has a token to learn "
            "(empty responses and data.addEos false?)"
        )

    def describe_cutoff(self, what: str, cutoff_len: int) -> str:
        """One log line saying what the cutoff rules did, e.g. ``training samples: 3 truncated at ...``."""
        parts = []
        if self.truncated:
            parts.append(f"{self.truncated} truncated at cutoffLen {cutoff_len}")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} dropped over cutoffLen {cutoff_len} (no response token left "
                         "or data.dropTruncated)")
        if self.dropped_no_labels:
            parts.append(f"{self.dropped_no_labels} dropped with no token to learn (empty response, addEos false)")
        return f"{what} samples: " + ", ".join(parts) + f" ({self.kept} kept)"


def special_prefix(tokenizer: Any) -> list[int]:
    """Special ids the tokenizer puts *before* a text (e.g. BOS), found by encoding a probe.

    Only a prefix is taken: a tokenizer that also appends EOS/SEP to every text must not put one
    between the prompt and the response.
    """
    probe = "x"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


def _prompt_prefix(tokenizer: Any, cfg: DataConfig) -> list[int]:
    # A chat template writes its own special tokens (e.g. <|begin_of_text|>); adding BOS again would double it.
    return [] if cfg.template == "chat" or cfg.kind == "messages" else special_prefix(tokenizer)


def encode_texts(texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), _BATCH):
        chunk = list(texts[i : i + _BATCH])
        enc = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        out.extend(list(ids) for ids in enc)
    return out


def eos_id(tokenizer: Any, cfg: DataConfig) -> int | None:
    if not cfg.add_eos:
        return None
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("data.addEos is true but the tokenizer has no EOS token; set data.addEos to false")
    return int(eos)


def encode_prompt(prompt: str, tokenizer: Any, cfg: DataConfig) -> list[int]:
    """Prompt ids exactly as training builds them: use this for generation at eval time."""
    return _prompt_prefix(tokenizer, cfg) + encode_texts([prompt], tokenizer)[0]


def finish_example(ids: list[int], labels: list[int], cfg: DataConfig) -> tuple[TokenizedExample | None, str]:
    """Apply the label and cutoff rules to one sample's ids and labels (every kind of record shares them).

    Returns ``(example or None, status)`` with status ok/truncated/too_long/no_labels. The first
    label is masked (see module docstring); a sample over ``cutoff_len`` is cut at the end, or
    dropped with ``drop_truncated``; a sample left without a labelled token is dropped.
    """
    labels = list(labels)
    if labels:
        labels[0] = IGNORE_INDEX  # see module docstring: never predicted from inside the sample
    status = "ok"
    if len(ids) > cfg.cutoff_len:
        if cfg.drop_truncated:
            return None, "too_long"
        ids, labels, status = ids[: cfg.cutoff_len], labels[: cfg.cutoff_len], "truncated"
    if all(t == IGNORE_INDEX for t in labels):
        return None, "too_long" if status == "truncated" else "no_labels"
    return TokenizedExample(list(ids), labels, truncated=status == "truncated"), status


def _assemble(
    prompt_ids: list[int], response_ids: list[int], eos: int | None, cfg: DataConfig
) -> tuple[TokenizedExample | None, str]:
    """Build one instruction sample: prompt (masked unless ``train_on_inputs``), response and EOS."""
    resp = response_ids + ([eos] if eos is not None else [])
    labels = (list(prompt_ids) if cfg.train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)) + list(resp)
    return finish_example(prompt_ids + resp, labels, cfg)


def tokenize_example(prompt: str, response: str, tokenizer: Any, cfg: DataConfig) -> TokenizedExample | None:
    """Tokenize one sample; None when the cutoff or the label rules drop it (see :func:`tokenize_examples`)."""
    res = tokenize_examples([(prompt, response)], tokenizer, cfg, raise_if_empty=False)
    return res.examples[0] if res.examples else None


def tokenize_examples(
    pairs: Sequence[tuple[str, str]],
    tokenizer: Any,
    cfg: DataConfig,
    *,
    raise_if_empty: bool = True,
    what: str = "training",
) -> TokenizeResult:
    """Tokenize many ``(prompt, response)`` pairs in batches and apply the cutoff rules.

    Samples longer than ``cutoff_len`` are cut at the end (or dropped when ``drop_truncated``);
    samples left with no labelled token (e.g. a prompt that alone fills the cutoff) are dropped,
    since they would only add compute. With ``raise_if_empty`` a result with nothing kept raises a
    DataError that says whether the cutoff is the cause.
    """
    eos = eos_id(tokenizer, cfg)
    prefix = _prompt_prefix(tokenizer, cfg)
    prompt_ids = encode_texts([p for p, _ in pairs], tokenizer)
    response_ids = encode_texts([r for _, r in pairs], tokenizer)
    res = TokenizeResult()
    extra = len(prefix) + (1 if eos is not None else 0)
    for i, (p_ids, r_ids) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        ex, status = _assemble(prefix + p_ids, r_ids, eos, cfg)
        res.add(i, ex, status, len(p_ids) + len(r_ids) + extra)
    if raise_if_empty:
        res.raise_if_empty(len(pairs), cfg.cutoff_len, what)
    return res
