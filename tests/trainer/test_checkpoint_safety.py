"""Work is not lost, mixed up or misreported (issue 9, items 4, 6 and 8).

* Item 4: checkpoints are written every `saveMinutes` of training by default (no `saveSteps`
  needed), decided on rank 0's clock and agreed by every rank in the one per-step collective.
* Item 6: `resume` refuses a checkpoint trained with other settings, naming each, unless
  `training.resumeAllowChanged` names it; then the new values are the ones that train.
* Item 8: an empty `evalPath` is refused up front; no JSON file the trainer writes holds NaN.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from kubelora_trainer import checkpoint as ckpt
from kubelora_trainer.cli import EXIT_BAD_INPUT, main
from kubelora_trainer.config import parse_config
from kubelora_trainer.distributed import WorldView
from kubelora_trainer.metrics import MetricsLog
from kubelora_trainer.recipe import LoRAFineTuneRecipe
from kubelora_trainer.rundir import OWNER_FILE, RunDirError

from .conftest import tiny_config

QUICK = {"exactMatch": False, "before": False}


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kubelora_trainer.cli.TERMINATION_LOG", tmp_path / "termination-log")
    monkeypatch.delenv("KUBELORA_RUN_ID", raising=False)


def _strict_loads(text: str) -> Any:
    """json.loads that fails on NaN/Infinity (which Python's json accepts but JSON does not)."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def _cli(cfg: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run `kubelora-train run` on `cfg`: (exit code, the one error line or all of stderr)."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["run", str(path)])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("kubelora-train: error:")]
    assert len(lines) <= 1, captured.err[-2000:]
    return code, lines[0] if lines else captured.err + captured.out


def _steps(run_dir: Path) -> list[int]:
    return [c.step for c in ckpt.list_complete(run_dir)]


class FakeClock:
    """A clock that advances `tick` seconds each time it is read."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


# ---------------------------------------------------------------------- item 4: periodic checkpoints
def test_checkpoints_every_ten_minutes_by_default() -> None:
    t = parse_config({"data": {"path": "x.jsonl"}}).training
    assert t.save_minutes == 10 and t.save_steps is None and t.save_total_limit == 3


def test_cadence_saves_by_steps_by_time_at_the_end_and_on_stop() -> None:
    clock = FakeClock(0.0)
    cadence = ckpt.SaveCadence(save_steps=5, save_minutes=2, clock=clock)
    one, cpu = WorldView(), torch.device("cpu")
    assert cadence.decide(1, False, False, one, cpu) == ckpt.StepDecision(save=False, stop=False)
    assert cadence.decide(5, False, False, one, cpu).save  # by steps
    clock.now = 119.0
    assert not cadence.decide(6, False, False, one, cpu).save
    clock.now = 120.0
    assert cadence.decide(7, False, False, one, cpu).save  # by time
    cadence.saved()  # the interval counts from the last checkpoint
    clock.now = 200.0
    assert not cadence.decide(8, False, False, one, cpu).save
    assert cadence.decide(9, True, False, one, cpu).save  # the last step
    assert cadence.decide(8, False, True, one, cpu) == ckpt.StepDecision(save=True, stop=True)
    never = ckpt.SaveCadence(save_steps=None, save_minutes=None, clock=FakeClock(1e9))
    assert not never.decide(3, False, False, one, cpu).save


def test_a_tiny_run_checkpoints_by_time_without_save_steps(tiny_model_dir: Path, tmp_path: Path) -> None:
    """cffc930 wrote only the final checkpoint unless saveSteps was set: a crash lost every step."""
    run_dir = tmp_path / "run"
    cfg = parse_config(tiny_config(tiny_model_dir, run_dir, evaluation=QUICK,
                                   training={"maxSteps": 5, "saveMinutes": 1.5, "saveTotalLimit": 10}))
    recipe = LoRAFineTuneRecipe(cfg)
    recipe.save_clock = FakeClock(60.0)  # type: ignore[method-assign]  # a minute per reading: due every other step
    recipe.run()
    assert _steps(run_dir) == [2, 4, 5]
    state = json.loads((run_dir / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["settings"]["fields"]["training.learningRate"] == 5e-3 and len(state["settings"]["sha256"]) == 64


def _rank(rank: int, port: int, out: dict[int, list[tuple[bool, bool]]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        world, cpu = WorldView(rank=rank, world_size=2), torch.device("cpu")
        # Rank 0's clock says "due" at once; rank 1's never does.
        cadence = ckpt.SaveCadence(None, 1.0, clock=FakeClock(120.0 if rank == 0 else 0.0))
        decisions = [cadence.decide(1, False, False, world, cpu)]
        quiet = ckpt.SaveCadence(None, None)
        decisions.append(quiet.decide(2, False, rank == 1, world, cpu))  # SIGTERM reached rank 1 only
        decisions.append(quiet.decide(3, False, False, world, cpu))
        out[rank] = [(d.save, d.stop) for d in decisions]
    finally:
        dist.destroy_process_group()


def test_every_rank_takes_rank_zeros_time_decision_and_any_ranks_stop() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(port, out), nprocs=2, join=True)
    assert out[0] == out[1] == [(True, False), (True, True), (False, False)]


# ---------------------------------------------------------------------- item 6: resume only with the same settings
def _interrupted(tiny_model_dir: Path, run_dir: Path, **training: Any) -> Path:
    """A run of 4 steps that stopped after its step-2 checkpoint: resume has work to continue."""
    cfg = parse_config(tiny_config(tiny_model_dir, run_dir, evaluation=QUICK,
                                   training={"maxSteps": 4, "saveSteps": 2, **training}))
    recipe = LoRAFineTuneRecipe(cfg)
    real_save = recipe.save_checkpoint

    def save_then_die(step: int, tokens: int) -> None:
        real_save(step, tokens)
        raise RuntimeError("killed")

    recipe.save_checkpoint = save_then_die  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="killed"):
        recipe.run()
    assert _steps(run_dir) == [2]
    return run_dir / "checkpoints" / "step-000002"


def test_resume_with_a_changed_learning_rate_is_refused_naming_it(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """cffc930 resumed silently: the checkpoint's schedule went on, the new lr was reported."""
    checkpoint = _interrupted(tiny_model_dir, tmp_path / "first")
    second = tmp_path / "second"
    cfg = tiny_config(tiny_model_dir, second, evaluation=QUICK,
                      training={"maxSteps": 4, "learningRate": 1e-3, "resume": str(checkpoint)},
                      lora={"alpha": 32})
    code, line = _cli(cfg, tmp_path, capsys)
    assert code == EXIT_BAD_INPUT
    assert "training.learningRate 0.001 != 0.005 in checkpoint" in line
    assert "lora.alpha 32.0 != 8.0 in checkpoint" in line
    assert "resumeAllowChanged: [lora.alpha, training.learningRate]" in line
    assert not second.exists()  # refused before anything was written


def test_a_run_dir_without_owner_file_still_refuses_other_settings(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The checkpoint itself carries its settings: a lost (or removed) owner file does not open the door."""
    run_dir = tmp_path / "run"
    _interrupted(tiny_model_dir, run_dir)
    (run_dir / OWNER_FILE).unlink()
    cfg = parse_config(tiny_config(tiny_model_dir, run_dir, evaluation=QUICK,
                                   training={"maxSteps": 4, "warmupSteps": 1}))
    with pytest.raises(RunDirError, match=r"training.warmupSteps 1 != 0 in checkpoint"):
        LoRAFineTuneRecipe(cfg).run()
    assert _steps(run_dir) == [2]


def _lrs(run_dir: Path) -> dict[int, float]:
    rows = [_strict_loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in rows if r["kind"] == "train"}


def test_allowed_changes_resume_and_the_new_values_train(tiny_model_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    _interrupted(tiny_model_dir, run_dir, lrScheduler="constant")
    changed = {"maxSteps": 4, "saveSteps": 2, "lrScheduler": "constant", "learningRate": 1e-3}
    # Through the run dir's owner check as well: without the allowance both refuse.
    code, line = _cli(tiny_config(tiny_model_dir, run_dir, evaluation=QUICK, training=changed), tmp_path, capsys)
    assert code == EXIT_BAD_INPUT and "training.learningRate" in line and "resumeAllowChanged" in line
    allowed = {**changed, "resumeAllowChanged": ["training.learningRate"]}
    with caplog.at_level(logging.WARNING, logger="kubelora.trainer"):
        code, out = _cli(tiny_config(tiny_model_dir, run_dir, evaluation=QUICK, training=allowed), tmp_path, capsys)
    assert code == 0, out
    assert "training.learningRate 0.001 != 0.005 in checkpoint" in caplog.text
    summary = _strict_loads((run_dir / "summary.json").read_text())
    assert summary["steps_this_session"] == 2
    lrs = _lrs(run_dir)
    assert lrs[1] == lrs[2] == pytest.approx(5e-3) and lrs[3] == lrs[4] == pytest.approx(1e-3)


def test_an_allowance_must_name_a_recorded_setting(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _interrupted(tiny_model_dir, run_dir)
    cfg = parse_config(tiny_config(tiny_model_dir, run_dir, evaluation=QUICK,
                                   training={"maxSteps": 4, "resumeAllowChanged": ["training.learnRate"]}))
    with pytest.raises(RunDirError, match="names training.learnRate: not a setting a checkpoint records"):
        LoRAFineTuneRecipe(cfg).run()


def test_a_checkpoint_from_before_settings_records_still_resumes(tiny_model_dir: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    checkpoint = _interrupted(tiny_model_dir, tmp_path / "first")
    state_file = checkpoint / ckpt.STATE_FILE
    old_state = json.loads(state_file.read_text())
    del old_state["settings"]
    state_file.write_text(json.dumps(old_state))
    cfg = parse_config(tiny_config(tiny_model_dir, tmp_path / "second", evaluation=QUICK,
                                   training={"maxSteps": 4, "resume": str(checkpoint)}))
    with caplog.at_level(logging.WARNING, logger="kubelora.trainer"):
        assert LoRAFineTuneRecipe(cfg).run()["steps_this_session"] == 2
    assert "before checkpoints recorded their settings" in caplog.text


def test_settings_added_by_a_later_trainer_do_not_block_a_resume() -> None:
    old = ckpt.settings_record({"training": {"learningRate": 1e-3}})
    new = ckpt.settings_record({"training": {"learningRate": 1e-3, "newKnob": 1}})
    assert old["sha256"] != new["sha256"] and ckpt.changed_settings(old, new) == {}
    assert ckpt.changed_settings(old, ckpt.settings_record({"training": {"learningRate": 2e-3}})) == {
        "training.learningRate": (2e-3, 1e-3)}


# ---------------------------------------------------------------------- item 8: empty eval data, no NaN in JSON
def test_an_empty_eval_file_is_refused_up_front(tiny_model_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """cffc930 trained and reported "eval_loss_after": NaN."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    run_dir = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, run_dir, evaluation=QUICK)
    cfg["data"]["evalPath"] = str(empty)
    code, line = _cli(cfg, tmp_path, capsys)
    assert code == EXIT_BAD_INPUT
    assert f"data.evalPath {empty} has no records" in line
    assert not run_dir.exists()


def test_a_run_without_eval_rows_writes_null_not_nan(tiny_model_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """No held-out rows (valSetSize 0): eval loss is not a number, and every JSON file stays JSON."""
    run_dir = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, run_dir, training={"maxSteps": 2},
                      evaluation={"exactMatch": False, "before": True})
    del cfg["data"]["evalPath"]
    cfg["data"]["valSetSize"] = 0
    code, out = _cli(cfg, tmp_path, capsys)
    assert code == 0, out
    summary = _strict_loads((run_dir / "summary.json").read_text())
    assert summary["eval_loss_before"] is None and summary["eval_loss_after"] is None
    assert _strict_loads((run_dir / "baseline.json").read_text())["eval_loss"] is None
    evals = [_strict_loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in evals if r["kind"] == "eval"] == [None, None]
    printed = out[out.index("{"): out.rindex("}") + 1]  # the CLI's result on stdout
    assert _strict_loads(printed)["eval_loss_after"] is None


def test_a_diverged_loss_is_logged_as_null(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, enabled=True)
    log.append({"step": 1, "kind": "train", "loss": math.nan, "grad_norm": math.inf})
    log.append({"step": 2, "kind": "train", "loss": 1.5, "grad_norm": -math.inf})
    log.truncate_after(2)
    rows = [_strict_loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "kind": "train", "loss": None, "grad_norm": None},
                    {"step": 2, "kind": "train", "loss": 1.5, "grad_norm": None}]
    ckpt.write_json_atomic(tmp_path / "x.json", {"a": [math.nan, 1.0], "b": {"c": math.inf}})
    assert _strict_loads((tmp_path / "x.json").read_text()) == {"a": [None, 1.0], "b": {"c": None}}
