"""data.kind: messages, text and tokens records through the real pipeline and SmolLM2's real tokenizer.

Each kind: the labels mask (assistant turns only / every token / the given labels), the row shapes,
detection from the first record when data.kind is unset, and bad records reported in one line
with the file and line.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from kubelora_trainer.config import DataConfig
from kubelora_trainer.data import IGNORE_INDEX, DataError, build_datasets, encode_prompt

from . import smollm2_tokenizer

CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome"},
]


@pytest.fixture(scope="module")
def tok() -> Any:
    return smollm2_tokenizer()


def _jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _cfg(path: Path, **kw: Any) -> DataConfig:
    return DataConfig(path=str(path), val_set_size=0, shuffle=False, **kw)


def _labelled_text(tok: Any, ids: list[int], labels: list[int]) -> list[str]:
    """The labelled spans of a sample, decoded (consecutive labelled tokens form one span)."""
    spans: list[list[int]] = []
    prev = False
    for i, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            if not prev:
                spans.append([])
            spans[-1].append(i)
        prev = lab != IGNORE_INDEX
    return [tok.decode(s) for s in spans]


# ------------------------------------------------------------------ messages
def test_messages_loss_on_assistant_turns_only(tok: Any, tmp_path: Path) -> None:
    data = build_datasets(_cfg(_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}]), packing=False), tok, seed=0)
    (row,) = data.train_rows
    assert data.cfg.kind == "messages" and data.stats["kind"] == "messages"
    assert tok.decode(row.input_ids) == tok.apply_chat_template(CHAT, tokenize=False)
    assert _labelled_text(tok, row.input_ids, row.labels) == ["Paris<|im_end|>\n", "Rome<|im_end|>\n"]


def test_messages_train_on_inputs_labels_every_turn(tok: Any, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    (row,) = build_datasets(_cfg(path, packing=False, train_on_inputs=True), tok, seed=0).train_rows
    assert row.labels[0] == IGNORE_INDEX and row.labels[1:] == row.input_ids[1:]


def test_messages_eval_prompt_is_the_training_prefix_of_the_last_answer(tok: Any, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    data = build_datasets(_cfg(path, eval_path=str(path), packing=False), tok, seed=0)
    ((prompt, answer),) = data.eval_prompts
    assert answer == "Rome" and prompt.endswith("And of Italy?<|im_end|>\n<|im_start|>assistant\n")
    ids = encode_prompt(prompt, tok, data.cfg)
    row = data.eval_rows[0]
    assert row.input_ids[: len(ids)] == ids  # generation continues exactly the prefix trained on
    assert tok.decode(row.input_ids[len(ids) :]) == "Rome<|im_end|>\n"


def test_messages_pack_into_rows(tok: Any, tmp_path: Path) -> None:
    records = [{"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": str(i)}]}
               for i in range(20)]
    data = build_datasets(_cfg(_jsonl(tmp_path / "c.jsonl", records), cutoff_len=128), tok, seed=0)
    rows = data.train_rows
    assert sum(len(r.seq_lens) for r in rows) == 20 and len(rows) < 20
    assert all(len(r) <= 128 and sum(r.seq_lens) == len(r) for r in rows)


def test_messages_without_chat_template_is_one_clear_error(tok: Any, tmp_path: Path) -> None:
    plain = copy.copy(tok)
    plain.chat_template = None
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    for kind in ("messages", None):  # explicit, and detected
        with pytest.raises(DataError, match=r"data.kind 'messages' needs a tokenizer with a chat template"):
            build_datasets(_cfg(path, kind=kind), plain, seed=0)


@pytest.mark.parametrize(("bad", "message"), [
    ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\]\.role is 'bot'; use one of system, user"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\]\.content must be a string, got int"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"messages has no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, r"messages\[0\] is an assistant turn"),
    ({"messages": "hi"}, r"'messages' must be a non-empty list"),
])
def test_bad_chat_record_names_file_and_line(tok: Any, tmp_path: Path, bad: dict, message: str) -> None:
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT}, bad])
    with pytest.raises(DataError, match=rf"chat\.jsonl line 3: {message}") as err:
        build_datasets(_cfg(path), tok, seed=0)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ text
DOCS = [f"Document number {i}: " + " ".join(f"word{j}" for j in range(i % 7 + 3)) for i in range(40)]


def test_text_is_cut_into_full_blocks_with_loss_on_every_token(tok: Any, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "text.jsonl", [{"text": d} for d in DOCS])
    data = build_datasets(_cfg(path, cutoff_len=64), tok, seed=0)
    stream = [t for d in DOCS for t in [*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id]]
    rows = data.train_rows
    assert data.cfg.kind == "text" and len(rows) == len(stream) // 64
    assert all(len(r) == 64 and r.seq_lens == [64] and not r.is_packed for r in rows)
    assert [t for r in rows for t in r.input_ids] == stream[: len(rows) * 64]  # documents in order, EOS between
    for r in rows:
        assert r.labels[0] == IGNORE_INDEX and r.labels[1:] == r.input_ids[1:]
    assert data.stats["train_samples"] == {"blocks": len(rows), "tokens": len(stream),
                                           "tail_tokens_dropped": len(stream) % 64}
    assert data.eval_prompts == [] and data.stats["template"] is None


def test_text_eval_keeps_its_short_tail(tok: Any, tmp_path: Path) -> None:
    train = _jsonl(tmp_path / "t.jsonl", [{"text": d} for d in DOCS])
    held = _jsonl(tmp_path / "h.jsonl", [{"text": "A short held-out document."}])
    data = build_datasets(_cfg(train, eval_path=str(held), cutoff_len=64), tok, seed=0)
    (row,) = data.eval_rows
    assert tok.decode(row.input_ids) == "A short held-out document.<|im_end|>" and len(row) < 64
    assert data.eval_prompts == []  # no answers: exact match off, eval loss only


def test_text_shorter_than_one_block_is_an_error(tok: Any, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "too short"}])
    with pytest.raises(DataError, match=r"the training text has 3 tokens, less than one block of data.cutoffLen 64"):
        build_datasets(_cfg(path, cutoff_len=64), tok, seed=0)


def test_text_record_without_text_names_file_and_line(tok: Any, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}, {"body": "c"}])
    with pytest.raises(DataError, match=r"t\.jsonl line 3: record has no 'text' field; its columns: body"):
        build_datasets(_cfg(path), tok, seed=0)
    (tmp_path / "t.json").write_text(json.dumps([{"text": "a"}, {"text": ["b"]}]))
    with pytest.raises(DataError, match=r"t\.json record 1: 'text' must be a string, got list"):
        build_datasets(_cfg(tmp_path / "t.json"), tok, seed=0)


# ------------------------------------------------------------------ tokens
def test_tokens_keep_given_labels_and_default_to_input_ids(tok: Any, tmp_path: Path) -> None:
    records = [
        {"input_ids": [10, 11, 12, 13], "labels": [-100, -100, 12, 13]},
        {"input_ids": [20, 21, 22]},
    ]
    data = build_datasets(_cfg(_jsonl(tmp_path / "ids.jsonl", records), packing=False), tok, seed=0)
    assert data.cfg.kind == "tokens"
    assert [(r.input_ids, r.labels) for r in data.train_rows] == [
        ([10, 11, 12, 13], [-100, -100, 12, 13]),
        ([20, 21, 22], [-100, 21, 22]),  # first label: nothing in the sample predicts it
    ]
    assert data.eval_prompts == []


def test_tokens_pack_and_truncate_like_instruction_samples(tok: Any, tmp_path: Path) -> None:
    records = [{"input_ids": list(range(100, 100 + n))} for n in (30, 20, 10, 12, 40)]
    data = build_datasets(_cfg(_jsonl(tmp_path / "ids.jsonl", records), cutoff_len=32), tok, seed=0)
    rows = data.train_rows
    assert sorted(n for r in rows for n in r.seq_lens) == [10, 12, 20, 30, 32]  # the 40 is cut to 32
    assert all(len(r) <= 32 for r in rows) and data.stats["train_samples"]["truncated"] == 1
    for r in rows:
        start = 0
        for n in r.seq_lens:  # every sample's first label masked: no cross-sample loss in a packed row
            assert r.labels[start] == IGNORE_INDEX and r.position_ids[start] == 0
            start += n


@pytest.mark.parametrize(("bad", "message"), [
    ({"input_ids": [1, 49152]}, r"input_ids\[1\] is 49152, outside the tokenizer's vocabulary of 49152 tokens"),
    ({"input_ids": [1, -100]}, r"input_ids\[1\] is -100, outside the tokenizer's vocabulary"),
    ({"input_ids": [1, 2], "labels": [1]}, r"'labels' has 1 ids, 'input_ids' has 2"),
    ({"input_ids": [1, 2], "labels": [1, 60000]}, r"labels\[1\] is 60000, outside .* \(use -100 for no loss\)"),
    ({"input_ids": [1, "2"]}, r"input_ids\[1\] is '2', not an integer token id"),
    ({"input_ids": []}, r"'input_ids' must be a non-empty list"),
])
def test_bad_token_record_names_file_and_line(tok: Any, tmp_path: Path, bad: dict, message: str) -> None:
    path = _jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2, 3]}, bad])
    with pytest.raises(DataError, match=rf"ids\.jsonl line 2: {message}"):
        build_datasets(_cfg(path), tok, seed=0)


# ------------------------------------------------------------------ detection
@pytest.mark.parametrize(("first", "kind"), [
    ({"messages": CHAT}, "messages"),
    ({"text": " ".join(DOCS)}, "text"),
    ({"input_ids": list(range(1, 40))}, "tokens"),
    ({"instruction": "Say hi", "output": "hi"}, "instruction"),
    ({"instruction": "Say hi", "text": "ignored", "output": "hi"}, "instruction"),
])
def test_kind_is_detected_from_the_first_record_and_logged(tok: Any, tmp_path: Path, first: dict, kind: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [first])
    with caplog.at_level(logging.INFO, logger="kubelora"):
        data = build_datasets(_cfg(path, cutoff_len=64), tok, seed=0)
    assert data.cfg.kind == kind and data.stats["kind"] == kind
    assert f"data.kind not set; detected '{kind}' from the first record of {path}" in caplog.text
    assert ("exact match is off" in caplog.text) == (kind in ("text", "tokens"))


def test_detection_follows_the_first_record_and_checks_the_rest(tok: Any, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "mixed.jsonl", [{"text": "a b c"}, {"instruction": "x", "output": "y"}])
    with pytest.raises(DataError, match=r"mixed\.jsonl line 2: record has no 'text' field; its columns: instruction"):
        build_datasets(_cfg(path), tok, seed=0)


def test_explicit_kind_is_not_second_guessed(tok: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a b c", "messages": CHAT}])
    with caplog.at_level(logging.INFO, logger="kubelora"):
        data = build_datasets(_cfg(path, kind="messages", packing=False), tok, seed=0)
    assert data.cfg.kind == "messages" and "detected" not in caplog.text


def test_field_map_means_instruction_records(tok: Any, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "Say hi", "answer": "hi"}])
    data = build_datasets(_cfg(path, field_map={"instruction": "text", "output": "answer"}), tok, seed=0)
    assert data.cfg.kind == "instruction" and data.eval_prompts == []
