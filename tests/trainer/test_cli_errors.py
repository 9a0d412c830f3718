"""Bad input: one specific line on stderr, exit code 2, and nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from kubelora_trainer.cli import EXIT_BAD_INPUT, main

from .conftest import tiny_config


def _run(cfg: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["run", str(path), *extra])
    err = capsys.readouterr().err
    return code, err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("kubelora-train: error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def _assert_nothing_published(run_dir: Path) -> None:
    assert not (run_dir / "adapter").exists()
    assert not (run_dir / "summary.json").exists()


@pytest.fixture(autouse=True)
def _termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kubelora_trainer.cli.TERMINATION_LOG", tmp_path / "termination-log")


def test_missing_data_file(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", data={"path": str(tmp_path / "nope.jsonl")})
    code, err = _run(cfg, tmp_path, capsys)
    assert code == EXIT_BAD_INPUT
    assert "nope.jsonl" in _error_line(err) and "not found" in _error_line(err)
    _assert_nothing_published(tmp_path / "run")
    # The same line reaches the Kubernetes termination message.
    assert "nope.jsonl" in (tmp_path / "termination-log").read_text()


def test_malformed_jsonl_names_file_and_line(tiny_model_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{"instruction": oops}\n')
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", data={"path": str(data), "evalPath": None})
    code, err = _run(cfg, tmp_path, capsys)
    line = _error_line(err)
    assert code == EXIT_BAD_INPUT and "bad.jsonl" in line and "line 3" in line


def test_missing_template_fields_are_named(tiny_model_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(8)))
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", data={"path": str(data), "evalPath": None})
    code, err = _run(cfg, tmp_path, capsys)
    line = _error_line(err)
    assert code == EXIT_BAD_INPUT and "instruction" in line and "output" in line and "question" in line


def test_unknown_template(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", data={"template": "vicuna"})
    code, err = _run(cfg, tmp_path, capsys)
    assert code == EXIT_BAD_INPUT and "data.template" in _error_line(err) and "alpaca" in _error_line(err)


def test_unknown_target_module_lists_the_real_ones(tiny_model_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", lora={"targetModules": ["q_proj", "query_key_value"]})
    code, err = _run(cfg, tmp_path, capsys)
    line = _error_line(err)
    assert code == EXIT_BAD_INPUT and "query_key_value" in line
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in line
    _assert_nothing_published(tmp_path / "run")


def test_cutoff_too_small_for_any_sample(tiny_model_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", data={"cutoffLen": 8, "dropTruncated": True})
    code, err = _run(cfg, tmp_path, capsys)
    assert code == EXIT_BAD_INPUT and "too small" in _error_line(err)


def test_empty_dataset_after_filtering(tiny_model_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("")
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", data={"path": str(data), "evalPath": None})
    code, err = _run(cfg, tmp_path, capsys)
    assert code == EXIT_BAD_INPUT and ("empty" in _error_line(err) or "no records" in _error_line(err))


def test_missing_gguf_and_model_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, expected in ((str(tmp_path / "model.gguf"), "GGUF file not found"),
                           (str(tmp_path / "no-such-dir") + "/", "model path not found")):
        cfg = tiny_config(Path(name), tmp_path / "run")
        cfg["model"]["nameOrPath"] = name
        code, err = _run(cfg, tmp_path, capsys)
        assert code == EXIT_BAD_INPUT and expected in _error_line(err), err


def test_unknown_config_key(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", training={"learningrate": 1e-3})
    code, err = _run(cfg, tmp_path, capsys)
    assert code == EXIT_BAD_INPUT and "training.learningrate" in _error_line(err)


def test_finished_adapter_is_not_overwritten_unless_asked(tiny_model_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, run_dir, training={"maxSteps": 2},
                      evaluation={"exactMatch": False, "before": False})
    assert _run(cfg, tmp_path, capsys)[0] == 0
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    first = weights.read_bytes()
    code, err = _run(cfg, tmp_path, capsys)
    assert code == EXIT_BAD_INPUT and "already holds a finished adapter" in _error_line(err)
    assert weights.read_bytes() == first
    code, _ = _run(cfg, tmp_path, capsys, "--set", "output.overwrite=true", "--set", "training.seed=99")
    assert code == 0 and weights.read_bytes() != first


def test_success_leaves_the_artifact_json_for_the_operator(tiny_model_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", training={"maxSteps": 1},
                      evaluation={"exactMatch": False, "before": False})
    assert _run(cfg, tmp_path, capsys)[0] == 0
    message = json.loads((tmp_path / "termination-log").read_text())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert message["artifact"] == {"sha256": summary["adapter"]["sha256"],
                                   "sizeBytes": summary["adapter"]["size_bytes"]}
    # The final gauges ride along (a run shorter than one progress scrape still reports its step and loss).
    assert message["metrics"]["kubelora_step"] == 1 and message["metrics"]["kubelora_total_steps"] == 1
    assert "kubelora_train_loss" in message["metrics"]


def test_a_run_that_diverges_stops_with_one_line_and_publishes_nothing(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second update makes the adapter non-finite (as a too-high learning rate does): the run must
    # stop there, before that step's checkpoint, not train on and publish NaN weights.
    from kubelora_trainer.engine import PlainEngine

    plain_step = PlainEngine.step
    calls: list[int] = []

    def step(self: PlainEngine) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            for p in self.model.parameters():
                if p.requires_grad and p.grad is not None:
                    p.grad.fill_(float("inf"))
        return plain_step(self)

    monkeypatch.setattr(PlainEngine, "step", step)
    run_dir = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, run_dir, training={"maxSteps": 4, "saveSteps": 1, "learningRate": 0.05})
    code, err = _run(cfg, tmp_path, capsys)
    line = _error_line(err)
    assert code == EXIT_BAD_INPUT and len(calls) == 2
    assert "training diverged at step 2" in line and "training.learningRate (now 0.05)" in line
    _assert_nothing_published(run_dir)
    steps = sorted(int(p.name.split("-")[-1]) for p in run_dir.rglob("step-*") if p.is_dir())
    assert steps == [1]  # the finite one; none after the non-finite update
