"""Tokenization and loss masks: prompt masked, response and EOS labelled, cutoff rules."""

from __future__ import annotations

from typing import Any

import pytest
from kubelora_trainer.config import DataConfig
from kubelora_trainer.data import (
    IGNORE_INDEX,
    DataError,
    build_datasets,
    collate,
    encode_prompt,
    no_pack,
    render,
    tokenize_example,
    tokenize_examples,
)

from . import smollm2_tokenizer

REC = {"instruction": "Reverse the words.", "input": "red blue green", "output": "green blue red"}


@pytest.fixture(scope="module")
def tok() -> Any:
    return smollm2_tokenizer()


def cfg(**kw: Any) -> DataConfig:
    return DataConfig(path="unused.jsonl", **kw)


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_labels_mask_exactly_the_prompt(tok: Any, template: str) -> None:
    c = cfg(template=template)
    prompt, response = render(REC, c, tok)
    ex = tokenize_example(prompt, response, tok, c)
    assert ex is not None
    p_ids = encode_prompt(prompt, tok, c)
    r_ids = tok(response, add_special_tokens=False)["input_ids"]
    n = len(p_ids)
    assert ex.input_ids == p_ids + r_ids + [tok.eos_token_id]
    assert ex.labels[:n] == [IGNORE_INDEX] * n
    assert ex.labels[n:] == r_ids + [tok.eos_token_id]  # EOS is labelled: the model learns to stop
    assert ex.num_label_tokens == len(r_ids) + 1


def test_chat_prompt_has_no_doubled_special_tokens(tok: Any) -> None:
    c = cfg(template="chat")
    prompt, _ = render(REC, c, tok)
    ids = encode_prompt(prompt, tok, c)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(ids[0]) == 3  # system, user, assistant headers and nothing more


def test_train_on_inputs_labels_everything_but_the_first_token(tok: Any) -> None:
    ex = tokenize_example(*render(REC, cfg()), tok, cfg(train_on_inputs=True))
    assert ex is not None
    assert ex.labels[0] == IGNORE_INDEX
    assert ex.labels[1:] == ex.input_ids[1:]


def test_no_eos_when_disabled(tok: Any) -> None:
    prompt, response = render(REC, cfg())
    ex = tokenize_example(prompt, response, tok, cfg(add_eos=False))
    assert ex is not None
    assert ex.input_ids[-1] != tok.eos_token_id


def test_batch_equals_single(tok: Any) -> None:
    c = cfg()
    recs = [{"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1)} for i in range(50)]
    pairs = [render(r, c) for r in recs]
    res = tokenize_examples(pairs, tok, c)
    assert res.counts() == {"kept": 50, "truncated": 0, "dropped": 0, "dropped_over_cutoff_len": 0,
                           "dropped_no_label_tokens": 0}
    for pair, ex in zip(pairs, res.examples, strict=True):
        single = tokenize_example(*pair, tok, c)
        assert single is not None and single.input_ids == ex.input_ids and single.labels == ex.labels


def test_truncation_cuts_the_end_and_counts(tok: Any) -> None:
    prompt, response = render({**REC, "output": "word " * 40}, cfg())
    full = tokenize_example(prompt, response, tok, cfg())
    assert full is not None
    cut = len(full) - 10
    c = cfg(cutoff_len=cut)
    res = tokenize_examples([(prompt, response)], tok, c)
    assert res.counts() == {"kept": 1, "truncated": 1, "dropped": 0, "dropped_over_cutoff_len": 0,
                           "dropped_no_label_tokens": 0}
    ex = res.examples[0]
    assert ex.truncated and ex.input_ids == full.input_ids[:cut] and ex.labels == full.labels[:cut]
    dropped = tokenize_examples([(prompt, response), render(REC, cfg())], tok, cfg(cutoff_len=cut, drop_truncated=True))
    assert dropped.counts() == {"kept": 1, "truncated": 0, "dropped": 1, "dropped_over_cutoff_len": 1,
                           "dropped_no_label_tokens": 0}


def test_sample_whose_cutoff_removes_all_labels_is_dropped(tok: Any) -> None:
    prompt, response = render(REC, cfg())
    n_prompt = len(encode_prompt(prompt, tok, cfg()))
    short = render({"instruction": "Hi", "output": "Yo"}, cfg())
    res = tokenize_examples([(prompt, response), short], tok, cfg(cutoff_len=n_prompt))
    assert res.counts() == {"kept": 1, "truncated": 0, "dropped": 1, "dropped_over_cutoff_len": 1,
                           "dropped_no_label_tokens": 0}
    assert res.source_index == [1]


def test_cutoff_too_small_for_any_sample(tok: Any) -> None:
    pairs = [render(REC, cfg()), render({"instruction": "Hi", "output": "Yo"}, cfg())]
    shortest = min(len(tokenize_example(*p, tok, cfg()) or []) for p in pairs)
    with pytest.raises(
        DataError, match=rf"^cutoff_len 8 is too small for any sample \(shortest sample has {shortest} tokens\)$"
    ):
        tokenize_examples(pairs, tok, cfg(cutoff_len=8))


def test_cutoff_too_small_through_build(tmp_path: Any, tok: Any) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "Say hello to everybody in the room.", "output": "hello"}\n' * 3)
    with pytest.raises(DataError, match="cutoff_len 8 is too small for any sample"):
        build_datasets(DataConfig(path=str(p), cutoff_len=8, val_set_size=0), tok, seed=0)


def test_empty_after_filtering(tmp_path: Any, tok: Any) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": ""}\n{"instruction": "b", "output": ""}\n')
    with pytest.raises(DataError, match="^empty dataset after filtering"):
        build_datasets(DataConfig(path=str(p), add_eos=False, val_set_size=0), tok, seed=0)


def test_padding_equal_to_eos_is_masked_by_position(tok: Any) -> None:
    assert tok.pad_token_id == tok.eos_token_id  # the case this guards
    c = cfg()
    short = tokenize_example(*render({"instruction": "Hi", "output": "Yo"}, c), tok, c)
    long = tokenize_example(*render(REC, c), tok, c)
    assert short is not None and long is not None
    batch = collate(no_pack([short, long]), pad_token_id=tok.pad_token_id)
    n = len(short)
    assert batch["labels"][0, n - 1].item() == tok.eos_token_id  # real EOS keeps its label
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()  # padding (same id) does not
    assert (batch["input_ids"][0, n:] == tok.eos_token_id).all()


class BosEosTokenizer:
    """A tokenizer that wraps every text in BOS ... EOS, like some sentencepiece setups."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text: Any, add_special_tokens: bool = True, return_attention_mask: bool = True) -> dict:
        def enc(t: str) -> list[int]:
            ids = [10 + ord(ch) for ch in t]
            return [1, *ids, 2] if add_special_tokens else ids

        return {"input_ids": enc(text) if isinstance(text, str) else [enc(t) for t in text]}


def test_prompt_gets_bos_but_no_eos_between_prompt_and_response() -> None:
    c = cfg()
    ex = tokenize_example("ab", "c", BosEosTokenizer(), c)
    assert ex is not None
    assert ex.input_ids == [1, 10 + ord("a"), 10 + ord("b"), 10 + ord("c"), 2]
    assert ex.labels == [IGNORE_INDEX] * 3 + [10 + ord("c"), 2]
