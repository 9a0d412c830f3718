"""Packing: several short samples per row, so compute is not spent on padding.

Instruction samples are short and vary in length; padding a batch to its longest sample wastes
most of the FLOPs. Packing puts whole samples side by side in rows of at most ``max_len`` tokens.
It is only correct if samples stay independent, which the row carries the means for:
``position_ids`` restart at 0 at every sample start (RoPE sees each sample at its own positions,
and transformers derives a block-diagonal causal mask from the restarts, see ``collate``), and
the first label of each sample is already ``-100`` (see ``tokenize``). A sample is never split
across rows: half a sample would be trained without its prompt.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass

from .tokenize import TokenizedExample


@dataclass
class PackedRow:
    """One training row: concatenated samples, their labels, per-sample positions and lengths."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    seq_lens: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def is_packed(self) -> bool:
        """More than one sample in the row."""
        return len(self.seq_lens) > 1


def _row(examples: Sequence[TokenizedExample]) -> PackedRow:
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for ex in examples:
        ids.extend(ex.input_ids)
        labels.extend(ex.labels)
        pos.extend(range(len(ex.input_ids)))
    return PackedRow(ids, labels, pos, [len(ex.input_ids) for ex in examples])


def no_pack(examples: Sequence[TokenizedExample]) -> list[PackedRow]:
    """One row per sample, in the given order."""
    return [_row([ex]) for ex in examples]


def pack(examples: Sequence[TokenizedExample], max_len: int, seed: int | None = None) -> list[PackedRow]:
    """Pack samples into rows of at most ``max_len`` tokens (best-fit decreasing).

    Samples are placed longest first, each into the open row whose free space fits it most
    tightly (a sorted list of free capacities, so O(n log n) for thousands of samples). Rows come
    out roughly longest-samples-first; with ``seed`` their order is shuffled deterministically so
    the first steps do not all see the longest samples. Within a row, samples keep input order.
    Raises ValueError for a sample longer than ``max_len`` (the cutoff should have handled it).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin index), sorted
    for i in order:
        n = len(examples[i])
        if n > max_len:
            raise ValueError(f"sample {i} has {n} tokens, more than the row length {max_len}")
        if n == 0:
            continue
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
            bins[b].append(i)
            room -= n
        else:
            b, room = len(bins), max_len - n
            bins.append([i])
        if room > 0:
            bisect.insort(free, (room, b))
    rows = [_row([examples[i] for i in sorted(members)]) for members in bins]
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return rows


def packing_stats(rows: Sequence[PackedRow], max_len: int) -> dict[str, float]:
    """Rows, samples, tokens and fill ratio (tokens / (rows * max_len)) for the run log."""
    tokens = sum(len(r) for r in rows)
    return {
        "rows": len(rows),
        "samples": sum(len(r.seq_lens) for r in rows),
        "tokens": tokens,
        "label_tokens": sum(1 for r in rows for t in r.labels if t != -100),
        "fill": tokens / (len(rows) * max_len) if rows else 0.0,
    }
