"""`kubelora-train eval`, `generate` and `merge` on a finished run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kubelora_trainer.cli import main

from .conftest import tiny_config


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("cli")
    cfg = tiny_config(tiny_model_dir, base / "run", training={"maxSteps": 2},
                      evaluation={"exactMatch": False, "before": False})
    (base / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(base / "cfg.yaml")]) == 0
    return base / "run"


def test_eval_reports_loss_and_exact_match(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["eval", str(run_dir / "adapter"), "--set", "evaluation.maxExactMatchSamples=3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == 3 and out["eval_loss"] > 0 and 0 <= out["exact_match"] <= 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert out["eval_loss"] == pytest.approx(summary["eval_loss_after"], rel=1e-4)


def test_generate_answers_one_instruction(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["generate", str(run_dir / "adapter"), "--instruction", "Sort these numbers.", "--input", "3, 1",
                 "--max-new-tokens", "5"]) == 0
    # A random tiny model says nothing useful; the point is the full load-adapter-generate path.
    assert capsys.readouterr().out.endswith("\n")


def test_merge_writes_a_plain_transformers_model(run_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    assert main(["merge", str(run_dir / "adapter"), "--output", str(tmp_path / "m")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "merged")
    assert not hasattr(model, "peft_config")
