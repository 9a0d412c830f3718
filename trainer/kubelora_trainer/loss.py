"""The training objective, computed only where it counts.

Why not `model(**batch).loss`: that projects every position through the vocabulary-sized
output head, while only response tokens carry labels (about 10% on instruction data). Running
the decoder, selecting the labelled positions and projecting only those is the same loss at a
fraction of the head's cost (docs/benchmarks.md).

Where every token is labelled (plain text, long answers) the head's output is still
positions x vocabulary: with `chunk` set, `chunked_head_loss` projects a slice of positions at a
time and computes each slice's gradient right away, so no full-vocabulary logits tensor (nor its
fp32 copy and softmax) ever exists; the same sum, the same gradients.
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

    def __init__(self, causal_lm: nn.Module, chunk: int | None = None, head_backend: str | None = None) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        base: Any = getattr(causal_lm, "get_base_model", lambda: causal_lm)()
        self._decoder: nn.Module = base.get_decoder()
        self._head: nn.Module = base.get_output_embeddings()
        plain = _plain_frozen_linear(self._head)
        #: Positions per head slice; None: one plain projection (used also where the head is not a
        #: frozen bias-free nn.Linear, e.g. a LoRA-adapted or trainable head).
        self.chunk = chunk if chunk and plain else None
        #: `head_cross_entropy` compiled with `head_backend` (with `training.compileLayers`): the fp32
        #: upcast, log-softmax and its backward become two fused kernels instead of several positions x
        #: vocabulary passes, and no fp32 logits tensor is kept for backward.
        self._compiled_head: Any = (torch.compile(head_cross_entropy, dynamic=True, backend=head_backend)
                                    if head_backend and plain and self.chunk is None else None)

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
        if self.chunk is not None:
            weight: torch.Tensor = self._head.weight  # type: ignore[assignment]  # an nn.Linear's (checked)
            return chunked_head_loss(picked, weight, targets[keep], self.chunk), keep.sum()
        if self._compiled_head is not None:
            return self._compiled_head(picked, self._head.weight, targets[keep]), keep.sum()
        logits = self._head(picked).float()
        loss_sum = F.cross_entropy(logits, targets[keep], reduction="sum")
        return loss_sum, keep.sum()


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` (a frozen, bias-free head): the plain path's
    arithmetic as one function, so that ``torch.compile`` sees the upcast and the reduction together."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


def _plain_frozen_linear(head: nn.Module) -> bool:
    return type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T, target), slice by slice; the weight is frozen.

    Forward computes each slice's gradient with respect to `hidden` at once (softmax - one-hot,
    times the weight) and keeps only that (rows x hidden); backward scales it. Logits are taken in
    the compute dtype (autocast's, as `F.linear` would) and reduced in fp32, as the plain path does.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int, dtype: torch.dtype) -> torch.Tensor:
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(dtype)
            t = targets[start : start + chunk]
            logits = (h @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place over the logits
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                grad[start : start + chunk] = probs.to(dtype) @ w
        ctx.save_for_backward(grad if grad is not None else hidden.new_empty(0))
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # noqa: ANN205
        (grad,) = ctx.saved_tensors
        grad_hidden = (grad.float() * grad_out).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        return grad_hidden, None, None, None, None


def chunked_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Summed next-token cross-entropy of `hidden` (rows x hidden) through a frozen, bias-free head."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    with torch.autocast(device_type=device_type, enabled=False):
        out: torch.Tensor = _ChunkedHeadLoss.apply(hidden, weight, targets, chunk, dtype)
    return out


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Label tokens the loss will use for a collated batch (same rule as CausalLMLoss)."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    if batch.get("position_ids") is not None:
        keep &= batch["position_ids"][:, 1:] != 0
    return int(keep.sum())
