"""A run directory belongs to one run (issue 9, items 2, 3, 5, 10): owner, exclusive claim, safe
overwrite, and a failed pre-flight that leaves the directory as it was found.

Real runs of the tiny model through the CLI (exit codes, the one error line) and, for the
concurrency cases, real second processes holding the directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from kubelora_trainer.cli import EXIT_BAD_INPUT, main
from kubelora_trainer.config import parse_config
from kubelora_trainer.recipe import LoRAFineTuneRecipe
from kubelora_trainer.rundir import (
    COMPILE_CACHE_DIR,
    LOCK_FILE,
    OWNER_FILE,
    PREVIOUS_DIR,
    RunDirClaim,
    RunDirError,
    Verdict,
    judge,
    result_fields,
)

from .conftest import tiny_config

QUICK = {"evaluation": {"exactMatch": False, "before": False}}


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kubelora_trainer.cli.TERMINATION_LOG", tmp_path / "termination-log")
    monkeypatch.delenv("KUBELORA_RUN_ID", raising=False)


def _cfg(tiny_model_dir: Path, run_dir: Path, **sections: dict) -> dict:
    return tiny_config(tiny_model_dir, run_dir, **{"training": {"maxSteps": 2}, **QUICK, **sections})


def _run(cfg: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], *sets: str) -> tuple[int, str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["run", str(path), *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kubelora-train: error:")]
    assert len(lines) <= 1, err[-2000:]
    return code, lines[0] if lines else err


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _broken_data(tmp_path: Path) -> str:
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    return str(bad)


# ---------------------------------------------------------------------- item 10: pre-flight writes nothing
def test_failed_preflight_leaves_a_new_dir_absent(tiny_model_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "new" / "run"
    cfg = _cfg(tiny_model_dir, run_dir, data={"path": _broken_data(tmp_path), "evalPath": None})
    code, line = _run(cfg, tmp_path, capsys)
    assert code == EXIT_BAD_INPUT and "broken.jsonl" in line
    assert not (tmp_path / "new").exists()  # cffc930: config.yaml and run_id were left behind


@pytest.mark.parametrize("bad", ["data", "lora_target", "batch"])
def test_failed_preflight_leaves_an_existing_dir_as_found(tiny_model_dir: Path, tmp_path: Path, bad: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    sections = {
        "data": {"data": {"path": _broken_data(tmp_path), "evalPath": None}},
        "lora_target": {"lora": {"targetModules": ["query_key_value"]}},
        "batch": {"training": {"maxSteps": 2, "microBatchSize": 4096}},  # fewer rows than one batch
    }[bad]
    code, _ = _run(_cfg(tiny_model_dir, run_dir, **sections), tmp_path, capsys)
    assert code == EXIT_BAD_INPUT
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------- item 5: overwrite is safe
def test_overwrite_keeps_the_finished_run_when_the_new_one_fails_preflight(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, run_dir)
    assert _run(cfg, tmp_path, capsys)[0] == 0
    before = _snapshot(run_dir)
    assert "adapter/adapter_model.safetensors" in before and "summary.json" in before
    broken = _cfg(tiny_model_dir, run_dir, data={"path": _broken_data(tmp_path), "evalPath": None},
                  output={"dir": str(run_dir), "overwrite": True})
    code, line = _run(broken, tmp_path, capsys)
    assert code == EXIT_BAD_INPUT and "broken.jsonl" in line
    assert _snapshot(run_dir) == before  # cffc930: adapter and summary deleted, only config.yaml/run_id left


def test_overwrite_puts_the_finished_run_back_when_resume_refuses(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The replaced run is already set aside when resume fails: it moves back, untouched."""
    run_dir = tmp_path / "run"
    assert _run(_cfg(tiny_model_dir, run_dir), tmp_path, capsys)[0] == 0
    before = _snapshot(run_dir)
    code, line = _run(_cfg(tiny_model_dir, run_dir), tmp_path, capsys,
                      "output.overwrite=true", f"training.resume={tmp_path / 'no-checkpoint'}")
    assert code == EXIT_BAD_INPUT and "not a complete checkpoint" in line
    assert _snapshot(run_dir) == before and not (run_dir / PREVIOUS_DIR).exists()


