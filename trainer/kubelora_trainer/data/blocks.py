"""Plain text (``data.kind: text``) -> full blocks of ``cutoffLen`` tokens with loss on every token.

Continued pre-training, as transformers' ``run_clm`` does it: every document is tokenized (with the
tokenizer's BOS-style prefix, if any), followed by EOS so the model sees where one ends, and the
documents are concatenated into one stream cut into blocks of exactly ``cutoffLen`` tokens. A block
is one row and one sequence: documents inside a block attend to each other, separated by EOS.

Why only full blocks for training: fixed-length rows are what throughput benchmarks compare and
what a compiled step wants (one shape); the short tail of the stream is dropped and counted. The
held-out stream keeps its tail as a shorter last row, so a small eval file still measures a loss.
Every label is the token itself except a block's first, which no position of the block predicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import DataConfig
from .errors import DataError
from .tokenize import TokenizedExample, encode_texts, eos_id, finish_example, special_prefix


@dataclass
class Blocks:
    """The blocks of one stream and what was left over."""

    examples: list[TokenizedExample]
    tokens: int  # in the whole stream
    tail_dropped: int  # tokens after the last full block that were not used

    def counts(self) -> dict[str, int]:
        """For the run log and summary.json."""
        return {"blocks": len(self.examples), "tokens": self.tokens, "tail_tokens_dropped": self.tail_dropped}


def text_blocks(texts: Sequence[str], tokenizer: Any, cfg: DataConfig, *, keep_tail: bool, what: str) -> Blocks:
    """Concatenate ``texts`` (each + EOS unless ``addEos`` is false) and cut into ``cutoff_len`` blocks.

    ``keep_tail`` keeps a final shorter block (eval); training drops it. Raises a DataError when the
    training text does not fill one block.
    """
    eos = eos_id(tokenizer, cfg)
    prefix = special_prefix(tokenizer)
    stream: list[int] = []
    for ids in encode_texts(list(texts), tokenizer):
        stream += prefix + ids + ([eos] if eos is not None else [])
    n = cfg.cutoff_len
    full = len(stream) // n
    if full == 0 and not keep_tail:
        raise DataError(
            f"the {what} text has {len(stream)} tokens, less than one block of data.cutoffLen {n}; add text or "
            "lower data.cutoffLen"
        )
    starts = list(range(0, full * n, n))
    tail = len(stream) - full * n
    if keep_tail and tail >= 2:  # one token alone has nothing to predict
        starts.append(full * n)
    examples = []
    for s in starts:
        block = stream[s : s + n]
        ex, _ = finish_example(block, block, cfg)
        if ex is not None:
            examples.append(ex)
    dropped = 0 if keep_tail and tail >= 2 else tail
    return Blocks(examples, len(stream), dropped)
