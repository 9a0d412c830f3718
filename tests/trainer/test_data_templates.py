"""Prompt templates: exact texts, the input/no-input variants, field mapping and missing fields."""

from __future__ import annotations

from typing import Any

import pytest
from kubelora_trainer.config import DataConfig
from kubelora_trainer.data import DataError, answer_of, build_datasets, prompt_only, render

from . import smollm2_tokenizer

REC = {"instruction": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3"}


@pytest.fixture(scope="module")
def tok() -> Any:
    return smollm2_tokenizer()


def cfg(**kw: Any) -> DataConfig:
    return DataConfig(path="unused.jsonl", **kw)


def test_alpaca_with_input_is_stanford_wording() -> None:
    prompt, response = render(REC, cfg())
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSort the numbers.\n\n### Input:\n3, 1, 2\n\n### Response:\n"
    )
    assert response == "1, 2, 3"


@pytest.mark.parametrize("no_input", [{"input": ""}, {"input": None}, {"input": "  \n"}, {}])
def test_alpaca_without_input_has_no_input_section(no_input: dict[str, Any]) -> None:
    rec = {"instruction": "What is 2 plus 2?", "output": "4", **no_input}
    prompt, response = render(rec, cfg())
    assert prompt == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nWhat is 2 plus 2?\n\n### Response:\n"
    )
    assert "### Input" not in prompt
    assert response == "4"


def test_input_section_present_exactly_when_input_non_empty() -> None:
    for template in ("alpaca", "alpaca_legacy"):
        with_input, _ = render(REC, cfg(template=template))
        without, _ = render({**REC, "input": ""}, cfg(template=template))
        assert with_input.count("### Input:\n3, 1, 2\n\n") == 1
        assert "Input" not in without


def test_alpaca_legacy_matches_original_alpaca_prompt() -> None:
    # tloen/alpaca-lora alpaca_legacy.json == Stanford Alpaca's PROMPT_DICT: no newline after the header.
    with_input, _ = render(REC, cfg(template="alpaca_legacy"))
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSort the numbers.\n\n### Input:\n3, 1, 2\n\n### Response:"
    )
    without, _ = render({**REC, "input": ""}, cfg(template="alpaca_legacy"))
    assert without == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSort the numbers.\n\n### Response:"
    )


def test_custom_template_with_field_map_and_extra_columns() -> None:
    c = cfg(
        template="custom",
        custom_template="Q: {instruction} [{topic}]\nA: ",
        field_map={"instruction": "question", "output": "answer"},
    )
    rec = {"question": "2+3?", "answer": 5, "topic": "math"}
    assert render(rec, c) == ("Q: 2+3? [math]\nA: ", "5")
    assert prompt_only({"question": "2+3?", "topic": "math"}, c) == "Q: 2+3? [math]\nA: "
    assert answer_of(rec, c) == "5"


def test_chat_template_uses_tokenizer_and_generation_prompt(tok: Any) -> None:
    c = cfg(template="chat")
    prompt, response = render(REC, c, tok)
    expected = tok.apply_chat_template(
        [{"role": "user", "content": "Sort the numbers.\n\n3, 1, 2"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == expected
    assert prompt.endswith("<|im_start|>assistant\n")
    assert response == "1, 2, 3"
    no_input, _ = render({**REC, "input": ""}, c, tok)
    assert "user\nSort the numbers.<|im_end|>" in no_input


def test_chat_template_needs_a_chat_template() -> None:
    class Plain:
        chat_template = None

    with pytest.raises(DataError, match="chat template"):
        render(REC, cfg(template="chat"), Plain())


def test_prompt_only_equals_training_prompt(tok: Any) -> None:
    for template in ("alpaca", "alpaca_legacy", "chat"):
        c = cfg(template=template)
        assert prompt_only({k: v for k, v in REC.items() if k != "output"}, c, tok) == render(REC, c, tok)[0]


def test_missing_fields_are_named_with_existing_columns() -> None:
    c = cfg(field_map={"output": "answer"})
    with pytest.raises(DataError) as err:
        render({"question": "x", "response": "y"}, c)
    msg = str(err.value)
    assert "'instruction'" in msg and "'output' (column 'answer')" in msg
    assert "question, response" in msg
    assert "\n" not in msg


def test_answer_of_none_when_absent() -> None:
    assert answer_of({"instruction": "x"}, cfg()) is None
    assert answer_of({"instruction": "x", "output": 7}, cfg()) == "7"


def test_build_reports_how_many_records_lack_fields(tmp_path: Any, tok: Any) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "answer": "d"}\n')
    c = DataConfig(path=str(p), val_set_size=0)
    with pytest.raises(DataError, match=r"1 of 2 train records cannot be rendered.*'output'.*instruction, answer"):
        build_datasets(c, tok, seed=1)


def test_unknown_field_map_key_is_rejected(tok: Any) -> None:
    with pytest.raises(DataError, match="outptu"):
        build_datasets(cfg(field_map={"outptu": "answer"}), tok, seed=1)