def test_replaced_run_is_kept_until_the_new_one_has_finished(tiny_model_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    LoRAFineTuneRecipe(parse_config(_cfg(tiny_model_dir, run_dir))).run()
    old = _snapshot(run_dir)
    kernel = run_dir / COMPILE_CACHE_DIR / "rank-0" / "kernel.py"  # what a compiled run leaves (compile.py)
    kernel.parent.mkdir(parents=True)
    kernel.write_text("# compiled")
    new_cfg = _cfg(tiny_model_dir, run_dir, training={"maxSteps": 4, "seed": 99, "saveSteps": 2},
                   output={"dir": str(run_dir), "overwrite": True})

    real_save = LoRAFineTuneRecipe.save_checkpoint

    def crash_after_first_checkpoint(self: LoRAFineTuneRecipe, step: int, tokens: int) -> None:
        real_save(self, step, tokens)
        raise RuntimeError("node lost")

    monkeypatch.setattr(LoRAFineTuneRecipe, "save_checkpoint", crash_after_first_checkpoint)
    with pytest.raises(RuntimeError, match="node lost"):
        LoRAFineTuneRecipe(parse_config(new_cfg)).run()
    # Training had started: the old run waits, whole, in .previous; the new one owns the dir.
    assert _snapshot(run_dir / PREVIOUS_DIR) == old
    assert kernel.read_text() == "# compiled"  # compiled code is keyed by what it compiled: it stays
    assert not (run_dir / "adapter").exists() and not (run_dir / LOCK_FILE).exists()
    assert json.loads((run_dir / OWNER_FILE).read_text())["fields"]["training"]["seed"] == 99

    monkeypatch.setattr(LoRAFineTuneRecipe, "save_checkpoint", real_save)
    summary = LoRAFineTuneRecipe(parse_config(new_cfg)).run()
    assert summary["steps_this_session"] == 2  # resumed its own checkpoint, not the replaced run's
    assert not (run_dir / PREVIOUS_DIR).exists()
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() != old["adapter/adapter_model.safetensors"]


# ---------------------------------------------------------------------- items 2-3: one owner per dir
def test_another_run_id_never_continues_or_replaces_the_dir(tiny_model_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    monkeypatch.setenv("KUBELORA_RUN_ID", "uid-a")
    assert _run(_cfg(tiny_model_dir, run_dir), tmp_path, capsys)[0] == 0
    before = _snapshot(run_dir)
    monkeypatch.setenv("KUBELORA_RUN_ID", "uid-b")
    for sets in ((), ("output.overwrite=true",)):
        code, line = _run(_cfg(tiny_model_dir, run_dir), tmp_path, capsys, *sets)
        assert code == EXIT_BAD_INPUT, line
        assert f"output dir {run_dir} belongs to run uid-a" in line and "(uid-b)" in line
        assert "Delete the directory" in line and "subPath" in line
    assert "output.overwrite does not apply" in line
    assert _snapshot(run_dir) == before


def test_same_run_with_other_settings_is_refused_naming_them(tiny_model_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A killed run restarted with another lora.r would have resumed its checkpoints (cffc930)."""
    run_dir = tmp_path / "run"
    base = _cfg(tiny_model_dir, run_dir, training={"maxSteps": 4, "saveSteps": 2})
    stopped = LoRAFineTuneRecipe(parse_config(base))

    def stop(start_step: int) -> dict:
        raise RuntimeError("stopped")

    stopped.train = stop  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="stopped"):
        stopped.run()  # claimed, then stopped as training starts: an unfinished run of this id
    assert (run_dir / OWNER_FILE).is_file()
    code, line = _run(_cfg(tiny_model_dir, run_dir, training={"maxSteps": 4, "saveSteps": 2},
                           lora={"r": 8}), tmp_path, capsys)
    assert code == EXIT_BAD_INPUT
    assert "holds an unfinished run" in line and "lora.r: 4 -> 8" in line and "output.overwrite" in line
    # Settings that do not change the result may change.
    code, _ = _run(_cfg(tiny_model_dir, run_dir, training={"maxSteps": 4, "saveSteps": 1, "loggingSteps": 2}),
                   tmp_path, capsys)
    assert code == 0


def test_second_concurrent_run_fails_at_once_naming_the_holder(tiny_model_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, run_dir, training={"maxSteps": 30})
    first_cfg = tmp_path / "first.yaml"
    first_cfg.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "KUBELORA_TERMINATION_LOG": str(tmp_path / "first-termination")}
    first = subprocess.Popen([sys.executable, "-m", "kubelora_trainer.cli", "run", str(first_cfg)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            try:
                if json.loads((run_dir / LOCK_FILE).read_text()).get("pid") == first.pid:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        assert first.poll() is None, "the first run ended before the second could start"
        t0 = time.monotonic()
        code, line = _run(cfg, tmp_path, capsys)
        assert time.monotonic() - t0 < 10
        assert code == EXIT_BAD_INPUT
        assert f"output dir {run_dir} is in use by another run" in line and f"pid {first.pid}" in line
    finally:
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert (run_dir / "summary.json").is_file() and not (run_dir / LOCK_FILE).exists()


# ---------------------------------------------------------------------- the rules, without a model
def _finished_dir(run_dir: Path, run_id: str) -> None:
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (run_dir / "summary.json").write_text(json.dumps({"run_id": run_id}))


def test_dir_from_before_owner_files_is_judged_by_its_summary(tmp_path: Path) -> None:
    """A run dir written by cffc930 (summary.json with the old UID, no owner.json) is not adopted."""
    cfg = parse_config(tiny_config(Path("m"), tmp_path, output={"s3": {"uri": "s3://b/new"}}))
    fields = result_fields(cfg, 1)
    _finished_dir(tmp_path, "uid-old")
    with pytest.raises(RunDirError, match="belongs to run uid-old"):
        judge(tmp_path, "uid-new", fields, overwrite=False, deliverable=True)
    assert judge(tmp_path, "uid-old", fields, overwrite=False, deliverable=True) is Verdict.DELIVER
    assert judge(tmp_path, "uid-old", fields, overwrite=True, deliverable=True) is Verdict.REPLACE


def test_result_fields_ignore_how_the_work_is_split_or_watched(tmp_path: Path) -> None:
    def fields(world: int, **sections: dict) -> dict:
        return result_fields(parse_config(tiny_config(Path("m"), tmp_path, **sections)), world)

    base = fields(1, training={"microBatchSize": 4})
    assert fields(2, training={"microBatchSize": 2, "loggingSteps": 5, "saveSteps": 3, "evalSteps": 2,
                               "resume": "never", "compile": True},
                  output={"plot": False}, evaluation={"maxNewTokens": 9}) == base
    assert fields(1, training={"microBatchSize": 2}) != base  # global batch 2 vs 4
    assert fields(1, training={"microBatchSize": 4, "learningRate": 1e-5}) != base
    assert fields(1, training={"microBatchSize": 4}, output={"s3": {"uri": "s3://b/x"}}) != base


def test_lock_waits_only_for_an_earlier_attempt_of_the_same_run(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    holder = RunDirClaim(tmp_path / "run", writer=True)
    holder.lock("uid-1")
    other = RunDirClaim(tmp_path / "run", writer=True)
    t0 = time.monotonic()
    with pytest.raises(RunDirError, match="in use by another run .*run_id uid-1"):
        other.lock("uid-2", wait_s=30)
    assert time.monotonic() - t0 < 1  # another run: at once, even when waiting is allowed
    threading.Timer(1.5, holder.release).start()
    same = RunDirClaim(tmp_path / "run", writer=True)
    same.lock("uid-1", wait_s=30)  # the earlier attempt lets go: this one takes over
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    same.release()
    assert list((tmp_path / "run").iterdir()) == []  # nothing committed: the directory is as it was found
