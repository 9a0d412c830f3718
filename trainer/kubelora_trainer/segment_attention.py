"""Attention within each sample of a padding-free sequence.

Why: the recipe concatenates a micro-batch's rows into one sequence with no padding
(``collate_flat``). Attention must then stay inside each sample. The stock paths do that
with a block-diagonal mask over the whole sequence: eager computes and masks every T x T
score, SDPA falls back to a masked kernel. Running SDPA with ``is_causal=True`` on each sample
instead computes only the sum of len(sample)^2 scores, builds no mask and never touches
padding, with the same loss and gradients (tests/trainer/test_fast_paths.py; what it saves:
docs/benchmarks.md).

How it plugs in: transformers looks attention functions up by ``config._attn_implementation``
in ``AttentionInterface``. :func:`enable` registers ``kubelora_segments_<eager|sdpa>`` and points
the model at it. A forward that carries ``kubelora_segments`` (start/end offsets, passed down by
the decoder as a keyword argument) takes the per-sample path; any other call (evaluation batches,
generation with a KV cache) goes to the eager or SDPA function the model used before, with that
function's own mask, so nothing else changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Keyword argument that carries a flat sequence's sample boundaries down to attention.
SEGMENTS_KWARG = "kubelora_segments"
_PREFIX = "kubelora_segments_"


def segment_bounds(seq_starts: torch.Tensor) -> list[tuple[int, int]]:
    """``[0, s1, s2, ..., T]`` offsets -> ``[(0, s1), (s1, s2), ...]`` (host ints, computed once per forward)."""
    starts = [int(v) for v in seq_starts.tolist()]
    return list(zip(starts[:-1], starts[1:], strict=True))


def attend_per_segment(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: Sequence[tuple[int, int]],
    scaling: float,
    dropout: float,
) -> torch.Tensor:
    """Causal SDPA on each segment of a batch-1 sequence; returns ``[1, T, heads, head_dim]``.

    ``split`` (not slicing) gives one gradient concatenation in backward instead of one
    zero-filled full-length tensor per segment.
    """
    if query.shape[0] != 1:
        raise ValueError(f"segment attention needs one flat sequence, got batch {query.shape[0]}")
    lengths = [end - start for start, end in segments]
    if sum(lengths) != query.shape[2]:
        raise ValueError(f"segments cover {sum(lengths)} positions, the sequence has {query.shape[2]}")
    groups = query.shape[1] // key.shape[1]
    outputs = [
        F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=groups > 1
        )
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True)
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def _make_attention(fallback_name: str) -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    fallback: Any = sdpa_attention_forward if fallback_name == "sdpa" else eager_attention_forward

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        segments = kwargs.pop(SEGMENTS_KWARG, None)
        if segments is None:
            return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return attend_per_segment(query, key, value, segments, scale, dropout), None

    return attention


def unsupported_reason(config: Any) -> str | None:
    """Why per-sample causal SDPA would not compute this model's attention, or None if it would.

    Sliding-window attention and logit soft-capping change the scores in ways plain causal SDPA
    does not reproduce; such models keep padded batches.
    """
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"the model uses sliding-window attention ({config.sliding_window})"
    if getattr(config, "attn_logit_softcapping", None):
        return "the model soft-caps attention logits"
    return None


def enable(model: nn.Module) -> str:
    """Point ``model`` (a transformers PreTrainedModel, or a peft wrapper of one) at segment attention.

    Returns the implementation name now in use. Idempotent. Check :func:`unsupported_reason` first.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    base: Any = getattr(model, "get_base_model", lambda: model)()
    config = base.config
    current = str(config._attn_implementation or "eager")
    if current.startswith(_PREFIX):
        return current
    if current not in ("eager", "sdpa"):
        raise ValueError(f"padding-free training supports eager or sdpa attention, the model uses {current!r}")
    name = _PREFIX + current
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention(current))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    config._attn_implementation = name
    return name


def disable(model: nn.Module) -> None:
    """Restore the eager or SDPA implementation (before saving a config others will load)."""
    base: Any = getattr(model, "get_base_model", lambda: model)()
    current = str(base.config._attn_implementation or "")
    if current.startswith(_PREFIX):
        base.config._attn_implementation = current.removeprefix(_PREFIX)
