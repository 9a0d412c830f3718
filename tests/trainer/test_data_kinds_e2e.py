"""One whole tiny-model run per new data.kind (messages, text, tokens): it trains and writes summary.json.

The records are the bundled sample tasks rewritten as each kind, so the runs differ only in the
record format. Exact match is scored for messages (the last assistant turn is the answer) and is
off, without an error, for text and tokens, whose evaluation is eval loss only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubelora_trainer.cli import EXIT_BAD_INPUT, main
from kubelora_trainer.config import parse_config
from kubelora_trainer.recipe import LoRAFineTuneRecipe

from . import smollm2_tokenizer
from .conftest import SAMPLE, tiny_config


def _samples(name: str, n: int) -> list[dict[str, str]]:
    return [json.loads(line) for line in (SAMPLE / name).read_text().splitlines()[:n]]


def _question(rec: dict[str, str]) -> str:
    return f"{rec['instruction']}\n\n{rec['input']}" if rec["input"] else rec["instruction"]


def _as_kind(kind: str, rec: dict[str, str]) -> dict[str, Any]:
    if kind == "messages":
        return {"messages": [{"role": "user", "content": _question(rec)},
                             {"role": "assistant", "content": rec["output"]}]}
    text = f"{_question(rec)}\nAnswer: {rec['output']}"
    if kind == "text":
        return {"text": text}
    ids = smollm2_tokenizer()(text, add_special_tokens=False)["input_ids"]
    return {"input_ids": ids, "labels": [-100] * (len(ids) // 2) + ids[len(ids) // 2 :]}


def _write(path: Path, kind: str, name: str, n: int) -> str:
    path.write_text("".join(json.dumps(_as_kind(kind, r)) + "\n" for r in _samples(name, n)))
    return str(path)


@pytest.mark.parametrize("kind", ["messages", "text", "tokens"])
def test_each_kind_trains_and_writes_a_summary(kind: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    data = {"path": _write(tmp_path / "train.jsonl", kind, "train.jsonl", 256),
            "evalPath": _write(tmp_path / "heldout.jsonl", kind, "heldout.jsonl", 16)}
    cfg = parse_config(tiny_config(tiny_model_dir, tmp_path / "run", data=data))  # data.kind unset: detected
    summary = LoRAFineTuneRecipe(cfg).run()
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == 6 and on_disk["train_tokens"] > 0
    assert on_disk["data"]["kind"] == kind
    assert on_disk["eval_loss_after"] == on_disk["eval_loss_after"] and on_disk["eval_loss_after"] > 0  # not NaN
    if kind == "messages":
        assert on_disk["exact_match_samples"] == 4 and on_disk["exact_match_after"] is not None
    else:
        assert on_disk["exact_match_samples"] == 0 and on_disk["exact_match_after"] is None
    if kind == "text":
        assert on_disk["data"]["train_rows"]["fill"] == 1.0  # full 128-token blocks only


def test_bad_chat_record_is_one_line_and_exit_code_2(tiny_model_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kubelora_trainer.cli.TERMINATION_LOG", tmp_path / "termination-log")
    data = tmp_path / "chat.jsonl"
    _write(data, "messages", "train.jsonl", 4)
    with data.open("a") as fh:
        fh.write(json.dumps({"messages": [{"role": "human", "content": "hi"}]}) + "\n")
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", data={"path": str(data), "evalPath": None, "kind": "messages"})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code = main(["run", str(tmp_path / "cfg.yaml")])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("kubelora-train: error:")]
    assert code == EXIT_BAD_INPUT and len(lines) == 1
    assert "chat.jsonl line 5: messages[0].role is 'human'" in lines[0]
    assert not (tmp_path / "run" / "summary.json").exists()
