"""The training objective, computed only where it counts.

Why not `model(**batch).loss`: that projects every position through the vocabulary-sized
output head, while only response tokens carry labels (about 10% on instruction data). Running
the decoder, selecting the labelled positions and projecting only those is the same loss at a
fraction of the head's cost (measured +35% tokens/s on SmolLM2).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .segment_attention import SEGMENTS_KWARG, segment_bounds

IGNORE_INDEX = -100


class CausalLMLoss(nn.Module):
    """Sum of next-token cross-entropy over labelled positions, and how many there were.

    It returns the *sum*: the recipe divides by the label count of the whole optimizer step
    across micro-batches and ranks, so a 2x(batch b) job and a 1x(batch 2b) job compute the
    same gradient. Wrapping this module (not the peft model) in DDP keeps gradient sync
    hooks on the path that actually runs.
    """

    def __init__(self, causal_lm: nn.Module) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        base: Any = getattr(causal_lm, "get_base_model", lambda: causal_lm)()
        self._decoder: nn.Module = base.get_decoder()
        self._head: nn.Module = base.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        seq_starts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        extra: dict[str, Any] = {}
        if seq_starts is not None:  # a padding-free batch from collate_flat: attend within each sample
            extra[SEGMENTS_KWARG] = segment_bounds(seq_starts)
        hidden = self._decoder(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False, **extra
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if position_ids is not None:
            # In a packed row the first token of a sample is never predicted from the previous sample.
            keep &= position_ids[:, 1:] != 0
        picked = hidden[:, :-1][keep]
        logits = self._head(picked).float()
        loss_sum = F.cross_entropy(logits, targets[keep], reduction="sum")
        return loss_sum, keep.sum()


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Label tokens the loss will use for a collated batch (same rule as CausalLMLoss)."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    if batch.get("position_ids") is not None:
        keep &= batch["position_ids"][:, 1:] != 0
    return int(keep.sum())
