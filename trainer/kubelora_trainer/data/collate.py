"""Rows -> a padded batch of tensors for ``model(**batch)``.

Why there is no ``attention_mask`` (checked against transformers 5.23, Llama, eager and sdpa):

* Packed batches: ``masking_utils.create_causal_mask`` calls ``find_packed_sequence_indices`` on
  ``position_ids`` when ``attention_mask is None`` and there is no cache; every place where the
  position does not go up by exactly 1 starts a new sequence, and the mask becomes causal AND
  same-sequence (block-diagonal). RoPE uses the same restarting positions. A 2-D attention_mask
  would switch that detection off and let samples see each other, so none is returned. Padding
  gets positions ``0, 1, 2, ...``: a restart, so it forms its own block that attends only to
  padding (never to a real token, and no query row is fully masked, so eager softmax has no NaN).
* Unpacked batches: padding is trailing, so under a plain causal mask no real token can attend to
  it, and its labels are ``-100``. Omitting both the mask and ``position_ids`` keeps SDPA on its
  ``is_causal`` fast path (no materialised mask) and makes the batch correct with or without a cache.

THE CALLER MUST RUN PACKED BATCHES WITH ``use_cache=False`` (``model(**batch, use_cache=False)`` or
``model.config.use_cache = False``): LlamaConfig defaults to ``use_cache=True``, the model then
creates an empty DynamicCache even in training mode, and with a cache present transformers skips
the packed-sequence detection, so the samples of a row attend to each other (verified: logits
differ by ~0.4 on a tiny Llama). Gradient checkpointing forces the cache off, but do not rely on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .packing import PackedRow
from .tokenize import IGNORE_INDEX

#: Keyword arguments a packed batch needs in the forward call (see module docstring).
PACKED_FORWARD_KWARGS: dict[str, bool] = {"use_cache": False}


def collate(
    rows: Sequence[PackedRow], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Pad rows on the right to the batch's longest row (rounded up to ``pad_to_multiple_of``).

    Returns ``input_ids`` and ``labels`` (``-100`` on padding), plus ``position_ids`` when any row
    holds more than one sample. Padding is masked by position, never by token id: ``pad_token_id``
    may equal EOS (SmolLM2), whose real occurrences are labelled.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    length = max(len(r) for r in rows)
    if pad_to_multiple_of and length % pad_to_multiple_of:
        length += pad_to_multiple_of - length % pad_to_multiple_of
    packed = any(r.is_packed for r in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row)
        ids[b, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(row.labels, dtype=torch.long)
        pos[b, :n] = torch.tensor(row.position_ids, dtype=torch.long)
        pos[b, n:] = torch.arange(length - n, dtype=torch.long)  # padding = a sequence of its own
    batch = {"input_ids": ids, "labels": labels}
    if packed:
        batch["position_ids"] = pos
    return batch


def collate_flat(rows: Sequence[PackedRow]) -> dict[str, torch.Tensor]:
    """Concatenate rows into one padding-free sequence of batch size 1.

    Returns ``input_ids``, ``labels``, ``position_ids`` (restarting at every sample) and
    ``seq_starts``: the offsets ``[0, s1, ..., T]`` of the samples, which the loss hands to
    ``segment_attention`` so each sample attends only to itself. No token is padding, so no
    compute is spent on it; the first token of every sample carries no label (the loss masks
    targets at position 0), exactly as in :func:`collate`.
    """
    if not rows:
        raise ValueError("collate_flat needs at least one row")
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    starts = [0]
    for row in rows:
        ids.extend(row.input_ids)
        labels.extend(row.labels)
        pos.extend(row.position_ids)
        for n in row.seq_lens:
            starts.append(starts[-1] + n)
    if starts[-1] != len(ids):
        raise ValueError(f"row sample lengths add up to {starts[-1]}, the rows hold {len(ids)} tokens")
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "seq_starts": torch.tensor(starts, dtype=torch.long),
    }
