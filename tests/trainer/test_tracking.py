"""Experiment tracking: a real tiny training run writes TensorBoard event files whose scalars are the
log history's (read back with TensorBoard's own EventAccumulator); a resumed session purges the
events past its checkpoint; MLflow (when the extra is installed) gets the same metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from kubelora_trainer.config import MlflowConfig, TrackingConfig, parse_config
from kubelora_trainer.recipe import LoRAFineTuneRecipe
from kubelora_trainer.tracking import TENSORBOARD_DIR, Trackers, scalars

from .conftest import tiny_config

TAGS = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss", "eval/exact_match"}


def read_events(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tiny_run_writes_tensorboard_scalars_equal_to_the_log_history(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = parse_config(tiny_config(tiny_model_dir, run_dir, training={"evalSteps": 3}))
    recipe = LoRAFineTuneRecipe(cfg)
    try:
        recipe.run()
    finally:
        recipe.close()

    events = read_events(run_dir)
    assert set(events) >= TAGS, sorted(events)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for tag in TAGS:
        kind, key = tag.split("/")
        expected = [(r["step"], r[key]) for r in history if r["kind"] == kind and r.get(key) is not None]
        assert [s for s, _ in events[tag]] == [s for s, _ in expected], tag
        for (_, got), (_, want) in zip(events[tag], expected, strict=True):
            assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6), (tag, got, want)
    assert [s for s, _ in events["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in events["eval/loss"]] == [0, 3, 6]  # before, evalSteps, after
    assert [s for s, _ in events["eval/exact_match"]] == [0, 6]  # before and after training
    # The files people read stay.
    assert (run_dir / "metrics.csv").is_file() and (run_dir / "loss.png").is_file()


def test_tensorboard_off_writes_no_event_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    trackers = Trackers(TrackingConfig(tensorboard=False), tmp_path)
    trackers.log({"step": 1, "kind": "train", "loss": 1.0})
    trackers.close()
    assert not (tmp_path / TENSORBOARD_DIR).exists()


def test_resumed_session_purges_events_past_its_checkpoint(tmp_path: Path) -> None:
    first = Trackers(TrackingConfig(), tmp_path)
    for step in range(1, 7):  # killed after step 6, newest checkpoint at step 3
        first.log({"step": step, "kind": "train", "loss": float(step)})
    first.close(failed=True)
    second = Trackers(TrackingConfig(), tmp_path)
    second.resumed_at(3)
    for step in (4, 5):
        second.log({"step": step, "kind": "train", "loss": 10.0 * step})
    second.close()
    assert read_events(tmp_path)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


def test_scalars_skip_missing_and_non_finite_values() -> None:
    got = scalars({"step": 2, "kind": "eval", "loss": float("nan"), "exact_match": None, "lr": 1e-3, "tokens": 9})
    assert got == {"eval/lr": 1e-3}


def test_mlflow_file_store_gets_the_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow", reason="the optional `mlflow` extra is not installed")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store in maintenance mode
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    trackers = Trackers(TrackingConfig(tensorboard=False, mlflow=MlflowConfig(tracking_uri=uri, experiment="t")),
                        tmp_path / "run-a")
    trackers.log({"step": 1, "kind": "train", "loss": 2.5, "lr": 1e-3})
    trackers.log({"step": 2, "kind": "eval", "loss": 2.0, "exact_match": 0.5})
    trackers.close()
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("t").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(1, 2.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/exact_match")] == [(2, 0.5)]
