"""The example configs of each data.kind load and their bundled data build rows with the real tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubelora_trainer.config import load_config
from kubelora_trainer.data import build_datasets

from . import smollm2_tokenizer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "trainer"


@pytest.mark.parametrize(("name", "kind", "answers"), [
    ("chat-messages.yaml", "messages", True),
    ("text-pretraining.yaml", "text", False),
    ("pretokenized.yaml", "tokens", False),
])
def test_example_data_builds(name: str, kind: str, answers: bool) -> None:
    cfg = load_config(EXAMPLES / name)
    data = build_datasets(cfg.data, smollm2_tokenizer(), cfg.training.seed)
    assert data.cfg.kind == kind and data.train_rows and data.eval_rows
    assert bool(data.eval_prompts) == answers
    n_rows = len(data.train_rows) // (cfg.training.micro_batch_size * cfg.training.gradient_accumulation_steps)
    assert n_rows >= 1  # at least one full optimizer step of data
