"""Packing and collation: whole samples per row, restarting positions, and no cross-sample leakage.

The leak test is the one that matters: a packed row must give every sample exactly the logits it
gets alone, in eager and SDPA attention, which proves that transformers builds a block-diagonal
mask from the restarting ``position_ids`` and that RoPE sees per-sample positions.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from kubelora_trainer.config import DataConfig
from kubelora_trainer.data import (
    IGNORE_INDEX,
    PACKED_FORWARD_KWARGS,
    TokenizedExample,
    collate,
    no_pack,
    pack,
    render,
    tokenize_examples,
)

from . import smollm2_tokenizer


def fake_examples(lengths: list[int], seed: int = 0) -> list[TokenizedExample]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, 500) for _ in range(n)]
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]
        labels[0] = IGNORE_INDEX
        out.append(TokenizedExample(ids, labels))
    return out


def test_pack_keeps_samples_whole_and_tokens_preserved() -> None:
    rng = random.Random(3)
    examples = fake_examples([rng.randint(1, 64) for _ in range(300)])
    rows = pack(examples, max_len=64, seed=7)
    assert sum(len(r) for r in rows) == sum(len(e) for e in examples)
    assert sum(sum(1 for t in r.labels if t != IGNORE_INDEX) for r in rows) == sum(e.num_label_tokens for e in examples)
    remaining = {tuple(e.input_ids): 0 for e in examples}
    for e in examples:
        remaining[tuple(e.input_ids)] += 1
    for r in rows:
        assert len(r) <= 64
        assert len(r.input_ids) == len(r.labels) == len(r.position_ids) == sum(r.seq_lens)
        start = 0
        for n in r.seq_lens:
            seg = tuple(r.input_ids[start : start + n])
            assert remaining.get(seg, 0) > 0, "a row holds a piece that is not a whole sample"
            remaining[seg] -= 1
            assert r.position_ids[start : start + n] == list(range(n))  # restart at each boundary
            assert r.labels[start] == IGNORE_INDEX
            start += n
    assert all(v == 0 for v in remaining.values())
    # Best-fit decreasing stays close to the lower bound: every sample over half a row needs its own row.
    lower = max(-(-sum(len(e) for e in examples) // 64), sum(1 for e in examples if len(e) > 32))
    assert len(rows) <= 1.1 * lower


def test_pack_is_deterministic_and_rejects_oversized() -> None:
    examples = fake_examples([5, 9, 3, 7, 2, 8])
    assert pack(examples, 12, seed=1) == pack(examples, 12, seed=1)
    with pytest.raises(ValueError, match="more than the row length"):
        pack(fake_examples([13]), 12)


def test_no_pack_one_row_per_sample() -> None:
    examples = fake_examples([4, 6])
    rows = no_pack(examples)
    assert [r.input_ids for r in rows] == [e.input_ids for e in examples]
    assert rows[1].position_ids == list(range(6)) and not rows[1].is_packed


def test_collate_packed_padding_and_positions() -> None:
    rows = pack(fake_examples([3, 4, 6]), max_len=7)  # rows: [6] and [3, 4]
    batch = collate(rows, pad_token_id=0, pad_to_multiple_of=8)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (2, 8)
    for b, row in enumerate(rows):
        n = len(row)
        assert batch["position_ids"][b, :n].tolist() == row.position_ids
        assert batch["position_ids"][b, n:].tolist() == list(range(8 - n))  # padding restarts at 0
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()


def test_collate_unpacked_is_plain() -> None:
    batch = collate(no_pack(fake_examples([3, 5])), pad_token_id=0)
    assert set(batch) == {"input_ids", "labels"}
    assert batch["labels"][0, 3:].tolist() == [IGNORE_INDEX] * 2


def tiny_llama(vocab: int, impl: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation=impl,
    )
    return LlamaForCausalLM(config).eval().float()


@pytest.fixture(scope="module")
def real_examples() -> tuple[Any, list[TokenizedExample]]:
    tok = smollm2_tokenizer()
    cfg = DataConfig(path="unused.jsonl")
    recs = [
        {"instruction": "Sort these numbers.", "input": "9, 2, 7", "output": "2, 7, 9"},
        {"instruction": "What is 3 plus 4?", "output": "7"},
        {"instruction": "Uppercase it.", "input": "quiet river", "output": "QUIET RIVER"},
        {"instruction": "Count the words in this text.", "input": "a b c d e", "output": "5"},
        {"instruction": "Hi", "output": "Hello"},
    ]
    res = tokenize_examples([render(r, cfg) for r in recs], tok, cfg)
    return tok, res.examples


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_logits_equal_unpacked(real_examples: tuple[Any, list[TokenizedExample]], impl: str) -> None:
    tok, examples = real_examples
    model = tiny_llama(len(tok), impl)
    longest = max(len(e) for e in examples)
    rows = pack(examples, max_len=longest + 45, seed=0)
    assert any(r.is_packed for r in rows) and len({len(r) for r in rows}) > 1  # packing and padding both exercised
    batch = collate(rows, pad_token_id=tok.pad_token_id, pad_to_multiple_of=16)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, **PACKED_FORWARD_KWARGS).logits
        assert torch.isfinite(packed).all()  # padding rows are not fully masked (no NaN in eager softmax)
        by_ids = {}
        for ex in examples:
            by_ids[tuple(ex.input_ids)] = model(torch.tensor([ex.input_ids]), use_cache=False).logits[0]
    checked = 0
    for b, row in enumerate(rows):
        start = 0
        for n in row.seq_lens:
            alone = by_ids[tuple(row.input_ids[start : start + n])]
            torch.testing.assert_close(packed[b, start : start + n], alone, atol=1e-5, rtol=0)
            start += n
            checked += 1
    assert checked == len(examples)


def test_packed_loss_equals_sum_of_sample_losses(real_examples: tuple[Any, list[TokenizedExample]]) -> None:
    tok, examples = real_examples
    model = tiny_llama(len(tok), "sdpa")
    rows = pack(examples, max_len=sum(len(e) for e in examples))  # everything in one row
    assert len(rows) == 1

    def summed_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    with torch.no_grad():
        packed = summed_loss(collate(rows, tok.pad_token_id))
        alone = sum(summed_loss(collate([r], tok.pad_token_id)) for r in no_pack(examples))
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-6)
